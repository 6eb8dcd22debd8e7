"""Feedback files (JSONL, JSON, CSV/TSV, Parquet; any of them gzipped) read as raw rows.

Formats are recognised from the content first (gzip and Parquet magic bytes, a JSON array's
"["), then from the name (.csv/.tsv, .parquet). Binary data that is none of these is a
FeedbackFileError ("not a text feedback file"), not a file of quarantined rows.

JSONL, CSV and Parquet are streamed row by row; a JSON document (array or object) is parsed from memory,
element by element, so a truncated array keeps the elements before the break and quarantines the rest as
one row. Each reader yields `RawRow`s: (row number, parsed object or `BadRow`, the original text).

What one file may cost is capped (`cap`, environment variables): the bytes a gzipped file inflates to, the
length of a line (a longer JSONL line is read past and quarantined TOO_LONG; a longer CSV line is a
FeedbackFileError), and what is read whole (a JSON document, a Parquet row group). A gzipped Parquet file
is inflated to a temporary file, not into memory. Row numbers are 1-based: the line for JSONL, the line where the
record starts for CSV, the element index for JSON arrays and Parquet. An integer too long for Python to
convert is read as a HugeInteger, which no field accepts.
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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from alignment_pipelines.data.ingest.layouts import detect_layout
from alignment_pipelines.data.schemas import ReasonCode, truncate_raw

GZIP_MAGIC = b"\x1f\x8b"


class FeedbackFileError(Exception):
    """The file itself cannot be read (missing, a directory, unreadable, corrupt gzip)."""

    def __init__(self, path: str | Path, message: str):
        self.path = str(path)
        self.message = message
        super().__init__(f"{path}: {message}")



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
class BadRow:
    """A row that failed before it became a Python object (JSON, UTF-8, CSV shape)."""

    reason: ReasonCode
    detail: str


# (row number, parsed object or BadRow, original text truncated or None = derive from object)
RawRow = tuple[int, Any, "str | None"]


def open_binary(path: Path) -> IO[bytes]:
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


def sniff(path: Path) -> bytes:
    with open_binary(path) as handle:
        return _read(path, handle, SNIFF_BYTES)


def _looks_binary(sample: bytes) -> str | None:
    if not sample:
        return None
    text = sample.decode("utf-8", errors="replace")
    bad = sum(1 for ch in text if ch == "\ufffd" or (ord(ch) < 32 and ch not in "\t\n\r\f") or ord(ch) == 127)
    if bad > 0.1 * len(text):
        return f"{100 * bad / len(text):.0f}% of the first {len(sample):,} bytes are not text"
    return None


def detect_format(path: Path, sample: bytes) -> str:
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


def decode_line(raw_bytes: bytes, lineno: int) -> tuple[str | None, BadRow | None, str]:
    try:
        text = raw_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        shown = truncate_raw(raw_bytes[: 4 * 2000].decode("utf-8", errors="replace"))
        return None, BadRow(ReasonCode.INVALID_TEXT, f"line is not valid UTF-8 ({exc.reason} at byte {exc.start})"), shown
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
        return lineno, BadRow(ReasonCode.TOO_LONG, detail), truncate_raw(self.head.decode("utf-8", errors="replace"))


def _capped_lines(path: Path, handle: IO[bytes]) -> Iterator[bytes | LongLine]:
    """The lines of a binary stream, each read under the line cap: a longer one is read past in 1 MiB pieces
    and given as a LongLine, so no line is ever held whole beyond the cap."""
    limit = cap(LINE_CAP)
    read = handle.readline
    while True:
        line = read_some(path, read, limit + 1)
        if not line:
            return
        if len(line) <= limit or line.endswith(b"\n"):
            yield line
            continue
        length, piece = len(line), line
        while piece and not piece.endswith(b"\n"):
            piece = read_some(path, read, 1 << 20)
            length += len(piece)
        yield LongLine(line[:LongLine.HEAD_BYTES], length)


def read_some(path: Path, read: Callable[[int], Any], size: int) -> Any:
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
        return lineno, BadRow(ReasonCode.INVALID_JSON, f"invalid JSON: {exc}"), truncate_raw(text)


def _iter_jsonl(path: Path) -> Iterator[RawRow]:
    with open_binary(path) as handle:
        for lineno, raw_bytes in enumerate(_capped_lines(path, handle), start=1):
            if isinstance(raw_bytes, LongLine):
                yield raw_bytes.row(lineno)
                continue
            if not raw_bytes.strip():
                continue
            text, bad, shown = decode_line(raw_bytes.rstrip(b"\n"), lineno)
            if bad is not None:
                yield lineno, bad, shown
                continue
            yield parse_json(text, lineno)


def _read_text(path: Path) -> str:
    """A JSON document, read whole: under the document cap."""
    limit = cap(DOCUMENT_CAP)
    with open_binary(path) as handle:
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
            yield index, BadRow(ReasonCode.INVALID_JSON, f"invalid JSON array element (rest of the file not parsed): {exc}"), truncate_raw(text[pos:])
            return
        yield index, obj, None
        pos = _WS.match(text, end).end()
        if text.startswith(",", pos):
            pos = _WS.match(text, pos + 1).end()
            continue
        if text.startswith("]", pos):
            rest = text[pos + 1 :].strip()
            if rest:
                yield index + 1, BadRow(ReasonCode.INVALID_JSON, "extra data after the JSON array"), truncate_raw(rest)
            return
        detail = "JSON array ends without ']'" if pos >= len(text) else f"expected ',' or ']' at char {pos}"
        yield index + 1, BadRow(ReasonCode.INVALID_JSON, f"invalid JSON array: {detail}"), truncate_raw(text[pos:])
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
    while line := read_some(path, text.readline, limit + 1):
        lineno += 1
        if len(line) > limit and not line.endswith(("\n", "\r")):
            raise over_cap(path, f"line {lineno}", LINE_CAP)
        yield line


def _iter_csv(path: Path) -> Iterator[RawRow]:
    limit = cap(LINE_CAP)
    csv.field_size_limit(limit)
    delimiter = "\t" if path.name.lower().removesuffix(".gz").endswith(".tsv") else ","
    with open_binary(path) as handle:
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
                    yield start, BadRow(ReasonCode.MALFORMED_ROW, f"{len(cells)} fields, the header has {len(header)}"), shown
                    continue
                bad_col = next((h for h, c in zip(header, cells) if _SURROGATE.search(c)), None)
                if bad_col is not None:
                    yield start, BadRow(ReasonCode.INVALID_TEXT, f"{bad_col} is not valid UTF-8"), shown
                    continue
                yield start, {h: _csv_cell(h, c) for h, c in zip(header, cells)}, shown
        except csv.Error as exc:
            raise FeedbackFileError(path, f"CSV error near line {reader.line_num}: {exc}") from exc


def _iter_parquet(path: Path, chunk_rows: int) -> Iterator[RawRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    handle = open_binary(path)
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


def iter_rows(path: Path, chunk_rows: int) -> Iterator[RawRow]:
    fmt = detect_format(path, sniff(path))
    if fmt == "parquet":
        return _iter_parquet(path, chunk_rows)
    if fmt == "csv":
        return _iter_csv(path)
    if fmt in ("json", "json-object"):
        return _iter_json(path, fmt)
    return _iter_jsonl(path)

