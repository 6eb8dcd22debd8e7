"""Canonical shapes of feedback data: messages, pairwise records, quarantine rows, reason codes."""

from __future__ import annotations

import re
import sys
import unicodedata
from typing import Any, Literal, TypedDict

import pandas as pd

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # pragma: no cover - Python 3.10
    from enum import Enum

    class StrEnum(str, Enum):
        def __str__(self) -> str:
            return str(self.value)


Message = TypedDict("Message", {"role": str, "content": str})

ROLES = ("system", "user", "assistant")

# One row per input row that parsed.
#   row: 1-based line number in the source file
#   prompt: list[Message], the conversation so far, ending with a user turn
#   chosen, rejected: the final assistant answers
PAIR_COLUMNS = ["row", "prompt", "chosen", "rejected"]
#   completion: the assistant answer that was rated; label: bool, True = desirable (thumbs up)
BINARY_COLUMNS = ["row", "prompt", "completion", "label"]
PROMPT_COLUMNS = ["row", "prompt"]

FeedbackKind = Literal["pairwise", "binary", "prompts"]
KINDS: tuple[str, ...] = ("pairwise", "binary", "prompts")
COLUMNS_BY_KIND: dict[str, list[str]] = {
    "pairwise": PAIR_COLUMNS,
    "binary": BINARY_COLUMNS,
    "prompts": PROMPT_COLUMNS,
}

# reason: a ReasonCode value; detail: a human sentence; raw: the original line (<= RAW_MAX_CHARS)
QUARANTINE_COLUMNS = ["row", "reason", "detail", "raw"]
RAW_MAX_CHARS = 2_000


class ReasonCode(StrEnum):
    """Why a row was quarantined (or why a suite expectation failed). Values are snake_case."""

    INVALID_JSON = "invalid_json"
    NOT_AN_OBJECT = "not_an_object"
    UNKNOWN_LAYOUT = "unknown_layout"
    WRONG_TYPE = "wrong_type"
    MISSING_FIELD = "missing_field"
    INVALID_CONVERSATION = "invalid_conversation"  # bad roles / prompt not ending in a user turn
    EMPTY_FIELD = "empty_field"
    IDENTICAL_PAIR = "identical_pair"
    PROMPT_MISMATCH = "prompt_mismatch"
    TOO_LONG = "too_long"
    INVALID_TEXT = "invalid_text"
    DUPLICATE = "duplicate"
    DUPLICATE_ACROSS_BATCHES = "duplicate_across_batches"  # same content as a row of an earlier batch
    LAYOUT_MISMATCH = "layout_mismatch"  # a row of another kind than the file's detected layout
    MALFORMED_ROW = "malformed_row"  # CSV row with a different number of fields than the header
    NO_PREFERENCE = "no_preference"  # scored responses (UltraFeedback) that do not rank: all scores equal
    PII = "pii"  # e-mail address, phone number or card number found (pii="quarantine")
    TOO_MANY_QUARANTINED = "too_many_quarantined"  # batch-level gate, never a row reason


def check_kind(kind: str) -> str:
    if kind not in COLUMNS_BY_KIND:
        raise ValueError(f"unknown feedback kind {kind!r}; expected one of {', '.join(KINDS)}")
    return kind


def kind_of(df: pd.DataFrame) -> str:
    """The kind of a records frame, from its columns."""
    cols = set(df.columns)
    if {"chosen", "rejected"} <= cols:
        return "pairwise"
    if {"completion", "label"} <= cols:
        return "binary"
    if "prompt" in cols:
        return "prompts"
    raise ValueError(f"not a feedback records frame (columns: {', '.join(map(str, df.columns))})")


def empty_records(kind: str = "pairwise") -> pd.DataFrame:
    return pd.DataFrame(
        {c: pd.Series([], dtype="int64" if c == "row" else object) for c in COLUMNS_BY_KIND[check_kind(kind)]}
    )


def empty_pairs() -> pd.DataFrame:
    return empty_records("pairwise")


def records_frame(rows: list[dict[str, Any]], kind: str = "pairwise") -> pd.DataFrame:
    if not rows:
        return empty_records(kind)
    columns = COLUMNS_BY_KIND[check_kind(kind)]
    # object columns (not pandas' Arrow-backed str): text may hold lone surrogates until validated
    data = {c: pd.Series([r.get(c) for r in rows], dtype="int64" if c == "row" else object) for c in columns}
    return pd.DataFrame(data, columns=columns)


def empty_quarantine() -> pd.DataFrame:
    return pd.DataFrame(
        {c: pd.Series([], dtype="int64" if c == "row" else object) for c in QUARANTINE_COLUMNS}
    )


def pairs_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return records_frame(rows, "pairwise")


_SURROGATES = re.compile(r"[\ud800-\udfff]")


def storable_text(value: Any) -> str:
    """A str that Parquet/JSON can store: lone surrogates (from invalid UTF-8 or JSON escapes)
    become visible backslash escapes."""
    text = value if isinstance(value, str) else str(value)
    if _SURROGATES.search(text):
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def quarantine_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    if not rows:
        return empty_quarantine()
    return pd.DataFrame(
        {
            "row": pd.Series([int(r["row"]) for r in rows], dtype="int64"),
            "reason": pd.Series([str(r["reason"]) for r in rows], dtype=object),
            "detail": pd.Series([storable_text(r["detail"]) for r in rows], dtype=object),
            "raw": pd.Series([storable_text(r["raw"]) for r in rows], dtype=object),
        },
        columns=QUARANTINE_COLUMNS,
    )


def truncate_raw(text: str) -> str:
    return text if len(text) <= RAW_MAX_CHARS else text[:RAW_MAX_CHARS]


def as_messages(value: Any) -> list[Message]:
    """A prompt in any accepted shape (str, list of dicts, numpy array of dicts) as list[Message]."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if value is None:
        return []
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in list(value)]


def normalize_text(text: str) -> str:
    """NFC and surrounding whitespace stripped: the form used for keys and comparisons."""
    return unicodedata.normalize("NFC", text).strip()


def render_prompt(prompt: Any) -> str:
    """The prompt as one text (for lengths, control-character checks and display)."""
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in as_messages(prompt))
