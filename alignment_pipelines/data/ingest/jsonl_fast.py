"""JSON Lines feedback read at Arrow speed, with the importer's exact per-row outcomes.

A JSONL batch is read in large byte blocks and cut into lines with numpy (line numbers kept). Each line
is then either
- **plain**: a JSON object in exactly one of two shapes, decoded by msgspec straight into typed structs
  (`plain_lines`: no extra keys, string values only, roles valid, the prompt ending with a user turn, one
  assistant answer) - `{"prompt": "…", "chosen": "…", "rejected": "…"}` or the conversational
  `{"prompt": [{"role", "content"}…], "chosen": [{"role": "assistant", …}], "rejected": […]}` - into the
  records the importer would give, as Arrow columns for the whole chunk;
- **anything else** (another shape, broken JSON, invalid UTF-8, a lone surrogate escape, the first
  line, which may carry a BOM): parsed and converted row by row (`formats.parse_json`, `chunks`).
Plain lines only occur in pairwise files whose layout is pairwise, conversational or hh-rlhf, where
the importer converts them with the same function, so the records are the same either way; the
choice of the file's layout (the majority of the first chunk) counts plain lines by their shape.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from alignment_pipelines.data import columnar
from alignment_pipelines.data.ingest import formats
from alignment_pipelines.data.ingest.chunks import (Chunk, convert_chunk, field_names, layout_counts, records_to_arrow,
                                                    with_layout)
from alignment_pipelines.data.ingest.layouts import check_layout
from alignment_pipelines.data.ingest.plain_lines import PlainLines
from alignment_pipelines.data.schemas import truncate_raw

BLOCK_BYTES = 16 << 20
_BLANK_CHARS = " \t\n\r\x0b\x0c"  # what bytes.strip() removes: a line of only these is blank
_BLANK = f"^[{_BLANK_CHARS}]*$"
_BLANK_BYTES = np.frombuffer(_BLANK_CHARS.encode(), dtype=np.uint8)
_PLAIN_LAYOUTS = ("pairwise", "conversational", "hh-rlhf")


@dataclass
class _Lines:
    """Non-blank lines: 1-based line numbers, the text (with its newline; "" where not UTF-8) and,
    where it is not valid UTF-8, the bytes."""

    rows: np.ndarray
    text: pa.Array
    bad_utf8: dict[int, bytes]
    too_long: dict[int, formats.LongLine] = field(default_factory=dict)  # lines over the cap: quarantined unread

    def __len__(self) -> int:
        return len(self.rows)

    def texts(self, rows: list[int]) -> list[str]:
        """The lines of these rows, as the quarantine shows them."""
        at = np.searchsorted(self.rows, rows)
        return [_shown(line) for line in self.text.take(pa.array(at)).to_pylist()]


def _shown(line: str) -> str:
    """A plain line as the quarantine shows it: without its line ending, truncated."""
    return truncate_raw(line.rstrip("\n").rstrip("\r"))


@dataclass(frozen=True)
class LineRange:
    """The bytes of a chunk's lines in an uncompressed file: what a worker process reads for itself."""

    path: str
    line_base: int  # the line number before the range
    start: int
    stop: int
    long_line: formats.LongLine | None = None  # the range is this one line, over the cap: never read

    def read(self) -> tuple[_Lines, LineSpans]:
        """The range's non-blank lines, and where every line of it lies in the file."""
        if self.long_line is not None:
            ends = np.array([self.stop - self.start], dtype=np.int64)
            return _long_line(self.line_base, self.long_line), LineSpans(self.path, self.line_base, self.start, ends)
        with open(self.path, "rb") as handle:
            handle.seek(self.start)
            data = handle.read(self.stop - self.start)
        data = data if data.endswith(b"\n") else data + b"\n"
        ends = _line_ends(data)
        return _lines(self.line_base, data, ends), LineSpans(self.path, self.line_base, self.start, ends)


@dataclass
class LineSpans:
    """Where the lines of a range lie in its file (line `line_base + 1 + i` ends at `start + ends[i]`):
    the raw lines of a chunk assessed by a worker, read again only for the rows that are quarantined."""

    path: str
    line_base: int
    start: int
    ends: np.ndarray

    def texts(self, rows: list[int]) -> list[str]:
        out = []
        with open(self.path, "rb") as handle:
            for i in (np.asarray(rows, dtype=np.int64) - self.line_base - 1).tolist():
                begin = self.start + (int(self.ends[i - 1]) if i else 0)
                handle.seek(begin)
                out.append(_shown(handle.read(self.start + int(self.ends[i]) - begin).decode("utf-8", errors="replace")))
        return out


def _blocks(path: Path, reuse: bool = False) -> Iterator[tuple[int, memoryview | formats.LongLine]]:
    """(byte position in the file, bytes of whole lines each ending in a newline; the last line gets one if
    the file lacks it): the caller counts the lines, as it finds them anyway. Each block is read into memory
    of its own, once (the lines cut from it point into it), or with `reuse` into the same memory every time
    (for a caller done with a block before it asks for the next: no fresh pages to fault in). A line longer
    than the line cap comes alone, as a LongLine: read past, never held (nor copied again block after block)."""
    handle = formats.open_binary(path)
    limit = formats.cap(formats.LINE_CAP)
    try:
        carry = b""
        position = 0
        data = bytearray()
        while True:
            if not reuse or len(data) < len(carry) + BLOCK_BYTES:
                data = bytearray(len(carry) + BLOCK_BYTES)
            data[: len(carry)] = carry
            view = memoryview(data)[len(carry): len(carry) + BLOCK_BYTES]
            read = formats.read_some(path, handle.readinto, view)
            if not read:
                break
            size = len(carry) + read
            cut = data.rfind(b"\n", 0, size) + 1
            carry = bytes(data[cut:size])
            if cut:
                yield position, memoryview(data)[:cut]
                position += cut
            if len(carry) > limit:
                long_line, carry = _past_line(path, handle, carry)
                yield position, long_line
                position += long_line.length
        if carry:
            yield position, memoryview(carry + b"\n")
    finally:
        handle.close()


def _past_line(path: Path, handle, head: bytes) -> tuple[formats.LongLine, bytes]:
    """Read past the rest of a line that starts with `head` (no newline in it): the line, and the bytes
    after its newline in the last piece read."""
    length = len(head)
    while piece := formats.read_some(path, handle.read, 1 << 20):
        newline = piece.find(b"\n")
        if newline >= 0:
            return formats.LongLine(head[:formats.LongLine.HEAD_BYTES], length + newline + 1), piece[newline + 1:]
        length += len(piece)
    return formats.LongLine(head[:formats.LongLine.HEAD_BYTES], length), b""


def _long_line(line_base: int, long_line: formats.LongLine) -> _Lines:
    """The one line after `line_base`, over the cap: a row of its own, quarantined as too long."""
    row = line_base + 1
    return _Lines(np.array([row], dtype=np.int64), pa.array([""], pa.string()), {}, {row: long_line})


def _line_ends(block: bytes) -> np.ndarray:
    """Where each line of a block of whole lines ends (just after its newline)."""
    return np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 10) + 1


def _start_blank(block: bytes, begins: np.ndarray) -> np.ndarray:
    """Which of the lines starting at `begins` start with whitespace: the only ones that may be blank."""
    return np.flatnonzero(np.isin(np.frombuffer(block, dtype=np.uint8)[begins], _BLANK_BYTES))


def _lines(line_base: int, block: bytes, ends: np.ndarray) -> _Lines:
    """The non-blank lines of a block of whole lines, which end at `ends`."""
    offsets = np.concatenate([[0], ends]).astype(np.int32)
    n = len(ends)
    binary = pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(block)])
    rows = np.arange(line_base + 1, line_base + n + 1, dtype=np.int64)
    bad: dict[int, bytes] = {}
    try:
        text = binary.cast(pa.string())
    except pa.ArrowInvalid:
        raw = binary.to_pylist()
        valid = np.ones(n, dtype=bool)
        for i, b in enumerate(raw):
            try:
                b.decode("utf-8")
            except UnicodeDecodeError:
                valid[i] = False
        for i in np.flatnonzero(~valid).tolist():
            bad[int(rows[i])] = raw[i]
        text = pc.if_else(pa.array(valid), binary, pa.scalar(b"", pa.binary())).cast(pa.string())
    blank = np.zeros(n, dtype=bool)
    maybe = _start_blank(block, offsets[:-1])
    if len(maybe):
        blank[maybe] = pc.match_substring_regex(columnar.subset(text, maybe), _BLANK).to_numpy(zero_copy_only=False)
    too_long = {}
    over = np.diff(offsets) > formats.cap(formats.LINE_CAP) + 1  # read whole, yet over the cap (newline aside)
    for i in np.flatnonzero(over).tolist():
        begin, end = int(offsets[i]), int(offsets[i + 1])
        too_long[int(rows[i])] = formats.LongLine(bytes(block[begin:min(end, begin + formats.LongLine.HEAD_BYTES)]), end - begin)
        blank[i] = False
    for row, b in list(bad.items()):  # an invalid line is blank only if its bytes are
        if b.strip():
            blank[row - line_base - 1] = False
        else:
            bad.pop(row)
    keep = np.flatnonzero(~blank)
    if len(keep) == n:
        return _Lines(rows, text, bad, too_long)
    return _Lines(rows[keep], text.take(pa.array(keep)), bad, too_long)


def _row_chunks(path: Path, chunk_rows: int) -> Iterator[_Lines]:
    """Non-blank lines in chunks of at most `chunk_rows`."""
    pending: list[_Lines] = []
    size = line_base = 0
    for _, block in _blocks(path):
        if isinstance(block, formats.LongLine):
            lines = _long_line(line_base, block)
            line_base += 1
        else:
            ends = _line_ends(block)
            lines = _lines(line_base, block, ends)
            line_base += len(ends)
        pending.append(lines)
        size += len(lines)
        while size >= chunk_rows:
            merged = _concat(pending)
            yield _slice(merged, 0, chunk_rows)
            rest = _slice(merged, chunk_rows, len(merged))
            pending, size = ([rest], len(rest)) if len(rest) else ([], 0)
    if size:
        yield _concat(pending)


def _range_chunks(path: Path, chunk_rows: int) -> Iterator[LineRange]:
    """The chunks of `_row_chunks` (the same non-blank lines) as byte ranges of an uncompressed file, found
    without decoding a line: only lines that start with whitespace are looked at whole."""
    source = str(path)
    start = base = 0  # the open range's first byte and the line number before it
    need = chunk_rows  # the non-blank lines it still needs
    line_base = 0  # the line number before the block
    end = 0  # the byte after the last line read
    for position, block in _blocks(path, reuse=True):
        if isinstance(block, formats.LongLine):  # a range of its own, read by no one: the open range ends before it
            if need < chunk_rows:
                yield LineRange(source, base, start, position)
            yield LineRange(source, line_base, position, position + block.length, block)
            line_base += 1
            start = end = position + block.length
            base, need = line_base, chunk_rows
            continue
        end = position + len(block)
        ends = _line_ends(block)
        begins = np.concatenate([[0], ends[:-1]])
        counted = np.ones(len(ends), dtype=np.int64)
        for i in _start_blank(block, begins).tolist():
            counted[i] = bool(bytes(block[begins[i]:ends[i]]).strip())
        total = np.cumsum(counted)  # non-blank lines of this block up to each line
        used = 0
        while total[-1] - used >= need:
            last = int(np.searchsorted(total, used + need))  # the line that completes the range
            stop = position + int(ends[last])
            yield LineRange(source, base, start, stop)
            start, base, used, need = stop, line_base + last + 1, used + need, chunk_rows
        need -= int(total[-1]) - used
        line_base += len(ends)
    if need < chunk_rows:
        yield LineRange(source, base, start, end)


def _concat(parts: list[_Lines]) -> _Lines:
    if len(parts) == 1:
        return parts[0]
    bad: dict[int, bytes] = {}
    too_long: dict[int, formats.LongLine] = {}
    for p in parts:
        bad.update(p.bad_utf8)
        too_long.update(p.too_long)
    return _Lines(np.concatenate([p.rows for p in parts]), pa.concat_arrays([p.text for p in parts]), bad, too_long)


def _slice(lines: _Lines, start: int, stop: int) -> _Lines:
    rows = lines.rows[start:stop]

    def within(by_row: dict) -> dict:
        return {r: b for r, b in by_row.items() if len(rows) and rows[0] <= r <= rows[-1]}

    return _Lines(rows, lines.text.slice(start, stop - start), within(lines.bad_utf8), within(lines.too_long))


def _raw_row(row: int, text: str | None, raw_bytes: bytes | None) -> formats.RawRow:
    """What `formats.iter_jsonl` yields for one line."""
    if raw_bytes is not None:
        text, bad, shown = formats.decode_line(raw_bytes.rstrip(b"\n"), row)
        if bad is not None:
            return row, bad, shown
    else:
        text = text.rstrip("\n").rstrip("\r")
        if row == 1:
            text = text.removeprefix("\ufeff")
    return formats.parse_json(text, row)


@dataclass
class _Prepared:
    lines: _Lines
    plain_conv: np.ndarray  # indices into lines
    plain_pair: np.ndarray
    other: list[formats.RawRow]  # the rest, parsed
    other_index: np.ndarray
    range: LineRange | None = None  # where the lines were read, when a worker is to read them again
    columns: dict = field(default_factory=dict)  # prompt, chosen, rejected of the plain lines, in line order


def _prepare(lines: _Lines) -> _Prepared:
    """A chunk's lines: the plain ones decoded into their records' columns, the others parsed row by row."""
    readable = lines.rows != 1  # the first line may carry a BOM
    for odd in (lines.bad_utf8, lines.too_long):
        if odd:
            readable &= ~np.isin(lines.rows, np.fromiter(odd, dtype=np.int64))
    candidates = np.flatnonzero(readable)
    plain = PlainLines()
    if len(candidates):
        plain.read(candidates.tolist(), columnar.subset(lines.text, candidates).cast(pa.binary()).to_pylist())
    is_plain = np.zeros(len(lines), dtype=bool)
    is_plain[plain.index] = True
    other_index = np.flatnonzero(~is_plain)
    texts = columnar.subset(lines.text, other_index).to_pylist() if len(other_index) else []
    other = []
    for i, text in zip(other_index.tolist(), texts):
        row = int(lines.rows[i])
        long_line = lines.too_long.get(row)
        other.append(long_line.row(row) if long_line else _raw_row(row, text, lines.bad_utf8.get(row)))
    return _Prepared(lines, np.asarray(plain.conversational, dtype=np.int64), np.asarray(plain.flat, dtype=np.int64),
                     other, other_index, columns=plain.columns() if plain.index else {})


def _layout_counts(prep: _Prepared) -> Counter:
    counts = layout_counts(prep.other)
    counts["conversational"] += len(prep.plain_conv)
    counts["pairwise"] += len(prep.plain_pair)
    return +counts



def _plain_records(prep: _Prepared) -> pa.Table:
    """The records of the chunk's plain lines (their columns are in line order)."""
    index = np.sort(np.concatenate([prep.plain_conv, prep.plain_pair]))
    return pa.table({"row": pa.array(prep.lines.rows[index], type=pa.int64()), **prep.columns})


@dataclass
class RawLines:
    """The quarantine's `raw` of a chunk's rows: the importer's text where it converted the row, else the
    line itself (plain lines): from the chunk's lines, or read again from the file after a worker."""

    converted: dict[int, str]
    lines: _Lines | LineSpans | None

    def __call__(self, rows: list[int]) -> list[str]:
        out = [self.converted.get(row) for row in rows]
        missing = [i for i, text in enumerate(out) if text is None]
        if missing and self.lines is not None:
            for i, text in zip(missing, self.lines.texts([rows[i] for i in missing])):
                out[i] = text
        return [text or "" for text in out]


def _convert(source: str, prep: _Prepared, layout: str) -> Chunk:
    lines = prep.lines
    plain = layout in _PLAIN_LAYOUTS and (len(prep.plain_conv) or len(prep.plain_pair))
    rawrows = list(prep.other)
    if not plain and (len(prep.plain_conv) or len(prep.plain_pair)):
        idx = np.sort(np.concatenate([prep.plain_conv, prep.plain_pair]))
        texts = lines.text.take(pa.array(idx)).to_pylist()
        rawrows += [_raw_row(int(lines.rows[i]), t, None) for i, t in zip(idx.tolist(), texts)]
        rawrows.sort(key=lambda r: r[0])
    imported = convert_chunk(source, rawrows, layout)
    kind = imported.kind
    table, label_ok = records_to_arrow(imported.records.reset_index(drop=True), kind)
    if plain:
        table = pa.concat_tables([_plain_records(prep).cast(table.schema), table])
        rows = table.column("row").to_numpy()
        if np.any(rows[1:] < rows[:-1]):  # the importer's rows or the other shape's lines came after
            table = table.take(pc.sort_indices(table.column("row")))
    if label_ok is not None and plain:  # pragma: no cover - plain lines are pairwise only
        raise AssertionError("plain lines in a binary file")
    return Chunk(source=source, kind=kind, layout=layout, rows=len(lines), table=table,
                 rejected=imported.rejected.to_dict("records"), raw=RawLines(imported.raw_lines, lines if plain else None),
                 label_ok=label_ok,
                 original=None if plain else imported.records)


def iter_jsonl_chunks(path: str | Path, layout: str | None = None, chunk_rows: int = 50_000,
                      assess: Callable[[str, LineRange, str], Any] | None = None) -> Iterator[Any]:
    """`chunks.iter_feedback_chunks` for a JSON Lines file, as routing chunks (see the module doc):
    the same rows, records, rejects, layout choice and errors. With `assess` (for an uncompressed file),
    each chunk is handed to it as a byte range once the layout is known (`assess(source, range, layout)`,
    e.g. a submission to a process pool: `convert_range` reads it there) and what it returns is yielded in
    its place; the chunks that decide the layout are read here, and there again."""
    path = Path(path)
    check_layout(layout)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    source = str(path)
    chosen = layout

    def prepared() -> Iterator[_Prepared | LineRange]:  # `chosen` is set below before the next chunk is drawn
        if assess is None:
            yield from (_prepare(lines) for lines in _row_chunks(path, chunk_rows))
            return
        for line_range in _range_chunks(path, chunk_rows):
            if chosen is not None:
                yield line_range
            else:
                prep = _prepare(line_range.read()[0])
                prep.range = line_range
                yield prep

    yielded = False
    for item, chosen in with_layout(path, prepared(), layout, _layout_counts,
                                              lambda prep: field_names(prep.other)):
        if assess is not None and chosen is not None:
            yield assess(source, item if isinstance(item, LineRange) else item.range, chosen)
        else:
            chunk = _convert(source, item, chosen or "pairwise")
            chunk.layout = chosen or "none"
            yield chunk
        yielded = True
    if not yielded:
        imported = convert_chunk(source, [], layout or "pairwise")
        table, label_ok = records_to_arrow(imported.records, imported.kind)
        yield Chunk(source=source, kind=imported.kind, layout=layout or "none", rows=0, table=table,
                    label_ok=label_ok, original=imported.records)


def convert_range(source: str, line_range: LineRange, layout: str) -> Chunk:
    """One chunk of a file whose layout is known, read from its byte range, as a routing chunk (in a
    worker: its raw lines are left in the file, to be read again for the rows that are quarantined)."""
    lines, spans = line_range.read()
    chunk = _convert(source, _prepare(lines), layout)
    if chunk.raw.lines is not None:
        chunk.raw.lines = spans
    return chunk
