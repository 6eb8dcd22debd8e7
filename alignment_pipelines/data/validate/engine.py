"""The streaming validation engine: a feedback file of any format (JSONL, JSON, CSV/TSV, Parquet, gzipped or
not) read chunk by chunk (`ingest`), every row routed to accepted or quarantined (`router`), the outputs
streamed as they come. One engine for every caller: the assets, the command line, training's data loading.

- `validate_file_to_parquet`: accepted rows, quarantined rows (and the batch's key file) written to Parquet
  chunk by chunk (the gate reads them; the command line turns them into JSON Lines on request); memory
  bounded by the chunk size (plus 16 bytes per accepted row for duplicate detection). The outputs appear
  only when the whole file was read (written to temporary names, then renamed); a FeedbackFileError leaves
  none.
- `validate_file`: the same chunks gathered in memory (`ValidationResult`), for files that fit in it.

Every input row ends up accepted or quarantined with a ReasonCode: importer rejects as they are, then
the rules in order (`rules`: the first one a row fails is its reason), then exact duplicates among the
rows that pass (`row_key`; the first copy kept; across chunks and, with `known_keys`/`known_index`,
across batches). The batch gate (`gate`) is the Great Expectations suite the blocking check runs.

Token lengths: with `rules.tokenizer` (a local tokenizer folder or tokenizer.json) each
accepted row's prompt (rendered "role: content" turns) and completion(s) are measured with
that tokenizer. Over-length rows are ACCEPTED and counted in summary()["truncation"] (the
trainer truncates them) unless `quarantine_over_length=True`, which quarantines them as TOO_LONG.

PII (`rules.pii`): "off"; "redact" replaces e-mail addresses, phone numbers and card numbers
with [EMAIL]/[PHONE]/[CARD] before any other rule (and counts them); "quarantine" routes rows
containing any to the quarantine with reason PII.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from alignment_pipelines.data.datasets.splits import record_key
from alignment_pipelines.data.ingest import formats
from alignment_pipelines.data.ingest.chunks import (Chunk, ImportResult, iter_feedback_chunks, raw_from_records,
                                                    records_to_arrow)
from alignment_pipelines.data.ingest.jsonl_fast import iter_jsonl_chunks
from alignment_pipelines.data.schemas import COLUMNS_BY_KIND, QUARANTINE_COLUMNS, FeedbackKind, kind_of, quarantine_frame
from alignment_pipelines.data.validate.parallel import assessed_in_workers, prefetch
from alignment_pipelines.data.validate.pii import PII_TYPES, redact_pii, scan_records
from alignment_pipelines.data.validate.router import KeySet, Routed, route_chunk
from alignment_pipelines.data.validate.rules import (ValidationRules, add_truncation, defect_count, gate_result,
                                                     truncation_summary)


def row_key(record: dict[str, Any], kind: str) -> str:
    """Content hash (sha256 hex) of a record, for duplicates within and across batches."""
    return record_key(record, kind)


def row_keys(df: pd.DataFrame, kind: str | None = None) -> set[str]:
    """`row_key` of every record of a frame (e.g. accepted rows of earlier batches -> known_keys)."""
    kind = kind or kind_of(df)
    columns = COLUMNS_BY_KIND[kind][1:]
    return {record_key(dict(zip(columns, values)), kind) for values in zip(*(df[c] for c in columns))}


@dataclass
class ValidationResult:
    source: str
    rows: int
    accepted: pd.DataFrame  # COLUMNS_BY_KIND[kind]
    quarantined: pd.DataFrame  # QUARANTINE_COLUMNS
    kind: FeedbackKind = "pairwise"
    layout: str = "pairwise"
    truncation: dict | None = None  # see truncation_summary; None without a tokenizer
    pii: dict | None = None  # {"mode", "rows", "email", "phone", "card"}; None when off
    over_length_policy: str = "accept_and_count"

    def counts_by_reason(self) -> dict[str, int]:
        counts = self.quarantined["reason"].map(str).value_counts()
        return {str(k): int(v) for k, v in sorted(counts.items())}

    def summary(self) -> dict:
        return {
            "source": self.source,
            "kind": self.kind,
            "layout": self.layout,
            "rows": int(self.rows),
            "accepted": int(len(self.accepted)),
            "quarantined": int(len(self.quarantined)),
            "by_reason": self.counts_by_reason(),
            "truncation": truncation_summary(self.truncation, self.over_length_policy),
            "pii": self.pii,
            "over_length_policy": self.over_length_policy,
        }


# --------------------------------------------------------------------------- routing


def _chunk_from_import(imported: ImportResult, rules: ValidationRules) -> Chunk:
    """A routing chunk of an importer's result (PII screened or redacted first, as configured)."""
    kind = imported.kind
    records = imported.records.reset_index(drop=True)
    pii_rows = pii_summary = None
    if rules.pii != "off":
        records, pii_rows, counts = scan_records(records, kind, redact=rules.pii == "redact")
        pii_summary = {"mode": rules.pii, "rows": len(pii_rows), **{t: int(counts.get(t, 0)) for t in PII_TYPES}}
    table, label_ok = records_to_arrow(records, kind)
    return Chunk(source=imported.source, kind=kind, layout=imported.layout, rows=imported.rows, table=table,
                 rejected=imported.rejected.to_dict("records"), raw=raw_from_records(records, imported.raw_lines),
                 label_ok=label_ok, pii_rows=pii_rows, pii=pii_summary, original=records)


# an uncompressed JSONL file at least this large is assessed by worker processes, one chunk each, in parallel
PARALLEL_MIN_BYTES = 64 << 20


def _iter_chunks(path: str | Path, layout: str | None, chunk_rows: int, rules: ValidationRules,
                 workers: int | None = None):
    """(routing chunk, its `Assessment` or None) for each chunk of a feedback file. JSON Lines at Arrow
    speed (`ingest.jsonl_fast`): a large uncompressed file (`PARALLEL_MIN_BYTES`) is assessed by `workers`
    processes (default: one per CPU), each reading its chunks' bytes itself; a smaller or compressed one on
    this process with the next chunk read on a second thread; other formats (and PII screening, which
    rewrites records) through the row converters (`ingest.chunks`)."""
    p = Path(path)
    if rules.pii == "off" and p.is_file() and formats.detect_format(p, formats.sniff(p)) == "jsonl":
        workers = (os.cpu_count() or 1) if workers is None else workers
        if multiprocessing.current_process().daemon:  # a daemonic process may not start workers
            workers = 1
        with open(p, "rb") as handle:
            compressed = handle.read(2) == formats.GZIP_MAGIC  # its chunks are not byte ranges of the file
        if workers > 1 and not compressed and p.stat().st_size >= PARALLEL_MIN_BYTES:
            yield from assessed_in_workers(p, layout, chunk_rows, rules, workers)
        else:
            yield from ((chunk, None) for chunk in prefetch(iter_jsonl_chunks(p, layout=layout, chunk_rows=chunk_rows)))
        return
    for imported in iter_feedback_chunks(path, layout=layout, chunk_rows=chunk_rows):
        yield _chunk_from_import(imported, rules), None


def _quarantine(routed, rules: ValidationRules) -> pd.DataFrame:
    rows = routed.quarantine
    if rules.pii != "off":  # with screening on, no PII is persisted: not even in the quarantine
        rows = [{**q, "raw": redact_pii(str(q["raw"]))[0]} for q in rows]
    quarantined = quarantine_frame(rows)
    if len(quarantined):
        quarantined = quarantined.sort_values("row", kind="stable").reset_index(drop=True)[QUARANTINE_COLUMNS]
    return quarantined


def _accepted_frame(chunk: Chunk, routed) -> pd.DataFrame:
    kind = chunk.kind
    if chunk.original is not None:
        accepted = chunk.original[routed.accepted_mask].reset_index(drop=True)[COLUMNS_BY_KIND[kind]]
    else:
        from alignment_pipelines.data.records import arrow_to_records

        accepted = arrow_to_records(routed.accepted)
    if kind == "binary":
        accepted["label"] = accepted["label"].astype(bool)
    return accepted


def _result(chunk: Chunk, routed, rules: ValidationRules) -> ValidationResult:
    out = ValidationResult(
        source=chunk.source, rows=chunk.rows, accepted=_accepted_frame(chunk, routed),
        quarantined=_quarantine(routed, rules), kind=chunk.kind, layout=chunk.layout,  # type: ignore[arg-type]
        truncation=routed.truncation, pii=chunk.pii, over_length_policy=rules.over_length_policy)
    assert len(out.accepted) + len(out.quarantined) == out.rows, "validation must account for every row"
    return out


def _route(imported: ImportResult, rules: ValidationRules, known: KeySet | None = None,
           seen: KeySet | None = None) -> ValidationResult:
    chunk = _chunk_from_import(imported, rules)
    return _result(chunk, route_chunk(chunk, rules, known, seen), rules)


@dataclass
class _Tally:
    """The figures of a streamed validation, added up chunk by chunk: what its summary reports."""

    rows: int = 0
    accepted: int = 0
    quarantined: int = 0
    chunks: int = 0
    kind: str = "pairwise"
    layout: str = "none"
    by_reason: Counter = field(default_factory=Counter)
    samples: list[dict] = field(default_factory=list)  # the first 5 quarantined rows
    truncation: dict | None = None
    pii: dict | None = None

    def add(self, chunk: Chunk, routed: Routed, quarantined: pd.DataFrame) -> None:
        self.kind, self.layout = chunk.kind, chunk.layout
        for rec in quarantined.head(5 - len(self.samples)).to_dict("records") if len(self.samples) < 5 else []:
            self.samples.append({"row": int(rec["row"]), "reason": str(rec["reason"]), "detail": rec["detail"]})
        self.by_reason.update(quarantined["reason"].map(str).tolist())
        self.rows += chunk.rows
        self.accepted += routed.accepted.num_rows
        self.quarantined += len(quarantined)
        self.truncation = add_truncation(self.truncation, routed.truncation)
        if chunk.pii is not None:
            self.pii = dict(chunk.pii) if self.pii is None else {
                k: (v + chunk.pii[k] if isinstance(v, int) else v) for k, v in self.pii.items()}
        self.chunks += 1

    def check(self, path: str | Path) -> None:
        """The contract, checked every time: every row accepted or quarantined."""
        if self.accepted + self.quarantined != self.rows:
            raise AssertionError(f"{path}: rows lost in validation: {self.rows} in, {self.accepted} accepted, "
                                 f"{self.quarantined} quarantined")

    def summary(self, path: str | Path, rules: ValidationRules, chunk_rows: int) -> dict:
        defects = defect_count(self.by_reason)
        gate = gate_result(defects, self.rows - (self.quarantined - defects), rules)
        failed = [] if gate["success"] else [{**gate, "reason": str(gate["reason"])}]
        return {
            "source": str(path),
            "kind": self.kind,
            "layout": self.layout,
            "rows": self.rows,
            "accepted": self.accepted,
            "quarantined": self.quarantined,
            "by_reason": {str(k): int(v) for k, v in sorted(self.by_reason.items())},
            "truncation": truncation_summary(self.truncation, rules.over_length_policy),
            "pii": self.pii,
            "over_length_policy": rules.over_length_policy,
            "suite_success": bool(gate["success"]),
            "suite": {"failed": failed, "quarantine_fraction": gate["observed_value"]},
            "samples": self.samples,
            "chunks": self.chunks,
            "chunk_rows": chunk_rows,
        }


def _validated(path: str | Path, rules: ValidationRules, layout: str | None, known: Any, chunk_rows: int,
               workers: int | None) -> Iterator[tuple[Chunk, Routed, pd.DataFrame]]:
    """(chunk, its routing, its quarantined rows) for each chunk of a file, in file order: the engine."""
    seen = KeySet()
    for chunk, assessment in _iter_chunks(path, layout, chunk_rows, rules, workers):
        routed = route_chunk(chunk, rules, known, seen, assessment)
        yield chunk, routed, _quarantine(routed, rules)


def _known(known_keys: set[str] | None, known_index: Any) -> Any:
    """Keys of earlier batches: an index (`lookup(key64)`), or row keys (hex) as a KeySet."""
    return known_index if known_index is not None else (KeySet.from_hex(known_keys) if known_keys else None)


# --------------------------------------------------------------------------- public API


def validate_records(
    imported: ImportResult, rules: ValidationRules = ValidationRules(), known_keys: set[str] | None = None
) -> ValidationResult:
    """Route every row of one imported chunk to `accepted` or `quarantined` (with a ReasonCode)."""
    return _route(imported, rules, _known(known_keys, None), KeySet())


def validate_file(
    path: str | Path,
    rules: ValidationRules = ValidationRules(),
    layout: str | None = None,
    known_keys: set[str] | None = None,
    chunk_rows: int = 50_000,
) -> ValidationResult:
    """The engine's outcome gathered in memory: for files that fit in it (the outputs of
    `validate_file_to_parquet` hold the same rows)."""
    tally = _Tally()
    accepted: list[pd.DataFrame] = []
    quarantined: list[pd.DataFrame] = []
    for chunk, routed, q in _validated(path, rules, layout, _known(known_keys, None), chunk_rows, workers=1):
        tally.add(chunk, routed, q)
        accepted.append(_accepted_frame(chunk, routed))
        quarantined.append(q)
    tally.check(path)
    return ValidationResult(
        source=str(path), rows=tally.rows, accepted=pd.concat(accepted, ignore_index=True),
        quarantined=pd.concat(quarantined, ignore_index=True)[QUARANTINE_COLUMNS], kind=tally.kind,  # type: ignore[arg-type]
        layout=tally.layout, truncation=tally.truncation, pii=tally.pii, over_length_policy=rules.over_length_policy)


class _Outputs:
    """Output files written under temporary names (`.partial`) and renamed only once every row is written."""

    def __init__(self, paths: list[Path]):
        self.final = paths
        for p in paths:
            p.parent.mkdir(parents=True, exist_ok=True)
        self.partial = [p.with_name(p.name + ".partial") for p in paths]

    def discard(self) -> None:
        for p in self.partial:
            p.unlink(missing_ok=True)

    def publish(self) -> None:
        for tmp, final in zip(self.partial, self.final):
            os.replace(tmp, final)


class _ParquetSink:
    """Accepted rows (`write_records` format), quarantined rows (QUARANTINE_COLUMNS) and the accepted rows'
    keys (`key_index.KEYS_SCHEMA`, when asked) as Parquet."""

    def __init__(self, partial: list[Path]):
        self.partial, self.writers = partial, []

    def write(self, kind: str, routed: Routed, quarantined: pd.DataFrame) -> None:
        import pyarrow.parquet as pq

        from alignment_pipelines.data.datasets.key_index import KEYS_SCHEMA
        from alignment_pipelines.data.records import quarantine_schema, quarantine_table, records_schema

        if not self.writers:
            # texts are nearly all distinct: dictionary encoding would only cost time
            self.writers = [pq.ParquetWriter(self.partial[0], records_schema(kind), use_dictionary=["prompt.list.element.role"]),
                            pq.ParquetWriter(self.partial[1], quarantine_schema())]
            if len(self.partial) > 2:
                self.writers.append(pq.ParquetWriter(self.partial[2], KEYS_SCHEMA, use_dictionary=False))
        if routed.accepted.num_rows:
            self.writers[0].write_table(routed.accepted.cast(records_schema(kind)))
            if len(self.writers) > 2:
                self.writers[2].write_table(routed.keys.cast(KEYS_SCHEMA))
        if len(quarantined):
            self.writers[1].write_table(quarantine_table(quarantined))

    def close(self) -> None:
        for w in self.writers:
            w.close()


def validate_file_to_parquet(
    path: str | Path,
    accepted_path: str | Path,
    quarantine_path: str | Path,
    rules: ValidationRules = ValidationRules(),
    layout: str | None = None,
    known_keys: set[str] | None = None,
    chunk_rows: int = 50_000,
    keys_path: str | Path | None = None,
    known_index: Any = None,
    workers: int | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> dict:
    """Validate a file chunk by chunk, streaming accepted rows (`write_records` format) and quarantined rows
    (QUARANTINE_COLUMNS) to Parquet (see the module doc).

    Rows already accepted in earlier batches are duplicates: `known_keys` (row keys, hex) or
    `known_index` (an object whose `lookup(key64)` answers, e.g. `key_index.KeyIndex`). With
    `keys_path` the accepted rows' keys are written there too (`key_index.KEYS_SCHEMA`): the batch's
    entry in the key index. A large JSON Lines file is assessed by `workers` processes (default: one per CPU;
    1: none), with the same outcome. `on_chunk(rows)` hears of each chunk once its rows are written: a
    progress bar's step.

    Returns the summary: rows, accepted, quarantined, by_reason, kind, layout, truncation, pii,
    over_length_policy, suite_success (the row rules hold on the accepted rows by construction; this is
    the batch quarantine-fraction gate, recorded as data: the batch gate is `gate.run_expectation_suite`),
    suite (failed expectations), samples (<= 5 quarantined rows), chunks.
    """
    outputs = _Outputs([Path(accepted_path), Path(quarantine_path)] + ([Path(keys_path)] if keys_path else []))
    sink = _ParquetSink(outputs.partial)
    tally = _Tally()
    try:
        for chunk, routed, q in _validated(path, rules, layout, _known(known_keys, known_index), chunk_rows, workers):
            sink.write(chunk.kind, routed, q)
            tally.add(chunk, routed, q)
            if on_chunk is not None:
                on_chunk(chunk.rows)
        sink.close()
        tally.check(path)
    except BaseException:
        sink.close()
        outputs.discard()
        raise
    outputs.publish()
    return tally.summary(path, rules, chunk_rows)
