"""Raw rows of a feedback file in chunks, converted with the file's layout into records.

One file = one kind. The file's layout is the override, or the most common layout among the
parseable rows (of the first chunk that has any). A row of another layout of the same kind
is converted with its own layout; a row of another kind is quarantined as LAYOUT_MISMATCH; a
row matching no layout as UNKNOWN_LAYOUT. A file where no row matches any layout is a
FeedbackFileError naming the file and the fields found.

A row that cannot be converted goes to `rejected` with a ReasonCode and its row number;
it never stops the file: whatever one row's parsing or conversion raises is that row's reason.
Content checks (blank text, identical answers, too long, control characters, duplicates, PII)
are the validation's job: a `Chunk` (records as Arrow) is what it routes.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from alignment_pipelines.data import columnar
from alignment_pipelines.data.columnar import COMPLETION_FIELDS

from alignment_pipelines.data.ingest.formats import BadRow, FeedbackFileError, RawRow, iter_rows
from alignment_pipelines.data.ingest.layouts import LAYOUTS, check_layout, detect_layout, loose_match
from alignment_pipelines.data.schemas import (
    COLUMNS_BY_KIND,
    FeedbackKind,
    ReasonCode,
    RowError,
    as_messages,
    quarantine_frame,
    records_frame,
    truncate_raw,
)


@dataclass
class ImportResult:
    source: str  # the file path
    rows: int  # number of input rows (non-blank lines)
    records: pd.DataFrame  # COLUMNS_BY_KIND[kind]
    rejected: pd.DataFrame  # QUARANTINE_COLUMNS
    # original text (truncated) of each converted row by line number, so that rows quarantined
    # later by validation can still show the line as it was in the file
    raw_lines: dict[int, str] = field(default_factory=dict, repr=False)
    kind: FeedbackKind = "pairwise"
    layout: str = "pairwise"  # the file's layout (detected or the override); "none" if no row parsed

    def __post_init__(self) -> None:
        assert len(self.records) + len(self.rejected) == self.rows, "every row must be accounted for"


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


def convert_chunk(source: str, chunk: list[RawRow], layout: str) -> ImportResult:
    kind = LAYOUTS[layout][0]
    records: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    raw_lines: dict[int, str] = {}
    for row, obj, shown in chunk:
        if isinstance(obj, BadRow):
            rejected.append({"row": row, "reason": obj.reason, "detail": obj.detail, "raw": shown or ""})
            continue
        try:
            if not isinstance(obj, dict):
                raise RowError(ReasonCode.NOT_AN_OBJECT, f"a row must be a JSON object, got {type(obj).__name__}")
            row_layout = layout if loose_match(layout, obj) else detect_layout(obj)
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
    check_layout(layout)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    source = str(path)
    yielded = False
    for chunk, chosen in with_layout(path, _batched(iter_rows(path, chunk_rows), chunk_rows), layout,
                                     layout_counts, field_names):
        result = convert_chunk(source, chunk, chosen or "pairwise")
        result.layout = chosen or "none"  # none: nothing parsed as an object, every row quarantined as it is
        yield result
        yielded = True
    if not yielded:
        result = convert_chunk(source, [], layout or "pairwise")
        result.layout = layout or "none"
        yield result


def read_feedback_file(path: str | Path, layout: str | None = None) -> ImportResult:
    """Read a whole feedback file; every row ends in `records` or `rejected` (see module doc)."""
    (result,) = iter_feedback_chunks(path, layout=layout, chunk_rows=1 << 62)
    return result


# --------------------------------------------------------------------------- records as Arrow

_SURROGATES = re.compile(r"[\ud800-\udfff]")


def _clean(value: Any) -> str:
    """A str Arrow can hold: lone surrogates become U+FFFD (which the text rule quarantines)."""
    text = value if isinstance(value, str) else str(value)
    return _SURROGATES.sub("\ufffd", text) if _SURROGATES.search(text) else text


def records_to_arrow(records: pd.DataFrame, kind: str) -> tuple[pa.Table, np.ndarray | None]:
    """Records (Python objects, as the importers give them) as the Arrow table the rules run on, and for
    binary records whether each label is a boolean. Values are as `derived_frame` sees them."""
    columns = COLUMNS_BY_KIND[kind]
    data: dict[str, pa.Array] = {"row": pa.array(records["row"].to_numpy(dtype=np.int64), type=pa.int64())}
    prompts = [[{"role": _clean(m["role"]), "content": _clean(m["content"])} for m in as_messages(p)]
               for p in records["prompt"].tolist()]
    data["prompt"] = pa.array(prompts, type=columnar.PROMPT_TYPE)
    for col in COMPLETION_FIELDS[kind]:
        data[col] = pa.array(["" if v is None else _clean(v) for v in records[col].tolist()], type=pa.string())
    label_ok = None
    if kind == "binary":
        labels = records["label"].tolist()
        label_ok = np.fromiter((isinstance(v, (bool, np.bool_)) for v in labels), dtype=bool, count=len(labels))
        data["label"] = pa.array([bool(v) if ok else None for v, ok in zip(labels, label_ok)], type=pa.bool_())
    return pa.table({c: data[c] for c in columns}), label_ok


@dataclass
class Chunk:
    """One chunk of a batch, ready for routing. `table` holds the records (COLUMNS_BY_KIND[kind]) that
    the importer produced, in row order; `rejected` the rows the importer could not convert; `raw`
    gives the original line (truncated) of converted rows by row number."""

    source: str
    kind: str
    layout: str
    rows: int
    table: pa.Table
    rejected: list[dict] = field(default_factory=list)
    raw: Callable[[list[int]], list[str]] = lambda rows: [""] * len(rows)
    label_ok: np.ndarray | None = None
    pii_rows: dict[int, Counter] | None = None
    pii: dict | None = None
    original: pd.DataFrame | None = None  # the importer's records (Python objects), when there is one


def raw_from_records(records: pd.DataFrame, raw_lines: dict[int, str]) -> Callable[[list[int]], list[str]]:
    """The quarantine's `raw` for converted rows: the original line, else the record as JSON."""
    def raw(rows: list[int]) -> list[str]:
        out = []
        by_row = None
        for row in rows:
            text = raw_lines.get(row)
            if not text:
                if by_row is None:
                    by_row = {int(r["row"]): r for r in records.to_dict("records")}
                rec = by_row[row]
                text = truncate_raw(_raw_json(rec))
            out.append(text)
        return out

    return raw


def _raw_json(rec: dict[str, Any]) -> str:
    out = {k: ([dict(m) for m in as_messages(v)] if k == "prompt" else v) for k, v in rec.items() if k != "row"}
    return json.dumps(out, ensure_ascii=False, default=str)
