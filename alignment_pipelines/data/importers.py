"""Read feedback files (JSONL, JSON, CSV/TSV, Parquet; any of them gzipped) into canonical records.

Formats are recognised from the content first (gzip and Parquet magic bytes, a JSON array's
"["), then from the name (.csv/.tsv, .parquet). Binary data that is none of these is a
FeedbackFileError ("not a text feedback file"), not a file of quarantined rows.

Row layouts (names accepted by `layout=`), and the kind of records each produces:

pairwise       {"prompt": str, "chosen": str, "rejected": str}                       -> pairwise
conversational {"prompt": [messages], "chosen": [assistant msg], "rejected": [...]}
               or TRL's implicit prompt: chosen/rejected are whole conversations      -> pairwise
hh-rlhf        {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}      -> pairwise
ultrafeedback  {"instruction"|"prompt": ..., "completions": [{"response", "overall_score"|...}]}
               or {"prompt", "responses": [...], "scores": [...]}; chosen = best score,
               rejected = lowest score (ties: first)                                  -> pairwise
binary         TRL unpaired preference {"prompt", "completion", "label": bool}        -> binary
chat-log       OpenAI-style {"messages": [..., final assistant msg], "thumbs"|"feedback"|
               "rating"|"thumbs_up"|"label"|"vote": up/down}                          -> binary
messages       TRL conversational LM {"messages": [...]}: the conversation up to its
               last user turn becomes a prompt                                        -> prompts
prompts        {"prompt": str | [messages]} (a "completion" without a label is ignored) -> prompts

JSONL, CSV and Parquet are streamed row by row (`iter_feedback_chunks` holds one chunk at a
time); a JSON document (array or object) is parsed from memory, element by element, so a
truncated array keeps the elements before the break and quarantines the rest as one row.

One file = one kind. The file's layout is the override, or the most common layout among the
parseable rows (of the first chunk when streaming). A row of another layout of the same kind
is converted with its own layout; a row of another kind is quarantined as LAYOUT_MISMATCH; a
row matching no layout as UNKNOWN_LAYOUT. A file where no row matches any layout is a
FeedbackFileError naming the file and the fields found.

A row that cannot be converted goes to `rejected` with a ReasonCode and its row number;
it never stops the file: whatever one row's parsing or conversion raises is that row's reason (an integer
too long for Python to convert is read as a HugeInteger, which no field accepts).

What one file may cost is capped (`cap`, environment variables): the bytes a gzipped file inflates to, the
length of a line (a longer JSONL line is read past and quarantined TOO_LONG; a longer CSV line is a
FeedbackFileError), and what is read whole (a JSON document, a Parquet row group). A gzipped Parquet file
is inflated to a temporary file, not into memory. Row numbers are 1-based: the line for JSONL, the line where the
record starts for CSV, the element index for JSON arrays and Parquet. Prompts and message
lists are checked by `schemas.normalize_prompt` / `normalize_messages` (shape, roles, a prompt
ending with a user turn). Content checks (blank text, identical answers, too long, control
characters, duplicates, PII) are the validation suite's job.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
import shutil
import tempfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import IO, Any

import pandas as pd

from alignment_pipelines.data.schemas import (
    FeedbackKind,
    Message,
    ReasonCode,
    RowError,
    normalize_messages,
    normalize_prompt,
    quarantine_frame,
    records_frame,
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


@dataclass
class ImportResult:
    source: str  # the file path
    rows: int  # number of input rows (non-blank lines)
    records: pd.DataFrame  # COLUMNS_BY_KIND[kind]
    rejected: pd.DataFrame  # QUARANTINE_COLUMNS
    # original text (truncated) of each converted row by line number, so that rows quarantined
    # later by validation can still show the line as it was in the file
    raw_lines: dict[int, str] = dc_field(default_factory=dict, repr=False)
    kind: FeedbackKind = "pairwise"
    layout: str = "pairwise"  # the file's layout (detected or the override); "none" if no row parsed

    def __post_init__(self) -> None:
        assert len(self.records) + len(self.rejected) == self.rows, "every row must be accounted for"


def _answer(value: Any, field: str, conversational: bool) -> str:
    if isinstance(value, str):
        return value
    if conversational and isinstance(value, list):
        msgs = normalize_messages(value, field)
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

    if "prompt" in obj:  # (a) a string prompt with string answers, or (b) messages
        conversational = not isinstance(obj["prompt"], str)
        return (normalize_prompt(obj["prompt"]), _answer(chosen, "chosen", conversational),
                _answer(rejected, "rejected", conversational))

    if isinstance(chosen, list) and isinstance(rejected, list):  # (b) implicit prompt
        c, r = normalize_messages(chosen, "chosen"), normalize_messages(rejected, "rejected")
        if not c or not r or c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
            raise RowError(ReasonCode.INVALID_CONVERSATION, "chosen and rejected must end with an assistant turn")
        if c[:-1] != r[:-1]:
            raise RowError(ReasonCode.PROMPT_MISMATCH, "chosen and rejected conversations differ before the final turn")
        return normalize_prompt(c[:-1]), c[-1]["content"], r[-1]["content"]

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
        return normalize_prompt(c_prompt), c_answer, r_answer

    bad = "chosen" if not isinstance(chosen, (str, list)) else "rejected"
    raise RowError(
        ReasonCode.WRONG_TYPE,
        f"{bad} must be a string or a list of messages, got {type(obj[bad]).__name__}"
        if not isinstance(obj[bad], (str, list))
        else "chosen and rejected must have the same shape (both strings or both message lists)",
    )


# --------------------------------------------------------------------------- other layouts

THUMBS_FIELDS = ("thumbs", "thumb", "thumbs_up", "feedback", "rating", "vote", "label")
_UP = {"up", "thumbs_up", "thumbs-up", "thumbsup", "+1", "1", "👍", "positive", "good", "like", "liked", "true", "yes"}
_DOWN = {"down", "thumbs_down", "thumbs-down", "thumbsdown", "-1", "0", "👎", "negative", "bad", "dislike", "disliked",
         "false", "no"}
SCORE_FIELDS = ("overall_score", "score", "rating", "fine-grained_score")


def _convert_binary(obj: dict) -> dict[str, Any]:
    missing = [k for k in ("prompt", "completion", "label") if k not in obj]
    if missing:
        raise RowError(ReasonCode.MISSING_FIELD, f"missing field(s): {', '.join(missing)}")
    prompt = normalize_prompt(obj["prompt"])
    completion = _answer(obj["completion"], "completion", isinstance(obj["prompt"], list))
    label = obj["label"]
    if isinstance(label, str) and label.strip().lower() in ("true", "false"):  # CSV has no booleans
        label = label.strip().lower() == "true"
    # a label of another type is passed on: the suite's "label is a boolean" rule quarantines it
    return {"prompt": prompt, "completion": completion, "label": label}


def _thumbs(value: Any, field: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (1, -1, 0):
        return value == 1
    if isinstance(value, str) and value.strip().lower() in _UP | _DOWN:
        return value.strip().lower() in _UP
    if isinstance(value, dict):  # {"thumbs": {"value": "up"}} / {"feedback": {"rating": "down"}}
        for key in ("value", "rating", "type", "thumbs", "score"):
            if key in value:
                return _thumbs(value[key], f"{field}.{key}")
    raise RowError(ReasonCode.WRONG_TYPE, f"{field} must be thumbs up/down (bool, 'up'/'down', 1/-1), got {value!r:.60}")


def _convert_chat_log(obj: dict) -> dict[str, Any]:
    msgs = normalize_messages(obj.get("messages"), "messages")
    if not msgs or msgs[-1]["role"] != "assistant":
        raise RowError(ReasonCode.INVALID_CONVERSATION, "messages must end with the assistant answer that was rated")
    prompt = msgs[:-1]
    if not prompt or prompt[-1]["role"] != "user":
        raise RowError(ReasonCode.INVALID_CONVERSATION, "the rated answer must follow a user turn")
    field = next((f for f in THUMBS_FIELDS if f in obj), None)
    if field is None:
        raise RowError(ReasonCode.MISSING_FIELD, f"no thumbs field (one of {', '.join(THUMBS_FIELDS)})")
    return {"prompt": prompt, "completion": msgs[-1]["content"], "label": _thumbs(obj[field], field)}


def _convert_messages(obj: dict) -> dict[str, Any]:
    msgs = normalize_messages(obj.get("messages"), "messages")
    last_user = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=-1)
    if last_user < 0:
        raise RowError(ReasonCode.INVALID_CONVERSATION, "messages has no user turn")
    return {"prompt": msgs[: last_user + 1]}


def _convert_prompts(obj: dict) -> dict[str, Any]:
    if "prompt" not in obj:
        raise RowError(ReasonCode.MISSING_FIELD, "missing field: prompt")
    return {"prompt": normalize_prompt(obj["prompt"])}


def _score(value: Any, where: str) -> float:
    if isinstance(value, dict):  # UltraFeedback annotations: {"Rating": "4", ...}
        value = value.get("Rating", value.get("rating"))
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise RowError(ReasonCode.WRONG_TYPE, f"{where} must be a number, got {value!r:.40}")
    try:
        return float(value)
    except OverflowError as exc:  # an integer beyond the float range
        raise RowError(ReasonCode.WRONG_TYPE, f"{where} is out of the float range") from exc


def _convert_ultrafeedback(obj: dict) -> dict[str, Any]:
    prompt_field = next((f for f in ("prompt", "instruction") if f in obj), None)
    if prompt_field is None:
        raise RowError(ReasonCode.MISSING_FIELD, "missing field: prompt (or instruction)")
    prompt = normalize_prompt(obj[prompt_field], field=prompt_field)
    answers: list[tuple[str, float]] = []
    if "completions" in obj:
        comps = obj["completions"]
        if not isinstance(comps, list):
            raise RowError(ReasonCode.WRONG_TYPE, f"completions must be a list, got {type(comps).__name__}")
        for i, comp in enumerate(comps):
            if not isinstance(comp, dict):
                raise RowError(ReasonCode.WRONG_TYPE, f"completions[{i}] must be an object")
            text = comp.get("response", comp.get("text", comp.get("completion")))
            if not isinstance(text, str):
                raise RowError(ReasonCode.WRONG_TYPE, f"completions[{i}] needs a string 'response'")
            field = next((f for f in SCORE_FIELDS if f in comp), None)
            if field is None:
                raise RowError(ReasonCode.MISSING_FIELD, f"completions[{i}] has no score ({', '.join(SCORE_FIELDS)})")
            answers.append((text, _score(comp[field], f"completions[{i}].{field}")))
    else:
        responses, scores = obj.get("responses"), obj.get("scores")
        if not isinstance(responses, list) or not isinstance(scores, list):
            raise RowError(ReasonCode.WRONG_TYPE, "responses and scores must be lists")
        if len(responses) != len(scores):
            raise RowError(ReasonCode.WRONG_TYPE, f"{len(responses)} responses but {len(scores)} scores")
        for i, (text, score) in enumerate(zip(responses, scores)):
            answers.append((_answer(text, f"responses[{i}]", True), _score(score, f"scores[{i}]")))
    if len(answers) < 2:
        raise RowError(ReasonCode.MISSING_FIELD, f"needs at least 2 scored responses, got {len(answers)}")
    best = max(range(len(answers)), key=lambda i: (answers[i][1], -i))
    worst = min(range(len(answers)), key=lambda i: (answers[i][1], i))
    if answers[best][1] == answers[worst][1]:
        raise RowError(ReasonCode.NO_PREFERENCE, f"all {len(answers)} responses have the same score")
    return {"prompt": prompt, "chosen": answers[best][0], "rejected": answers[worst][0]}


def _convert_pairwise(obj: dict) -> dict[str, Any]:
    prompt, chosen, rejected = _convert(obj)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


# layout -> (kind, converter); pairwise, conversational and hh-rlhf share one converter
LAYOUTS: dict[str, tuple[str, Any]] = {
    "pairwise": ("pairwise", _convert_pairwise),
    "conversational": ("pairwise", _convert_pairwise),
    "hh-rlhf": ("pairwise", _convert_pairwise),
    "ultrafeedback": ("pairwise", _convert_ultrafeedback),
    "binary": ("binary", _convert_binary),
    "chat-log": ("binary", _convert_chat_log),
    "messages": ("prompts", _convert_messages),
    "prompts": ("prompts", _convert_prompts),
}


def detect_layout(obj: Any) -> str | None:
    """The layout a parsed row looks like (from its field names), or None."""
    if not isinstance(obj, dict):
        return None
    if "chosen" in obj or "rejected" in obj:
        if "prompt" in obj:
            return "conversational" if isinstance(obj["prompt"], list) else "pairwise"
        if "completions" in obj or "responses" in obj:
            return "ultrafeedback"
        return "conversational" if isinstance(obj.get("chosen"), list) else "hh-rlhf"
    if "completions" in obj or ("responses" in obj and "scores" in obj):
        return "ultrafeedback"
    if "completion" in obj and "label" in obj:
        return "binary"
    if "messages" in obj:
        return "chat-log" if any(f in obj for f in THUMBS_FIELDS) else "messages"
    if "prompt" in obj:
        return "prompts"
    return None


def _loose_match(layout: str, obj: dict) -> bool:
    """Does a row belong to the file's layout, even with fields missing? (for precise reasons)"""
    kind = LAYOUTS[layout][0]
    if kind == "pairwise":
        return detect_layout(obj) in ("pairwise", "conversational", "hh-rlhf", "ultrafeedback")
    if layout == "binary":
        return ("completion" in obj or "label" in obj) and "chosen" not in obj and "rejected" not in obj
    if layout in ("chat-log", "messages"):
        return "messages" in obj
    return detect_layout(obj) == "prompts"


def _check_layout(layout: str | None) -> str | None:
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of: {', '.join(LAYOUTS)}")
    return layout


# --------------------------------------------------------------------------- formats

PARQUET_MAGIC = b"PAR1"
SNIFF_BYTES = 64 * 1024

# Caps on what one file may cost (environment variable, default): a hostile file meets a clear error or a
# quarantined row, never unbounded memory. Read per file, so a deployment may change them without a restart.
INFLATED_CAP = ("ALIGNMENT_PIPELINES_MAX_INFLATED_BYTES", 16 << 30)  # bytes a gzipped file may inflate to
LINE_CAP = ("ALIGNMENT_PIPELINES_MAX_LINE_BYTES", 8 << 20)  # one JSONL line or CSV line: one row
DOCUMENT_CAP = ("ALIGNMENT_PIPELINES_MAX_DOCUMENT_BYTES", 128 << 20)  # a .json read whole, a Parquet row group


def cap(setting: tuple[str, int]) -> int:
    """A cap's value: its environment variable when set (a positive integer), else its default."""
    name, default = setting
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{name} must be a positive number of bytes, got {value!r}")
    return int(value)


def over_cap(path: str | Path, what: str, setting: tuple[str, int]) -> FeedbackFileError:
    """The batch error of a file that goes over a cap, naming the file, the cap and its variable."""
    return FeedbackFileError(path, f"{what} exceeds {cap(setting):,} bytes (cap {setting[0]})")


class _CappedStream(io.RawIOBase):
    """A decompressed stream that stops with a clear error once it has given more than the inflated cap."""

    def __init__(self, path: Path, compressed: IO[bytes]):
        self.path, self.compressed, self.limit, self.given = path, compressed, cap(INFLATED_CAP), 0
        self.inner = gzip.GzipFile(fileobj=compressed, mode="rb")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        read = self.inner.readinto(buffer)
        self.given += read or 0
        if self.given > self.limit:
            raise over_cap(self.path, "inflated size", INFLATED_CAP)
        return read

    def close(self) -> None:
        self.inner.close()
        self.compressed.close()
        super().close()


_JSON_CELLS = ("prompt", "chosen", "rejected", "completion", "messages", "completions", "responses", "scores")


@dataclass
class _Bad:
    """A row that failed before it became a Python object (JSON, UTF-8, CSV shape)."""

    reason: ReasonCode
    detail: str


# (row number, parsed object or _Bad, original text truncated or None = derive from object)
RawRow = tuple[int, Any, "str | None"]


def _open_binary(path: Path) -> IO[bytes]:
    if not path.exists():
        raise FeedbackFileError(path, "no such file")
    if not path.is_file():
        raise FeedbackFileError(path, "not a regular file")
    try:
        handle = open(path, "rb")
        magic = handle.read(2)
        handle.seek(0)
    except OSError as exc:
        raise FeedbackFileError(path, f"cannot read file: {exc}") from exc
    if magic == GZIP_MAGIC:  # inflated under the cap, in 1 MiB reads
        return io.BufferedReader(_CappedStream(path, handle), 1 << 20)
    if path.name.endswith(".gz"):
        handle.close()
        raise FeedbackFileError(path, "file name ends in .gz but the content is not gzip")
    return handle


def _guard(path: Path, iterator: Iterable[Any]) -> Iterator[Any]:
    """Turn errors of the underlying stream (corrupt gzip, I/O) into FeedbackFileError."""
    try:
        yield from iterator
    except (OSError, EOFError, zlib.error) as exc:
        raise _stream_error(path, exc) from exc


def _stream_error(path: Path, exc: Exception) -> FeedbackFileError:
    """An error of the underlying stream (corrupt gzip, I/O) as the file's error."""
    kind = "corrupt gzip data" if isinstance(exc, (EOFError, zlib.error, gzip.BadGzipFile)) else "cannot read file"
    return FeedbackFileError(path, f"{kind}: {exc}")


def _read(path: Path, handle: IO[bytes], size: int = -1) -> bytes:
    return b"".join(_guard(path, (handle.read(size) for _ in range(1))))


def _sniff(path: Path) -> bytes:
    with _open_binary(path) as handle:
        return _read(path, handle, SNIFF_BYTES)


def _looks_binary(sample: bytes) -> str | None:
    if not sample:
        return None
    text = sample.decode("utf-8", errors="replace")
    bad = sum(1 for ch in text if ch == "\ufffd" or (ord(ch) < 32 and ch not in "\t\n\r\f") or ord(ch) == 127)
    if bad > 0.1 * len(text):
        return f"{100 * bad / len(text):.0f}% of the first {len(sample):,} bytes are not text"
    return None


def _detect_format(path: Path, sample: bytes) -> str:
    name = path.name.lower().removesuffix(".gz")
    if sample[:4] == PARQUET_MAGIC:
        return "parquet"
    if name.endswith((".parquet", ".pq")):
        raise FeedbackFileError(path, "named .parquet but the content is not Parquet (no PAR1 magic)")
    why = _looks_binary(sample)
    if why:
        raise FeedbackFileError(path, f"binary data, not a JSONL/JSON/CSV/Parquet feedback file ({why})")
    if name.endswith((".csv", ".tsv")):
        return "csv"
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    head = sample.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if head == b"[":
        return "json"
    if head == b"{" and name.endswith(".json"):
        return "json-object"
    return "jsonl"


def _decode_line(raw_bytes: bytes, lineno: int) -> tuple[str | None, _Bad | None, str]:
    try:
        text = raw_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        shown = truncate_raw(raw_bytes[: 4 * 2000].decode("utf-8", errors="replace"))
        return None, _Bad(ReasonCode.INVALID_TEXT, f"line is not valid UTF-8 ({exc.reason} at byte {exc.start})"), shown
    text = text.rstrip("\r")
    if lineno == 1:
        text = text.removeprefix("\ufeff")
    return text, None, text


@dataclass(frozen=True)
class LongLine:
    """A line over the line cap, passed over without being held: its head (HEAD_BYTES, for the quarantine's
    raw text) and its length."""

    HEAD_BYTES = 8000

    head: bytes
    length: int

    def row(self, lineno: int) -> RawRow:
        """The line as a quarantined row."""
        detail = f"line is {self.length:,} bytes, over the cap of {cap(LINE_CAP):,} ({LINE_CAP[0]})"
        return lineno, _Bad(ReasonCode.TOO_LONG, detail), truncate_raw(self.head.decode("utf-8", errors="replace"))


def _capped_lines(path: Path, handle: IO[bytes]) -> Iterator[bytes | LongLine]:
    """The lines of a binary stream, each read under the line cap: a longer one is read past in 1 MiB pieces
    and given as a LongLine, so no line is ever held whole beyond the cap."""
    limit = cap(LINE_CAP)
    read = handle.readline
    while True:
        line = _read_some(path, read, limit + 1)
        if not line:
            return
        if len(line) <= limit or line.endswith(b"\n"):
            yield line
            continue
        length, piece = len(line), line
        while piece and not piece.endswith(b"\n"):
            piece = _read_some(path, read, 1 << 20)
            length += len(piece)
        yield LongLine(line[:LongLine.HEAD_BYTES], length)


def _read_some(path: Path, read: Callable[[int], Any], size: int) -> Any:
    """`read(size)` (a line or some bytes), with the stream's errors as the file's."""
    try:
        return read(size)
    except (OSError, EOFError, zlib.error) as exc:
        raise _stream_error(path, exc) from exc


class HugeInteger:
    """A JSON integer too long for Python to convert (`sys.get_int_max_str_digits`), as the rows hold it: the
    JSON around it is still read, and the row is quarantined by the field that holds it (not a string, not
    a number)."""

    def __init__(self, digits: int):
        self.digits = digits

    def __repr__(self) -> str:
        return f"<an integer of {self.digits:,} digits>"

    __str__ = __repr__


def _int(text: str) -> int | HugeInteger:
    try:
        return int(text)
    except ValueError:
        return HugeInteger(len(text))


# every reader's JSON: `json.loads`, with integers past Python's conversion limit read as HugeInteger
JSON = json.JSONDecoder(parse_int=_int)


def parse_json(text: str, lineno: int) -> RawRow:
    """One JSON text as a row: its value, or INVALID_JSON with the reason (broken JSON, nesting too deep:
    whatever the parser raises)."""
    try:
        return lineno, JSON.decode(text), truncate_raw(text)
    except (ValueError, RecursionError) as exc:
        return lineno, _Bad(ReasonCode.INVALID_JSON, f"invalid JSON: {exc}"), truncate_raw(text)


def _iter_jsonl(path: Path) -> Iterator[RawRow]:
    with _open_binary(path) as handle:
        for lineno, raw_bytes in enumerate(_capped_lines(path, handle), start=1):
            if isinstance(raw_bytes, LongLine):
                yield raw_bytes.row(lineno)
                continue
            if not raw_bytes.strip():
                continue
            text, bad, shown = _decode_line(raw_bytes.rstrip(b"\n"), lineno)
            if bad is not None:
                yield lineno, bad, shown
                continue
            yield parse_json(text, lineno)


def _read_text(path: Path) -> str:
    """A JSON document, read whole: under the document cap."""
    limit = cap(DOCUMENT_CAP)
    with _open_binary(path) as handle:
        data = _read(path, handle, limit + 1)
    if len(data) > limit:
        raise over_cap(path, "a JSON document read whole (send JSON Lines instead)", DOCUMENT_CAP)
    # invalid UTF-8 survives as lone surrogates, which the suite's text rule quarantines per row
    return data.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")


_WS = re.compile(r"[ \t\r\n]*")
_ARRAY_KEYS = ("data", "rows", "records", "examples", "items")


def _iter_json_elements(text: str, pos: int) -> Iterator[RawRow]:
    """Elements of the JSON array starting at text[pos] == "[", one by one. A truncated or broken
    tail becomes one INVALID_JSON row (what parsed before it is kept)."""
    pos = _WS.match(text, pos + 1).end()
    index = 0
    if text.startswith("]", pos):
        return
    while True:
        index += 1
        try:
            obj, end = JSON.raw_decode(text, pos)
        except (ValueError, RecursionError) as exc:
            yield index, _Bad(ReasonCode.INVALID_JSON, f"invalid JSON array element (rest of the file not parsed): {exc}"), truncate_raw(text[pos:])
            return
        yield index, obj, None
        pos = _WS.match(text, end).end()
        if text.startswith(",", pos):
            pos = _WS.match(text, pos + 1).end()
            continue
        if text.startswith("]", pos):
            rest = text[pos + 1 :].strip()
            if rest:
                yield index + 1, _Bad(ReasonCode.INVALID_JSON, "extra data after the JSON array"), truncate_raw(rest)
            return
        detail = "JSON array ends without ']'" if pos >= len(text) else f"expected ',' or ']' at char {pos}"
        yield index + 1, _Bad(ReasonCode.INVALID_JSON, f"invalid JSON array: {detail}"), truncate_raw(text[pos:])
        return


def _iter_json(path: Path, fmt: str) -> Iterator[RawRow]:
    text = _read_text(path)
    start = _WS.match(text).end()
    if fmt == "json":
        yield from _iter_json_elements(text, start)
        return
    try:  # a .json file starting with "{": one document, else JSON Lines after all
        doc = JSON.decode(text)
    except (ValueError, RecursionError):
        yield from _iter_jsonl(path)
        return
    if isinstance(doc, dict) and detect_layout(doc) is None:
        for key in (*_ARRAY_KEYS, *doc.keys()):
            value = doc.get(key)
            if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
                for i, obj in enumerate(value, start=1):
                    yield i, obj, None
                return
    yield 1, doc, None


def _csv_cell(key: str, value: str) -> Any:
    stripped = value.strip()
    if key in _JSON_CELLS and stripped[:1] in ("[", "{"):
        try:
            return JSON.decode(stripped)
        except (ValueError, RecursionError):
            return value
    return value


_SURROGATE = re.compile(r"[\udc80-\udcff]")


def _csv_lines(path: Path, text: IO[str], limit: int) -> Iterator[str]:
    """The lines of a CSV text, each read under the line cap (a longer one is a batch error: a quoted field
    may span lines, so the reader could not tell where the next row starts)."""
    lineno = 0
    while line := _read_some(path, text.readline, limit + 1):
        lineno += 1
        if len(line) > limit and not line.endswith(("\n", "\r")):
            raise over_cap(path, f"line {lineno}", LINE_CAP)
        yield line


def _iter_csv(path: Path) -> Iterator[RawRow]:
    limit = cap(LINE_CAP)
    csv.field_size_limit(limit)
    delimiter = "\t" if path.name.lower().removesuffix(".gz").endswith(".tsv") else ","
    with _open_binary(path) as handle:
        text = io.TextIOWrapper(handle, encoding="utf-8-sig", errors="surrogateescape", newline="")
        reader = csv.reader(_csv_lines(path, text, limit), delimiter=delimiter)
        try:
            header = next(reader, None)
            if header is None:
                return
            header = [h.strip() for h in header]
            last = reader.line_num
            for cells in reader:
                start, last = last + 1, reader.line_num
                if not cells or not any(c.strip() for c in cells):
                    continue
                shown = truncate_raw(delimiter.join(cells))
                if len(cells) != len(header):
                    yield start, _Bad(ReasonCode.MALFORMED_ROW, f"{len(cells)} fields, the header has {len(header)}"), shown
                    continue
                bad_col = next((h for h, c in zip(header, cells) if _SURROGATE.search(c)), None)
                if bad_col is not None:
                    yield start, _Bad(ReasonCode.INVALID_TEXT, f"{bad_col} is not valid UTF-8"), shown
                    continue
                yield start, {h: _csv_cell(h, c) for h, c in zip(header, cells)}, shown
        except csv.Error as exc:
            raise FeedbackFileError(path, f"CSV error near line {reader.line_num}: {exc}") from exc


def _iter_parquet(path: Path, chunk_rows: int) -> Iterator[RawRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    handle = _open_binary(path)
    try:
        source: Any = handle
        if not handle.seekable():  # gzipped: Parquet needs seeking, so it is inflated to a temporary file
            source = tempfile.TemporaryFile(prefix="feedback-parquet-")
            try:
                shutil.copyfileobj(handle, source, 1 << 20)
            except (OSError, EOFError, zlib.error) as exc:
                raise _stream_error(path, exc) from exc
            source.seek(0)
        try:
            pf = pq.ParquetFile(source)
            limit = cap(DOCUMENT_CAP)
            for group in range(pf.metadata.num_row_groups):  # a row group is read whole
                if pf.metadata.row_group(group).total_byte_size > limit:
                    raise over_cap(path, f"Parquet row group {group} (uncompressed)", DOCUMENT_CAP)
            index = 0
            for batch in pf.iter_batches(batch_size=max(1, min(chunk_rows, 1 << 20))):
                for obj in batch.to_pylist():
                    index += 1
                    yield index, obj, None
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise FeedbackFileError(path, f"cannot read Parquet: {exc}") from exc
    finally:
        handle.close()
        if source is not handle:
            source.close()


def _iter_rows(path: Path, chunk_rows: int) -> Iterator[RawRow]:
    fmt = _detect_format(path, _sniff(path))
    if fmt == "parquet":
        return _iter_parquet(path, chunk_rows)
    if fmt == "csv":
        return _iter_csv(path)
    if fmt in ("json", "json-object"):
        return _iter_json(path, fmt)
    return _iter_jsonl(path)


# --------------------------------------------------------------------------- chunks


def _raw_text(obj: Any) -> str:
    """A parsed row shown as JSON (truncated); a value JSON cannot show (an integer too long to convert,
    nesting too deep) is named instead."""
    try:
        return truncate_raw(json.dumps(obj, ensure_ascii=False, default=str))
    except (TypeError, ValueError, RecursionError) as exc:
        return truncate_raw(f"<{type(obj).__name__} not shown: {exc}>")


def _message(exc: Exception) -> str:
    """An exception's message, cut short (it may quote the row)."""
    return str(exc)[:200]


def _keys_of(obj: dict) -> str:
    return ", ".join(sorted(map(str, obj.keys())))[:200] or "none"


def _convert_chunk(source: str, chunk: list[RawRow], layout: str) -> ImportResult:
    kind = LAYOUTS[layout][0]
    records: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    raw_lines: dict[int, str] = {}
    for row, obj, shown in chunk:
        if isinstance(obj, _Bad):
            rejected.append({"row": row, "reason": obj.reason, "detail": obj.detail, "raw": shown or ""})
            continue
        try:
            if not isinstance(obj, dict):
                raise RowError(ReasonCode.NOT_AN_OBJECT, f"a row must be a JSON object, got {type(obj).__name__}")
            row_layout = layout if _loose_match(layout, obj) else detect_layout(obj)
            if row_layout is None:
                raise RowError(ReasonCode.UNKNOWN_LAYOUT, f"no known layout matches this row (keys: {_keys_of(obj)})")
            row_kind, convert = LAYOUTS[row_layout]
            if row_kind != kind:
                raise RowError(
                    ReasonCode.LAYOUT_MISMATCH,
                    f"row looks like layout {row_layout!r} ({row_kind}) but the file is {layout!r} ({kind})",
                )
            rec = convert(obj)
        except RowError as err:
            rejected.append({"row": row, "reason": err.reason, "detail": err.detail, "raw": shown if shown is not None else _raw_text(obj)})
            continue
        except Exception as exc:  # noqa: BLE001 - whatever one row raises is that row's reason, never the batch's
            rejected.append({"row": row, "reason": ReasonCode.WRONG_TYPE, "raw": shown if shown is not None else _raw_text(obj),
                             "detail": f"cannot convert the row ({type(exc).__name__}: {_message(exc)})"})
            continue
        rec["row"] = row
        records.append(rec)
        raw_lines[row] = shown if shown is not None else _raw_text(obj)
    return ImportResult(
        source=source,
        rows=len(chunk),
        records=records_frame(records, kind),
        rejected=quarantine_frame(rejected),
        raw_lines=raw_lines,
        kind=kind,  # type: ignore[arg-type]
        layout=layout,
    )


def layout_counts(rows: list[RawRow]) -> Counter:
    """How many rows of a chunk have each layout (rows that are not objects, or match none, not counted)."""
    counts = Counter(detect_layout(obj) for _, obj, _ in rows if isinstance(obj, dict))
    counts.pop(None, None)
    return counts


def majority_layout(counts: Counter) -> str | None:
    if not counts:
        return None
    order = list(LAYOUTS)
    return max(counts, key=lambda k: (counts[k], -order.index(k)))


def field_names(rows: list[RawRow]) -> Iterator[str]:
    return (k for _, obj, _ in rows if isinstance(obj, dict) for k in map(str, obj.keys()))


def with_layout(path: Path, chunks: Iterator, layout: str | None, counts_of: Callable[[Any], Counter],
                fields_of: Callable[[Any], Iterator[str]]) -> Iterator[tuple[Any, str | None]]:
    """(chunk, layout) for each chunk of a file, in order, as soon as the file's layout is known: the
    override, else the majority layout of the first chunks that have any recognisable row
    (`counts_of(chunk)`). A file whose rows parse but match no layout is a FeedbackFileError; the chunks of
    a file with no object at all come with None (every row is quarantined as it is)."""
    pending: list = []
    counts: Counter = Counter()
    chosen = layout
    fields: Counter[str] = Counter()
    for chunk in chunks:
        if chosen is None:
            pending.append(chunk)
            counts += counts_of(chunk)
            chosen = majority_layout(counts)
            if chosen is None:
                fields.update(fields_of(chunk))
                continue
        for item in pending or [chunk]:
            yield item, chosen
        pending = []
    if chosen is None and fields:
        found = ", ".join(f for f, _ in fields.most_common(20))
        raise FeedbackFileError(
            path,
            f"no row matches a known layout (fields found: {found}); "
            f"pass layout= one of: {', '.join(LAYOUTS)}",
        )
    for item in pending:
        yield item, None


def _batched(rows: Iterator[RawRow], size: int) -> Iterator[list[RawRow]]:
    chunk: list[RawRow] = []
    for item in rows:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def iter_feedback_chunks(
    path: str | Path, layout: str | None = None, chunk_rows: int = 50_000
) -> Iterator[ImportResult]:
    """Read a feedback file chunk by chunk (at most `chunk_rows` input rows each; row numbers
    global). Yields at least one (possibly empty) result. Without an override the layout is the
    majority layout of the first chunk that has any recognisable row."""
    path = Path(path)
    _check_layout(layout)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    source = str(path)
    yielded = False
    for chunk, chosen in with_layout(path, _batched(_iter_rows(path, chunk_rows), chunk_rows), layout,
                                     layout_counts, field_names):
        result = _convert_chunk(source, chunk, chosen or "pairwise")
        result.layout = chosen or "none"  # none: nothing parsed as an object, every row quarantined as it is
        yield result
        yielded = True
    if not yielded:
        result = _convert_chunk(source, [], layout or "pairwise")
        result.layout = layout or "none"
        yield result


def read_feedback_file(path: str | Path, layout: str | None = None) -> ImportResult:
    """Read a whole feedback file; every row ends in `records` or `rejected` (see module doc)."""
    (result,) = iter_feedback_chunks(path, layout=layout, chunk_rows=1 << 62)
    return result
