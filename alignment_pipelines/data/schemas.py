"""Canonical shapes of feedback data: messages, pairwise records, quarantine rows, reason codes."""

from __future__ import annotations

import sys
import unicodedata
from typing import Any, TypedDict

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
    TOO_MANY_QUARANTINED = "too_many_quarantined"  # batch-level gate, never a row reason


def empty_pairs() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series([], dtype="int64" if c == "row" else object) for c in PAIR_COLUMNS})


def empty_quarantine() -> pd.DataFrame:
    return pd.DataFrame(
        {c: pd.Series([], dtype="int64" if c == "row" else object) for c in QUARANTINE_COLUMNS}
    )


def pairs_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    if not rows:
        return empty_pairs()
    df = pd.DataFrame(rows, columns=PAIR_COLUMNS)
    df["row"] = df["row"].astype("int64")
    return df


def quarantine_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    if not rows:
        return empty_quarantine()
    df = pd.DataFrame(rows, columns=QUARANTINE_COLUMNS)
    df["row"] = df["row"].astype("int64")
    df["reason"] = df["reason"].map(str).astype(object)
    return df


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
