"""Read pairwise feedback files (JSONL, optionally gzipped) into canonical records.

Row layouts, detected per row:

(a) standard:          {"prompt": str, "chosen": str, "rejected": str}
(b) conversational:    {"prompt": [messages], "chosen": [assistant message], "rejected": [...]}
    (also TRL's implicit-prompt form: no "prompt", chosen/rejected are whole conversations)
(c) HH-RLHF transcript: {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}

A row that cannot be converted goes to `rejected` with a ReasonCode and its line number;
it never stops the file. Content checks (empty, identical, too long, control characters,
duplicates) are the validation suite's job, not the importer's.
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any

import pandas as pd

from alignment_pipelines.data.schemas import (
    ROLES,
    Message,
    ReasonCode,
    pairs_frame,
    quarantine_frame,
    truncate_raw,
)

GZIP_MAGIC = b"\x1f\x8b"
HH_TURN = re.compile(r"\n\n(Human|Assistant):")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


class FeedbackFileError(Exception):
    """The file itself cannot be read (missing, a directory, unreadable, corrupt gzip)."""

    def __init__(self, path: str | Path, message: str):
        self.path = str(path)
        self.message = message
        super().__init__(f"{path}: {message}")


class RowError(Exception):
    def __init__(self, reason: ReasonCode, detail: str):
        self.reason = reason
        self.detail = detail
        super().__init__(detail)


@dataclass
class ImportResult:
    source: str  # the file path
    rows: int  # number of input rows (non-blank lines)
    records: pd.DataFrame  # PAIR_COLUMNS
    rejected: pd.DataFrame  # QUARANTINE_COLUMNS
    # original text (truncated) of each converted row by line number, so that rows quarantined
    # later by validation can still show the line as it was in the file
    raw_lines: dict[int, str] = dc_field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        assert len(self.records) + len(self.rejected) == self.rows, "every row must be accounted for"


def _read_lines(path: Path) -> list[bytes]:
    if not path.exists():
        raise FeedbackFileError(path, "no such file")
    if not path.is_file():
        raise FeedbackFileError(path, "not a regular file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FeedbackFileError(path, f"cannot read file: {exc}") from exc
    if data[:2] == GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise FeedbackFileError(path, f"corrupt gzip data: {exc}") from exc
    elif path.name.endswith(".gz"):
        raise FeedbackFileError(path, "file name ends in .gz but the content is not gzip")
    return data.split(b"\n")


def _messages(value: Any, field: str) -> list[Message]:
    if not isinstance(value, list):
        raise RowError(ReasonCode.WRONG_TYPE, f"{field} must be a list of messages, got {type(value).__name__}")
    out: list[Message] = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise RowError(ReasonCode.WRONG_TYPE, f"{field}[{i}] must be an object, got {type(msg).__name__}")
        if "role" not in msg or "content" not in msg:
            raise RowError(ReasonCode.MISSING_FIELD, f"{field}[{i}] needs 'role' and 'content'")
        role, content = msg["role"], msg["content"]
        if not isinstance(role, str) or not isinstance(content, str):
            raise RowError(ReasonCode.WRONG_TYPE, f"{field}[{i}] role and content must be strings")
        if role not in ROLES:
            raise RowError(ReasonCode.INVALID_CONVERSATION, f"{field}[{i}] has unknown role {role!r}")
        out.append({"role": role, "content": content})
    return out


def _check_prompt(prompt: list[Message], field: str = "prompt") -> list[Message]:
    if prompt and prompt[-1]["role"] != "user":
        raise RowError(ReasonCode.INVALID_CONVERSATION, f"{field} must end with a user turn")
    return prompt


def _answer(value: Any, field: str, conversational: bool) -> str:
    if isinstance(value, str):
        return value
    if conversational and isinstance(value, list):
        msgs = _messages(value, field)
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise RowError(ReasonCode.INVALID_CONVERSATION, f"{field} must be exactly one assistant message")
        return msgs[0]["content"]
    expected = "a string or a list with one assistant message" if conversational else "a string"
    raise RowError(ReasonCode.WRONG_TYPE, f"{field} must be {expected}, got {type(value).__name__}")


def _split_hh(transcript: str, field: str) -> tuple[list[Message], str]:
    parts = HH_TURN.split(transcript)
    # parts = [preamble, role, text, role, text, ...]
    if len(parts) < 3:
        raise RowError(ReasonCode.UNKNOWN_LAYOUT, f"{field} has no '\\n\\nHuman:'/'\\n\\nAssistant:' turns")
    if parts[0].strip():
        raise RowError(ReasonCode.UNKNOWN_LAYOUT, f"{field} has text before the first turn")
    turns = [(HH_ROLES[parts[i]], parts[i + 1].strip()) for i in range(1, len(parts), 2)]
    if turns[-1][0] != "assistant":
        raise RowError(ReasonCode.INVALID_CONVERSATION, f"{field} does not end with an Assistant turn")
    prompt: list[Message] = [{"role": r, "content": c} for r, c in turns[:-1]]
    if not prompt:
        raise RowError(ReasonCode.INVALID_CONVERSATION, f"{field} has no Human turn before the answer")
    return prompt, turns[-1][1]


def _convert(obj: Any) -> tuple[list[Message], str, str]:
    """One parsed JSON value -> (prompt messages, chosen, rejected) or RowError."""
    if not isinstance(obj, dict):
        raise RowError(ReasonCode.NOT_AN_OBJECT, f"a row must be a JSON object, got {type(obj).__name__}")
    known = {"prompt", "chosen", "rejected"} & obj.keys()
    if not known:
        keys = ", ".join(sorted(map(str, obj.keys())))[:200] or "none"
        raise RowError(ReasonCode.UNKNOWN_LAYOUT, f"no prompt/chosen/rejected fields (keys: {keys})")
    missing = [k for k in ("chosen", "rejected") if k not in obj]
    if missing:
        raise RowError(ReasonCode.MISSING_FIELD, f"missing field(s): {', '.join(missing)}")
    chosen, rejected = obj["chosen"], obj["rejected"]

    if "prompt" in obj:
        prompt = obj["prompt"]
        if isinstance(prompt, str):  # (a)
            return [{"role": "user", "content": prompt}], _answer(chosen, "chosen", False), _answer(
                rejected, "rejected", False
            )
        if isinstance(prompt, list):  # (b)
            msgs = _check_prompt(_messages(prompt, "prompt"))
            return msgs, _answer(chosen, "chosen", True), _answer(rejected, "rejected", True)
        raise RowError(ReasonCode.WRONG_TYPE, f"prompt must be a string or a list of messages, got {type(prompt).__name__}")

    if isinstance(chosen, list) and isinstance(rejected, list):  # (b) implicit prompt
        c, r = _messages(chosen, "chosen"), _messages(rejected, "rejected")
        if not c or not r or c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
            raise RowError(ReasonCode.INVALID_CONVERSATION, "chosen and rejected must end with an assistant turn")
        if c[:-1] != r[:-1]:
            raise RowError(ReasonCode.PROMPT_MISMATCH, "chosen and rejected conversations differ before the final turn")
        return _check_prompt(c[:-1]), c[-1]["content"], r[-1]["content"]

    if isinstance(chosen, str) and isinstance(rejected, str):  # (c) HH-RLHF
        if "\n\nAssistant:" not in chosen and "\n\nAssistant:" not in rejected:
            raise RowError(
                ReasonCode.UNKNOWN_LAYOUT,
                "no prompt field and chosen/rejected are not Human/Assistant transcripts",
            )
        c_prompt, c_answer = _split_hh(chosen, "chosen")
        r_prompt, r_answer = _split_hh(rejected, "rejected")
        if c_prompt != r_prompt:
            turn = next(
                (i for i, (a, b) in enumerate(zip(c_prompt, r_prompt)) if a != b), min(len(c_prompt), len(r_prompt))
            )
            raise RowError(
                ReasonCode.PROMPT_MISMATCH,
                f"chosen and rejected transcripts differ before the final turn (first at turn {turn + 1})",
            )
        return _check_prompt(c_prompt), c_answer, r_answer

    bad = "chosen" if not isinstance(chosen, (str, list)) else "rejected"
    raise RowError(
        ReasonCode.WRONG_TYPE,
        f"{bad} must be a string or a list of messages, got {type(obj[bad]).__name__}"
        if not isinstance(obj[bad], (str, list))
        else "chosen and rejected must have the same shape (both strings or both message lists)",
    )


def convert_row(obj: Any) -> tuple[list[Message], str, str]:
    """Public for reuse (e.g. exports already parsed): raises RowError with a ReasonCode."""
    return _convert(obj)


def read_feedback_file(path: str | Path) -> ImportResult:
    """Read a JSONL(.gz) feedback file; every non-blank line ends in `records` or `rejected`."""
    path = Path(path)
    lines = _read_lines(path)
    records: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    raw_lines: dict[int, str] = {}
    rows = 0
    for lineno, raw_bytes in enumerate(lines, start=1):
        if not raw_bytes.strip():
            continue
        rows += 1
        try:
            text = raw_bytes.decode("utf-8")
        except UnicodeDecodeError as exc:
            rejected.append(
                {
                    "row": lineno,
                    "reason": ReasonCode.INVALID_TEXT,
                    "detail": f"line is not valid UTF-8 ({exc.reason} at byte {exc.start})",
                    "raw": truncate_raw(raw_bytes.decode("utf-8", errors="replace")),
                }
            )
            continue
        text = text.rstrip("\r")
        if lineno == 1:
            text = text.removeprefix("\ufeff")
        try:
            obj = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            rejected.append(
                {"row": lineno, "reason": ReasonCode.INVALID_JSON, "detail": f"invalid JSON: {exc}", "raw": truncate_raw(text)}
            )
            continue
        try:
            prompt, chosen, rejected_answer = _convert(obj)
        except RowError as err:
            rejected.append({"row": lineno, "reason": err.reason, "detail": err.detail, "raw": truncate_raw(text)})
            continue
        records.append({"row": lineno, "prompt": prompt, "chosen": chosen, "rejected": rejected_answer})
        raw_lines[lineno] = truncate_raw(text)
    return ImportResult(
        source=str(path),
        rows=rows,
        records=pairs_frame(records),
        rejected=quarantine_frame(rejected),
        raw_lines=raw_lines,
    )
