"""Canonical shapes of feedback data: messages and prompts, records of each kind, quarantine rows,
reason codes.

The prompt helpers live here, once: `normalize_prompt` (untrusted input → checked list of messages),
`as_messages` (a prompt already in the records → list of messages, no checks), `render_prompt` and
`last_user_turn`.
"""

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

# The records of each kind, one row per input row that became a record.
#   row: the 1-based row number in the source file (provenance, not content: keys and versions skip it)
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


class RowError(ValueError):
    """A row (or one of its fields) that cannot become a canonical record.

    `reason` is the ReasonCode the row is quarantined with, `detail` the sentence without the row;
    the message names the row when it is known.
    """

    def __init__(self, reason: ReasonCode, detail: str, row: Any = None):
        self.reason = reason
        self.detail = detail
        self.row = row
        super().__init__(f"row {row}: {detail}" if row is not None else detail)


def _as_list(value: Any) -> Any:
    """Tuples and numpy arrays (Parquet gives lists of structs back as arrays) as lists."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    return list(value) if isinstance(value, tuple) else value


def normalize_messages(value: Any, field: str = "messages", row: Any = None) -> list[Message]:
    """A list (tuple, numpy array) of {"role", "content"} messages, checked: every message an object
    whose role (one of ROLES) and content are strings. Extra keys are dropped. Raises RowError."""
    value = _as_list(value)
    if not isinstance(value, list):
        raise RowError(ReasonCode.WRONG_TYPE, f"{field} must be a list of messages, got {type(value).__name__}", row)
    out: list[Message] = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise RowError(ReasonCode.WRONG_TYPE, f"{field}[{i}] must be an object, got {type(msg).__name__}", row)
        if "role" not in msg or "content" not in msg:
            raise RowError(ReasonCode.MISSING_FIELD, f"{field}[{i}] needs 'role' and 'content'", row)
        role, content = msg["role"], msg["content"]
        if not isinstance(role, str) or not isinstance(content, str):
            raise RowError(ReasonCode.WRONG_TYPE, f"{field}[{i}] role and content must be strings", row)
        if role not in ROLES:
            raise RowError(ReasonCode.INVALID_CONVERSATION, f"{field}[{i}] has unknown role {role!r}", row)
        out.append({"role": role, "content": content})
    return out


def normalize_prompt(prompt: Any, row: Any = None, field: str = "prompt") -> list[Message]:
    """The canonical prompt: a list of {"role", "content"} messages ending with a user turn.

    A str is one user turn. A list, tuple or numpy array (from Parquet) of messages is checked by
    `normalize_messages`, and must be non-empty and end with a user turn. Whether the text is
    blank, too long or clean is the validation suite's job, not this function's. Raises RowError
    (a ValueError) naming the row, with the ReasonCode a row is quarantined with.
    """
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    prompt = _as_list(prompt)
    if not isinstance(prompt, list):
        raise RowError(
            ReasonCode.WRONG_TYPE, f"{field} must be a string or a list of messages, got {type(prompt).__name__}", row
        )
    messages = normalize_messages(prompt, field, row)
    if not messages:
        raise RowError(ReasonCode.EMPTY_FIELD, f"{field} has no messages", row)
    if messages[-1]["role"] != "user":
        raise RowError(ReasonCode.INVALID_CONVERSATION, f"{field} must end with a user turn", row)
    return messages


def as_messages(prompt: Any) -> list[Message]:
    """A prompt already in the records (str, list or numpy array of messages; None) as list[Message],
    without checks: for Parquet I/O, content keys and the suite's derived columns, where a malformed
    prompt must still reach the suite to be quarantined. Untrusted input goes through
    `normalize_prompt`."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if prompt is None:
        return []
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in _as_list(prompt)]


def normalize_text(text: str) -> str:
    """NFC and surrounding whitespace stripped: the form used for keys and comparisons."""
    return unicodedata.normalize("NFC", text).strip()


def render_prompt(prompt: Any) -> str:
    """The prompt as one text, a "role: content" line per turn, turns separated by a blank line
    (what the suite measures in characters and tokens, and what a report shows)."""
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in as_messages(prompt))


def last_user_turn(prompt: Any) -> str:
    """The content of the prompt's last user turn; "" when it has none."""
    return next((m["content"] for m in reversed(as_messages(prompt)) if m["role"] == "user"), "")
