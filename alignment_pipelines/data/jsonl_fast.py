"""JSON Lines feedback read at Arrow speed, with the importer's exact per-row outcomes.

A JSONL batch is read in large byte blocks and cut into lines with numpy (line numbers kept). Each line
is then either
- **plain**: a JSON object in exactly one of two shapes, checked by one RE2 pattern per shape over the
  raw line (no duplicate or extra keys, string values only, roles valid, the prompt ending with a user
  turn, one assistant answer) - `{"prompt": "…", "chosen": "…", "rejected": "…"}` or the conversational
  `{"prompt": [{"role", "content"}…], "chosen": [{"role": "assistant", …}], "rejected": […]}`. Plain
  lines are parsed by Arrow's JSON reader, all at once, into the records the importer would give;
- **anything else** (another shape, broken JSON, invalid UTF-8, a lone surrogate escape, the first
  line, which may carry a BOM): parsed and converted row by row by `importers`, as before.
Plain lines only occur in pairwise files whose layout is pairwise, conversational or hh-rlhf, where
the importer converts them with the same function, so the records are the same either way; the
choice of the file's layout (the majority of the first chunk) counts plain lines by their shape.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from alignment_pipelines.data import columnar, importers
from alignment_pipelines.data.routing import Chunk, records_to_arrow
from alignment_pipelines.data.schemas import truncate_raw

BLOCK_BYTES = 16 << 20
_WS = r"[ \t\r]*"
_STR = (r'"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u(?:[0-9a-cA-CefEF][0-9a-fA-F]{3}|[dD][0-7][0-9a-fA-F]{2}))*"')


def _msg(role: str) -> str:
    return (rf'\{{{_WS}"role"{_WS}:{_WS}{role}{_WS},{_WS}"content"{_WS}:{_WS}{_STR}{_WS}\}}')


_ANY_ROLE = '"(?:system|user|assistant)"'
CONVERSATIONAL = (
    rf'^{_WS}\{{{_WS}"prompt"{_WS}:{_WS}\[{_WS}(?:{_msg(_ANY_ROLE)}{_WS},{_WS})*{_msg(chr(34) + "user" + chr(34))}{_WS}\]'
    rf'{_WS},{_WS}"chosen"{_WS}:{_WS}\[{_WS}{_msg(chr(34) + "assistant" + chr(34))}{_WS}\]'
    rf'{_WS},{_WS}"rejected"{_WS}:{_WS}\[{_WS}{_msg(chr(34) + "assistant" + chr(34))}{_WS}\]{_WS}\}}[ \t\r\n]*$'
)
PAIRWISE = (
    rf'^{_WS}\{{{_WS}"prompt"{_WS}:{_WS}{_STR}{_WS},{_WS}"chosen"{_WS}:{_WS}{_STR}{_WS},'
    rf'{_WS}"rejected"{_WS}:{_WS}{_STR}{_WS}\}}[ \t\r\n]*$'
)
_BLANK = r"^[ \t\n\r\x0b\x0c]*$"
_PLAIN_LAYOUTS = ("pairwise", "conversational", "hh-rlhf")
_SCHEMA_CONV = pa.schema([("prompt", columnar.PROMPT_TYPE), ("chosen", columnar.PROMPT_TYPE),
                          ("rejected", columnar.PROMPT_TYPE)])
_SCHEMA_PAIR = pa.schema([("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string())])


@dataclass
class _Lines:
    """Non-blank lines: 1-based line numbers, the text (with its newline; "" where not UTF-8) and,
    where it is not valid UTF-8, the bytes."""

    rows: np.ndarray
    text: pa.Array
    bad_utf8: dict[int, bytes]

    def __len__(self) -> int:
        return len(self.rows)


def _blocks(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number before the block, bytes of whole lines each ending in a newline)."""
    handle = importers._open_binary(path)
    try:
        carry = b""
        line_base = 0
        for data in importers._guard(path, iter(lambda: handle.read(BLOCK_BYTES), b"")):
            data = carry + data
            cut = data.rfind(b"\n") + 1
            carry = data[cut:]
            if cut:
                yield line_base, data[:cut]
                line_base += data.count(b"\n", 0, cut)
        if carry:
            yield line_base, carry + b"\n"
    finally:
        handle.close()


def _lines(line_base: int, block: bytes) -> _Lines:
    buf = np.frombuffer(block, dtype=np.uint8)
    ends = np.flatnonzero(buf == 10) + 1
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
    blank = pc.match_substring_regex(text, _BLANK).to_numpy(zero_copy_only=False)
    for row, b in list(bad.items()):  # an invalid line is blank only if its bytes are
        if b.strip():
            blank[row - line_base - 1] = False
        else:
            bad.pop(row)
    keep = np.flatnonzero(~blank)
    if len(keep) == n:
        return _Lines(rows, text, bad)
    return _Lines(rows[keep], text.take(pa.array(keep)), bad)


def _row_chunks(path: Path, chunk_rows: int) -> Iterator[_Lines]:
    """Non-blank lines in chunks of at most `chunk_rows`."""
    pending: list[_Lines] = []
    size = 0
    for line_base, block in _blocks(path):
        lines = _lines(line_base, block)
        pending.append(lines)
        size += len(lines)
        while size >= chunk_rows:
            merged = _concat(pending)
            yield _slice(merged, 0, chunk_rows)
            rest = _slice(merged, chunk_rows, len(merged))
            pending, size = ([rest], len(rest)) if len(rest) else ([], 0)
    if size:
        yield _concat(pending)


def _concat(parts: list[_Lines]) -> _Lines:
    if len(parts) == 1:
        return parts[0]
    bad: dict[int, bytes] = {}
    for p in parts:
        bad.update(p.bad_utf8)
    return _Lines(np.concatenate([p.rows for p in parts]), pa.concat_arrays([p.text for p in parts]), bad)


def _slice(lines: _Lines, start: int, stop: int) -> _Lines:
    rows = lines.rows[start:stop]
    bad = {r: b for r, b in lines.bad_utf8.items() if len(rows) and rows[0] <= r <= rows[-1]}
    return _Lines(rows, lines.text.slice(start, stop - start), bad)


def _raw_row(row: int, text: str | None, raw_bytes: bytes | None) -> importers.RawRow:
    """What `importers._iter_jsonl` yields for one line."""
    if raw_bytes is not None:
        text, bad, shown = importers._decode_line(raw_bytes.rstrip(b"\n"), row)
        if bad is not None:
            return row, bad, shown
    else:
        text = text.rstrip("\n").rstrip("\r")
        if row == 1:
            text = text.removeprefix("\ufeff")
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        return row, importers._Bad(importers.ReasonCode.INVALID_JSON, f"invalid JSON: {exc}"), truncate_raw(text)
    return row, obj, truncate_raw(text)


@dataclass
class _Prepared:
    lines: _Lines
    plain_conv: np.ndarray  # indices into lines
    plain_pair: np.ndarray
    other: list[importers.RawRow]  # the rest, parsed
    other_index: np.ndarray


def _prepare(lines: _Lines) -> _Prepared:
    conv = pc.match_substring_regex(lines.text, CONVERSATIONAL).to_numpy(zero_copy_only=False).copy()
    pair = pc.match_substring_regex(lines.text, PAIRWISE).to_numpy(zero_copy_only=False).copy()
    plain_ok = lines.rows != 1
    if lines.bad_utf8:
        plain_ok &= ~np.isin(lines.rows, np.fromiter(lines.bad_utf8, dtype=np.int64))
    conv &= plain_ok
    pair &= plain_ok & ~conv
    other_index = np.flatnonzero(~(conv | pair))
    texts = _subset(lines.text, other_index).to_pylist() if len(other_index) else []
    other = []
    for i, text in zip(other_index.tolist(), texts):
        row = int(lines.rows[i])
        other.append(_raw_row(row, text, lines.bad_utf8.get(row)))
    return _Prepared(lines, np.flatnonzero(conv), np.flatnonzero(pair), other, other_index)


def _layout_counts(prep: _Prepared) -> Counter:
    counts = importers.layout_counts(prep.other)
    counts["conversational"] += len(prep.plain_conv)
    counts["pairwise"] += len(prep.plain_pair)
    return +counts


def _parse_plain(text: pa.Array, index: np.ndarray, schema: pa.Schema) -> pa.Table:
    """Arrow's JSON reader over the lines at `index` (plain lines of one shape): each run of consecutive
    lines is read straight from the block's buffer, without copying it."""
    import pyarrow.json as pj

    options = pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="error")
    offsets = np.frombuffer(text.buffers()[1], dtype=np.int32)[text.offset: text.offset + len(text) + 1]
    data = text.buffers()[2]
    breaks = np.flatnonzero(np.diff(index) != 1) + 1
    tables = []
    for run in np.split(index, breaks):
        start, stop = int(offsets[run[0]]), int(offsets[run[-1] + 1])
        tables.append(pj.read_json(pa.BufferReader(data.slice(start, stop - start)), parse_options=options))
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def _subset(arr: pa.Array, index: np.ndarray) -> pa.Array:
    """arr[index] (sorted indices); no copy when they are all the rows."""
    return arr if len(index) == len(arr) else arr.take(pa.array(index))


def _plain_records(prep: _Prepared) -> pa.Table:
    parts = []
    lines = prep.lines
    if len(prep.plain_conv):
        t = _parse_plain(lines.text, prep.plain_conv, _SCHEMA_CONV)
        parts.append(pa.table({
            "row": pa.array(lines.rows[prep.plain_conv], type=pa.int64()),
            "prompt": columnar.as_array(t.column("prompt")),
            "chosen": pc.list_element(columnar.as_array(t.column("chosen")), 0).field("content"),
            "rejected": pc.list_element(columnar.as_array(t.column("rejected")), 0).field("content"),
        }))
    if len(prep.plain_pair):
        t = _parse_plain(lines.text, prep.plain_pair, _SCHEMA_PAIR)
        n = t.num_rows
        prompt = pa.ListArray.from_arrays(
            pa.array(np.arange(n + 1, dtype=np.int32)),
            pa.StructArray.from_arrays([pa.array(["user"] * n, type=pa.string()),
                                        columnar.as_array(t.column("prompt"))], names=["role", "content"]))
        parts.append(pa.table({
            "row": pa.array(lines.rows[prep.plain_pair], type=pa.int64()),
            "prompt": prompt.cast(columnar.PROMPT_TYPE),
            "chosen": columnar.as_array(t.column("chosen")),
            "rejected": columnar.as_array(t.column("rejected")),
        }))
    return pa.concat_tables(parts) if len(parts) > 1 else parts[0]


@dataclass
class RawLines:
    """The quarantine's `raw` of a chunk's rows: the importer's text where it converted the row, else the
    line itself (plain lines). `lines` is left out when a chunk travels between processes."""

    converted: dict[int, str]
    lines: _Lines | None

    def __call__(self, rows: list[int]) -> list[str]:
        out = [self.converted.get(row) for row in rows]
        missing = [i for i, text in enumerate(out) if text is None]
        if missing and self.lines is not None:
            at = np.searchsorted(self.lines.rows, [rows[i] for i in missing])
            for i, line in zip(missing, self.lines.text.take(pa.array(at)).to_pylist()):
                out[i] = truncate_raw(line.rstrip("\n").rstrip("\r"))
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
    imported = importers._convert_chunk(source, rawrows, layout)
    kind = imported.kind
    table, label_ok = records_to_arrow(imported.records.reset_index(drop=True), kind)
    if plain:
        table = pa.concat_tables([_plain_records(prep).cast(table.schema), table])
        table = table.take(pc.sort_indices(table.column("row")))
    if label_ok is not None and plain:  # pragma: no cover - plain lines are pairwise only
        raise AssertionError("plain lines in a binary file")
    return Chunk(source=source, kind=kind, layout=layout, rows=len(lines), table=table,
                 rejected=imported.rejected.to_dict("records"), raw=RawLines(imported.raw_lines, lines if plain else None),
                 label_ok=label_ok,
                 original=None if plain else imported.records)


def iter_jsonl_chunks(path: str | Path, layout: str | None = None, chunk_rows: int = 50_000,
                      assess: Callable[[str, _Lines, str], Any] | None = None) -> Iterator[Any]:
    """`importers.iter_feedback_chunks` for a JSON Lines file, as routing chunks (see the module doc):
    the same rows, records, rejects, layout choice and errors. With `assess`, the chunks after the layout
    is known are handed to it as lines (`assess(source, lines, layout)`, e.g. a submission to a process
    pool) and what it returns is yielded in their place."""
    path = Path(path)
    importers._check_layout(layout)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    source = str(path)
    chosen = layout

    def prepared() -> Iterator[_Prepared | _Lines]:
        for lines in _row_chunks(path, chunk_rows):
            yield lines if assess is not None and chosen is not None else _prepare(lines)

    yielded = False
    for item, chosen in importers.with_layout(path, prepared(), layout, _layout_counts,
                                              lambda prep: importers.field_names(prep.other)):
        if assess is not None and chosen is not None:  # the chunks that decided the layout are read again there
            yield assess(source, item if isinstance(item, _Lines) else item.lines, chosen)
        else:
            chunk = _convert(source, item, chosen or "pairwise")
            chunk.layout = chosen or "none"
            yield chunk
        yielded = True
    if not yielded:
        imported = importers._convert_chunk(source, [], layout or "pairwise")
        table, label_ok = records_to_arrow(imported.records, imported.kind)
        yield Chunk(source=source, kind=imported.kind, layout=layout or "none", rows=0, table=table,
                    label_ok=label_ok, original=imported.records)


def compact(lines: _Lines) -> _Lines:
    """The lines with buffers of their own (a slice of a block would carry the whole block to a worker)."""
    text = lines.text
    offsets = np.frombuffer(text.buffers()[1], dtype=np.int32)[text.offset: text.offset + len(text) + 1]
    data = text.buffers()[2].slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
    text = pa.Array.from_buffers(pa.string(), len(text), [None, pa.py_buffer(offsets - offsets[0]),
                                                          pa.py_buffer(data.to_pybytes())])
    return _Lines(lines.rows, text, lines.bad_utf8)


def convert_lines(source: str, lines: _Lines, layout: str) -> Chunk:
    """One chunk of lines of a file whose layout is known, as a routing chunk."""
    return _convert(source, _prepare(lines), layout)
