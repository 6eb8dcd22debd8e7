"""Validation of imported feedback with one Great Expectations 1.x suite per kind, used twice.

1. Row routing (`validate_records`, `validate_file_to_parquet`): the kind's suite runs over
   every imported record with result_format COMPLETE; each failing row is quarantined with the
   ReasonCode of the first expectation it fails (suite order). Exact duplicates among the
   passing rows are found with `row_key` (first copy kept; across chunks and, with `known_keys`,
   across batches). Importer rejects are quarantined as they are.
2. Batch gate (`run_expectation_suite`, what the blocking asset check runs on a batch's accepted
   rows): the same suite must pass on the accepted rows, plus uniqueness of the row key and a
   quarantine-fraction limit. `validate_file_to_parquet` also records the suite's per-chunk
   results in its summary (`suite_success`, `suite`), as data for people; what admits a batch to
   the training datasets is the check's recorded verdict.

Suites (in routing order):
  pairwise: non-empty last user turn / chosen / rejected; no control characters or invalid
            Unicode; at most max_chars; chosen != rejected
  binary:   non-empty last user turn / completion; text; max_chars; label is a boolean
  prompts:  non-empty last user turn; text; max_chars
  all:      [token bounds, if tokenizer and quarantine_over_length] [no PII, if pii="quarantine"]
            unique row key

Token lengths: with `rules.tokenizer` (a local tokenizer folder or tokenizer.json) each
accepted row's prompt (rendered "role: content" turns) and completion(s) are measured with
that tokenizer. Over-length rows are ACCEPTED and counted in summary()["truncation"] (the
trainer truncates them) unless `quarantine_over_length=True`, which quarantines them as TOO_LONG.

PII (`rules.pii`): "off"; "redact" replaces e-mail addresses, phone numbers and card numbers
with [EMAIL]/[PHONE]/[CARD] before any other rule (and counts them); "quarantine" routes rows
containing any to the quarantine with reason PII.

GX is imported lazily; one ephemeral context per process.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from alignment_pipelines.data import columnar

from alignment_pipelines.data.importers import ImportResult, iter_feedback_chunks, read_feedback_file
from alignment_pipelines.data.pii import PII_TYPES, find_pii, redact_pii
from alignment_pipelines.data.schemas import (
    COLUMNS_BY_KIND,
    QUARANTINE_COLUMNS,
    FeedbackKind,
    ReasonCode,
    as_messages,
    kind_of,
    quarantine_frame,
)
from alignment_pipelines.data.routing import (COMPLETION_FIELDS, TEXT_RULES, Chunk, derived_columns, raw_from_records,
                                              records_to_arrow, route_chunk)
from alignment_pipelines.data.splits import record_key
from alignment_pipelines.data.tokens import _WS_CLASS, token_counter

# C0 controls except tab/newline/carriage return, DEL, C1 controls and U+FFFD (which lone surrogates, from
# invalid UTF-8 or "\ud800" escapes, become before the rules run). Written with the characters themselves,
# so that Python's `re` and RE2 (Arrow, pandas' Arrow strings under GX) read the pattern alike.
CONTROL_CHARS = "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffd]"
# Python's `\S` (any character that is not str.isspace()), spelled out so RE2 means the same
NON_BLANK = f"[^{_WS_CLASS}]"
_SURROGATES = re.compile(r"[\ud800-\udfff]")
GATE_EXPECTATION = "expect_quarantine_fraction_to_be_at_most"
_TEXT = TEXT_RULES
KEY_COLUMN = {"pairwise": "pair_key", "binary": "feedback_key", "prompts": "prompt_key"}


def row_key(record: dict[str, Any], kind: str) -> str:
    """Content hash (sha256 hex) of a record, for duplicates within and across batches."""
    return record_key(record, kind)


def row_keys(df: pd.DataFrame, kind: str | None = None) -> set[str]:
    """`row_key` of every record of a frame (e.g. accepted rows of earlier batches -> known_keys)."""
    kind = kind or kind_of(df)
    columns = COLUMNS_BY_KIND[kind][1:]
    return {record_key(dict(zip(columns, values)), kind) for values in zip(*(df[c] for c in columns))}


@dataclass
class ValidationRules:
    max_chars: int = 20_000  # per field (rendered prompt / chosen / rejected / completion)
    max_quarantine_fraction: float = 0.5  # batch-level gate used by the blocking check
    tokenizer: str | None = None  # a local tokenizer folder (or tokenizer.json file)
    max_prompt_tokens: int = 1024
    max_completion_tokens: int = 1024
    quarantine_over_length: bool = False  # False: over-length rows are accepted and counted
    pii: Literal["off", "redact", "quarantine"] = "off"

    def __post_init__(self) -> None:
        if self.pii not in ("off", "redact", "quarantine"):
            raise ValueError(f"pii must be 'off', 'redact' or 'quarantine', got {self.pii!r}")

    @property
    def over_length_policy(self) -> str:
        return "quarantine" if self.quarantine_over_length else "accept_and_count"

    def suite_key(self, kind: str) -> tuple:
        tokens = (self.max_prompt_tokens, self.max_completion_tokens) if self._token_rule else None
        return (kind, self.max_chars, tokens, self.pii == "quarantine")

    @property
    def _token_rule(self) -> bool:
        return bool(self.tokenizer) and self.quarantine_over_length


@dataclass
class ValidationResult:
    source: str
    rows: int
    accepted: pd.DataFrame  # COLUMNS_BY_KIND[kind]
    quarantined: pd.DataFrame  # QUARANTINE_COLUMNS
    kind: FeedbackKind = "pairwise"
    layout: str = "pairwise"
    truncation: dict | None = None  # see _truncation_summary; None without a tokenizer
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
            "truncation": _truncation_summary(self.truncation, self.over_length_policy),
            "pii": self.pii,
            "over_length_policy": self.over_length_policy,
        }


@dataclass
class SuiteReport:
    success: bool
    # one per expectation: {"expectation", "column", "success", "unexpected_count", "reason"}
    results: list[dict] = field(default_factory=list)

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.results if not r["success"]]

    def markdown(self) -> str:
        lines = [
            "| expectation | column | success | unexpected | reason |",
            "|---|---|---|---|---|",
        ]
        for r in self.results:
            column = r["column"] if r["column"] is not None else ""
            if isinstance(column, (list, tuple)):
                column = ", ".join(column)
            mark = "✅" if r["success"] else "❌"
            lines.append(f"| {r['expectation']} | {column} | {mark} | {r['unexpected_count']} | {r['reason']} |")
        return "\n".join(lines)


# --------------------------------------------------------------------------- tokens

def load_token_counter(path: str):
    """A function texts (Arrow string array or list of str) -> token counts (int64 array), from a local
    tokenizer (tokenizer.json via `tokenizers`, else transformers' AutoTokenizer with local files only).
    Loaded once per path; see `tokens.TokenCounter`."""
    return token_counter(path).count


def _new_truncation(rules: ValidationRules) -> dict:
    return {
        "tokenizer": str(rules.tokenizer),
        "max_prompt_tokens": rules.max_prompt_tokens,
        "max_completion_tokens": rules.max_completion_tokens,
        "rows": 0,
        "prompt_over": 0,
        "completion_over": 0,
        "any_over": 0,
        "prompt_tokens_max": 0,
        "completion_tokens_max": 0,
        "prompt_tokens_sum": 0,
        "completion_tokens_sum": 0,
    }


def _add_truncation(acc: dict | None, other: dict | None) -> dict | None:
    if other is None:
        return acc
    if acc is None:
        return dict(other)
    for k, v in other.items():
        if k.endswith("_max"):
            acc[k] = max(acc[k], v)
        elif isinstance(v, int) and not k.startswith("max_"):
            acc[k] += v
    return acc


def _truncation_summary(t: dict | None, policy: str) -> dict | None:
    if t is None:
        return None
    n = t["rows"]

    def pct(x: int) -> float:
        return round(100.0 * x / n, 2) if n else 0.0

    return {
        "tokenizer": t["tokenizer"],
        "policy": policy,
        "measured_rows": n,  # accepted rows
        "max_prompt_tokens": t["max_prompt_tokens"],
        "max_completion_tokens": t["max_completion_tokens"],
        "prompt_over": t["prompt_over"],
        "prompt_over_percent": pct(t["prompt_over"]),
        "completion_over": t["completion_over"],
        "completion_over_percent": pct(t["completion_over"]),
        "rows_over": t["any_over"],
        "rows_over_percent": pct(t["any_over"]),
        "prompt_tokens_max": t["prompt_tokens_max"],
        "completion_tokens_max": t["completion_tokens_max"],
        "prompt_tokens_mean": round(t["prompt_tokens_sum"] / n, 1) if n else 0.0,
        "completion_tokens_mean": round(t["completion_tokens_sum"] / n, 1) if n else 0.0,
    }


# --------------------------------------------------------------------------- derived frame


def derived_frame(
    records: pd.DataFrame,
    kind: str | None = None,
    rules: ValidationRules | None = None,
    pii_rows: dict[int, Counter] | set[int] | None = None,
) -> pd.DataFrame:
    """The frame the suite runs on: text columns (Arrow-backed strings) plus helper columns."""
    kind = kind or kind_of(records)
    rules = rules or ValidationRules()
    records = records.reset_index(drop=True)
    table, label_ok = records_to_arrow(records, kind)
    derived = derived_columns(table, kind)
    out: dict[str, Any] = {"row": records["row"].astype("int64").to_numpy()}
    for col in ("prompt_text", "prompt_final", *COMPLETION_FIELDS[kind]):
        out[col] = pd.Series(derived[col], dtype=pd.ArrowDtype(pa.string())).astype("str")
    if kind == "pairwise":
        out["pair_differs"] = pd.Series(pc.not_equal(columnar.normalize(derived["chosen"]),
                                                     columnar.normalize(derived["rejected"])).to_numpy(zero_copy_only=False),
                                        dtype=object)
    if kind == "binary":
        out["label_type"] = ["bool" if isinstance(v, (bool, np.bool_)) else type(v).__name__ for v in records["label"]]
    if rules.tokenizer:
        counter = load_token_counter(str(rules.tokenizer))
        out["prompt_tokens"] = counter(derived["prompt_text"])
        completions = [counter(derived[c]) for c in COMPLETION_FIELDS[kind]]
        out["completion_tokens"] = (
            np.maximum.reduce(completions) if completions else np.zeros(len(records), dtype=np.int64)
        )
    if rules.pii == "quarantine":
        pii_rows = pii_rows if pii_rows is not None else _pii_scan(records, kind, redact=False)[1]
        out["pii_found"] = [int(r) in pii_rows for r in out["row"]]
    frame = pd.DataFrame(out)
    pk = columnar.prompt_keys(table.column("prompt"))
    if kind == "pairwise":
        keys = columnar.pair_keys(pk, columnar.normalize(derived["chosen"]), columnar.normalize(derived["rejected"]))
    elif kind == "binary":
        labels = [_label_token(v) for v in records["label"]]
        keys = [record_key({"prompt": p, "completion": c, "label": lab}, kind) if tok not in ("0", "1") else None
                for p, c, lab, tok in zip(records["prompt"], records["completion"], records["label"], labels)]
        fast = columnar.binary_keys(pk, columnar.normalize(derived["completion"]),
                                    np.array([t == "1" for t in labels], dtype=bool))
        keys = [k if k is not None else f for k, f in zip(keys, fast)]
    else:
        keys = pk
    frame[KEY_COLUMN[kind]] = pd.Series(keys, dtype="str")
    return frame


def _label_token(label: Any) -> str:
    return ("1" if label else "0") if isinstance(label, (bool, np.bool_)) else repr(label)


def _pii_scan(records: pd.DataFrame, kind: str, redact: bool) -> tuple[pd.DataFrame, dict[int, Counter], Counter]:
    """(records, possibly redacted; {row: counts by type} of rows with PII; counts by type)."""
    counts: Counter = Counter()
    rows: dict[int, Counter] = {}
    scan = redact_pii if redact else (lambda text: (text, find_pii(text)))
    fields = COMPLETION_FIELDS[kind]
    new_prompts, new_fields = [], {f: [] for f in fields}
    for i, rec in enumerate(records.to_dict("records")):
        found: Counter = Counter()
        prompt = []
        for m in as_messages(rec["prompt"]):
            text, c = scan(m["content"])
            found += c
            prompt.append({"role": m["role"], "content": text})
        new_prompts.append(prompt)
        for f in fields:
            value = rec[f]
            if isinstance(value, str):
                value, c = scan(value)
                found += c
            new_fields[f].append(value)
        if found:
            rows[int(rec["row"])] = found
            counts += found
    if redact and rows:
        records = records.copy()
        records["prompt"] = pd.Series(new_prompts, index=records.index, dtype=object)
        for f in fields:
            records[f] = pd.Series(new_fields[f], index=records.index, dtype=object)
    return records, rows, counts


# --------------------------------------------------------------------------- GX plumbing

_LOCK = threading.RLock()
_STATE: dict[str, Any] = {}


def _gx():
    """(gx module, batch definition), created once per process."""
    with _LOCK:
        if "batch_definition" not in _STATE:
            os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
            import great_expectations as gx
            from great_expectations.data_context.types.base import ProgressBarsConfig

            # GX fingerprints every batch by hashing every cell (pandas' hash_pandas_object), which costs
            # more than the expectations themselves; a batch here is identified by its shape and rows
            from great_expectations.execution_engine import pandas_execution_engine

            pandas_execution_engine.hash_pandas_dataframe = _fingerprint
            context = gx.get_context(mode="ephemeral")
            try:
                context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
            except Exception:  # pragma: no cover - cosmetic only
                pass
            asset = context.data_sources.add_pandas("feedback").add_dataframe_asset("records")
            _STATE["gx"] = gx
            _STATE["context"] = context
            _STATE["batch_definition"] = asset.add_batch_definition_whole_dataframe("whole")
            _STATE["suites"] = {}
        return _STATE["gx"], _STATE["batch_definition"]


def _fingerprint(df: pd.DataFrame) -> str:
    import hashlib

    rows = df["row"].to_numpy() if "row" in df.columns and len(df) else np.zeros(0, dtype=np.int64)
    summary = (df.shape, [str(c) for c in df.columns], int(rows.sum()) if len(rows) else 0,
               rows[:8].tolist(), rows[-8:].tolist())
    return hashlib.md5(repr(summary).encode(), usedforsecurity=False).hexdigest()


def _row_expectations(rules: ValidationRules, kind: str = "pairwise") -> list[tuple[Any, ReasonCode]]:
    """The row-level rules of a kind, in routing order (first failure wins)."""
    import great_expectations.expectations as gxe

    non_blank, texts = _TEXT[kind]
    exp: list[tuple[Any, ReasonCode]] = []
    for col in non_blank:
        exp.append((gxe.ExpectColumnValuesToMatchRegex(column=col, regex=NON_BLANK), ReasonCode.EMPTY_FIELD))
    for col in texts:
        exp.append((gxe.ExpectColumnValuesToNotMatchRegex(column=col, regex=CONTROL_CHARS), ReasonCode.INVALID_TEXT))
    for col in texts:
        exp.append(
            (gxe.ExpectColumnValueLengthsToBeBetween(column=col, max_value=rules.max_chars), ReasonCode.TOO_LONG)
        )
    if kind == "pairwise":
        exp.append(
            (gxe.ExpectColumnValuesToBeInSet(column="pair_differs", value_set=[True]), ReasonCode.IDENTICAL_PAIR)
        )
    if kind == "binary":
        exp.append((gxe.ExpectColumnValuesToBeInSet(column="label_type", value_set=["bool"]), ReasonCode.WRONG_TYPE))
    if rules._token_rule:
        exp.append(
            (gxe.ExpectColumnValuesToBeBetween(column="prompt_tokens", max_value=rules.max_prompt_tokens), ReasonCode.TOO_LONG)
        )
        if COMPLETION_FIELDS[kind]:
            exp.append(
                (
                    gxe.ExpectColumnValuesToBeBetween(column="completion_tokens", max_value=rules.max_completion_tokens),
                    ReasonCode.TOO_LONG,
                )
            )
    if rules.pii == "quarantine":
        exp.append((gxe.ExpectColumnValuesToBeInSet(column="pii_found", value_set=[False]), ReasonCode.PII))
    return exp


def _suite(rules: ValidationRules, kind: str = "pairwise"):
    """(suite, [((type, column), ReasonCode)]); row expectations first, then uniqueness."""
    gx, _ = _gx()
    with _LOCK:
        cache = _STATE["suites"]
        key = rules.suite_key(kind)
        if key not in cache:
            import great_expectations.expectations as gxe

            name = f"feedback_{kind}_max{rules.max_chars}" + ("_tokens" if key[2] else "") + ("_pii" if key[3] else "")
            suite = gx.ExpectationSuite(name=name)
            order: list[tuple[tuple[str, Any], ReasonCode]] = []
            expectations = _row_expectations(rules, kind)
            expectations.append((gxe.ExpectColumnValuesToBeUnique(column=KEY_COLUMN[kind]), ReasonCode.DUPLICATE))
            for expectation, reason in expectations:
                suite.add_expectation(expectation)
                order.append(((expectation.expectation_type, expectation.column), reason))
            cache[key] = (suite, order)
        return cache[key]


def _run_suite(frame: pd.DataFrame, rules: ValidationRules, complete: bool, kind: str = "pairwise"):
    """[(ExpectationValidationResult, ReasonCode)] in the suite's declared order."""
    _, batch_definition = _gx()
    suite, order = _suite(rules, kind)
    batch = batch_definition.get_batch(batch_parameters={"dataframe": frame})
    result_format: dict[str, Any] = (
        {"result_format": "COMPLETE", "unexpected_index_column_names": ["row"], "return_unexpected_index_query": False}
        if complete
        else {"result_format": "BASIC"}
    )
    result = batch.validate(suite, result_format=result_format)
    by_key = {_describe(er): er for er in result.results}  # GX does not keep suite order
    return [(by_key[key], reason) for key, reason in order]


def _describe(er) -> tuple[str, Any]:
    cfg = er.expectation_config
    kwargs = cfg.kwargs
    return cfg.type, kwargs.get("column", kwargs.get("column_list"))


_DETAIL = {
    ReasonCode.EMPTY_FIELD: "{column} is empty or only whitespace",
    ReasonCode.INVALID_TEXT: "{column} contains control characters or invalid Unicode",
    ReasonCode.TOO_LONG: "{column} is longer than {max_chars} characters",
    ReasonCode.IDENTICAL_PAIR: "chosen and rejected are identical",
    ReasonCode.WRONG_TYPE: "label must be a boolean",
    ReasonCode.PII: "contains personal data (e-mail address, phone number or card number)",
    ReasonCode.DUPLICATE: "same content as row {first} of this batch",
    ReasonCode.DUPLICATE_ACROSS_BATCHES: "same content as a row of an earlier batch",
}
_TOKEN_DETAIL = {
    "prompt_tokens": "prompt is longer than {n} tokens",
    "completion_tokens": "an answer is longer than {n} tokens",
}
_COLUMN_NAMES = {"prompt_final": "the prompt's last user turn", "prompt_text": "prompt"}


# --------------------------------------------------------------------------- key sets


def _key64(hex_key: str) -> int:
    return int(hex_key[:16], 16)


class KeySet:
    """Row keys as uint64 (first 64 bits of the sha256) with the row that had each first: 16 bytes a
    key, so a batch of millions of rows can be checked for duplicates across chunks. Kept as a few sorted
    runs whose sizes at least double from newest to oldest (merged when they would not), so adding a
    chunk costs about O(chunk x log batch) rather than re-sorting the whole batch every time."""

    def __init__(self) -> None:
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []  # (sorted unique keys, their first rows)

    @classmethod
    def from_hex(cls, keys: Iterable[str] | None) -> KeySet:
        out = cls()
        if keys:
            arr = np.fromiter((_key64(k) for k in keys), dtype=np.uint64)
            out.add(arr, np.zeros(len(arr), dtype=np.int64))
        return out

    @property
    def keys(self) -> np.ndarray:
        return np.sort(np.concatenate([k for k, _ in self._runs])) if self._runs else np.zeros(0, np.uint64)

    def __len__(self) -> int:
        return sum(len(k) for k, _ in self._runs)

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found mask, first row of each found key). The keys are searched in sorted order, which keeps
        the binary searches in cache."""
        found = np.zeros(len(keys), dtype=bool)
        first = np.zeros(len(keys), dtype=np.int64)
        if not len(keys) or not self._runs:
            return found, first
        order = np.argsort(keys)
        needles = keys[order]
        for run_keys, run_rows in self._runs:
            pos = np.minimum(np.searchsorted(run_keys, needles), len(run_keys) - 1)
            hit = (run_keys[pos] == needles) & ~found[order]
            found[order[hit]] = True
            first[order[hit]] = run_rows[pos[hit]]
        return found, first

    def add(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """Add keys that are not in the set yet (the first row of each kept, where one repeats)."""
        if not len(keys):
            return
        keys, rows = keys.astype(np.uint64), rows.astype(np.int64)
        order = np.argsort(keys, kind="stable")
        keys, rows = keys[order], rows[order]
        first = np.ones(len(keys), dtype=bool)
        first[1:] = keys[1:] != keys[:-1]
        self._runs.append((keys[first], rows[first]))
        while len(self._runs) > 1 and len(self._runs[-1][0]) * 2 > len(self._runs[-2][0]):
            (k2, r2), (k1, r1) = self._runs.pop(), self._runs.pop()
            merged = np.concatenate([k1, k2])
            order = np.argsort(merged, kind="stable")
            self._runs.append((merged[order], np.concatenate([r1, r2])[order]))


# --------------------------------------------------------------------------- routing


def _chunk_from_import(imported: ImportResult, rules: ValidationRules) -> Chunk:
    """A routing chunk of an importer's result (PII screened or redacted first, as configured)."""
    kind = imported.kind
    records = imported.records.reset_index(drop=True)
    pii_rows = pii_summary = None
    if rules.pii != "off":
        records, pii_rows, counts = _pii_scan(records, kind, redact=rules.pii == "redact")
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
    speed (`jsonl_fast`): a large uncompressed file (`PARALLEL_MIN_BYTES`) is assessed by `workers`
    processes (default: one per CPU), each reading its chunks' bytes itself; a smaller or compressed one on
    this process with the next chunk read on a second thread; other formats (and PII screening, which
    rewrites records) through the row-by-row importers."""
    from alignment_pipelines.data import importers
    from alignment_pipelines.data.jsonl_fast import iter_jsonl_chunks

    p = Path(path)
    if rules.pii == "off" and p.is_file() and importers._detect_format(p, importers._sniff(p)) == "jsonl":
        workers = (os.cpu_count() or 1) if workers is None else workers
        if multiprocessing.current_process().daemon:  # a daemonic process may not start workers
            workers = 1
        with open(p, "rb") as handle:
            compressed = handle.read(2) == importers.GZIP_MAGIC  # its chunks are not byte ranges of the file
        if workers > 1 and not compressed and p.stat().st_size >= PARALLEL_MIN_BYTES:
            yield from _assessed_in_workers(p, layout, chunk_rows, rules, workers)
        else:
            yield from ((chunk, None) for chunk in _prefetch(iter_jsonl_chunks(p, layout=layout, chunk_rows=chunk_rows)))
        return
    for imported in iter_feedback_chunks(path, layout=layout, chunk_rows=chunk_rows):
        yield _chunk_from_import(imported, rules), None


def _one_thread_each(tokenizer: str | None) -> None:
    """A worker's initializer: the workers already use every core, so Arrow and the tokenizer use one thread
    each (their thread pools would otherwise spin against the other workers); the tokenizer is loaded now,
    while the first chunk is read."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    pa.set_cpu_count(1)
    from alignment_pipelines.data import jsonl_fast, routing  # noqa: F401  imported before the first chunk

    if tokenizer:
        load_token_counter(tokenizer)


def _assess_range(source: str, line_range, layout: str, rules: ValidationRules, handover: str):
    """In a worker process: one chunk read from its byte range, converted and assessed (`routing.assess_chunk`).
    Its records go back as an Arrow file in `handover`, which the caller maps into memory (no copy), the
    rest pickled."""
    from alignment_pipelines.data.jsonl_fast import convert_range
    from alignment_pipelines.data.routing import assess_chunk

    chunk = convert_range(source, line_range, layout)
    assessment = assess_chunk(chunk, rules)
    records = str(Path(handover) / f"{line_range.start}.arrow")
    with pa.ipc.new_file(records, chunk.table.schema) as writer:
        writer.write_table(chunk.table)
    chunk.table = None
    return chunk, assessment, records


@dataclass
class _Handed:
    """A chunk of a file assessed in parallel: the arguments of `jsonl_fast.convert_range`, its future in the
    pool, and (chunk, assessment) once this process has taken it back and assessed it itself."""

    args: tuple
    future: Any
    here: tuple | None = None


def _assessed_in_workers(path: Path, layout: str | None, chunk_rows: int, rules: ValidationRules, workers: int):
    """`_iter_chunks` with each chunk read, converted and assessed by `workers` processes, given back in file
    order: the duplicates, which depend on every earlier row, are settled by the caller, one chunk after the
    other.

    `workers` - 1 processes take the chunks in turn, each handed one at a time by a thread of its own, so
    the chunks still waiting can be cancelled; whenever the chunk to settle next is not ready, this process
    takes back the first one waiting and assesses it itself. Neither side waits on the other, the last
    chunks are shared out, and one process fewer is started."""
    import tempfile
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    from alignment_pipelines.data.jsonl_fast import convert_range, iter_jsonl_chunks
    from alignment_pipelines.data.routing import assess_chunk

    tokenizer = str(rules.tokenizer) if rules.tokenizer else None
    pool = ProcessPoolExecutor(workers - 1, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_one_thread_each, initargs=(tokenizer,))
    for _ in range(workers - 1):  # start them now: they import and load the tokenizer while the layout is decided
        pool.submit(os.getpid)
    handing = ThreadPoolExecutor(workers - 1, thread_name_prefix="feedback-chunks")
    handover = tempfile.TemporaryDirectory(prefix="feedback-chunks-")
    window: deque[_Handed] = deque()

    def in_pool(args: tuple):
        return pool.submit(_assess_range, *args, rules, handover.name).result()

    def hand(*args) -> _Handed:
        return _Handed(args, handing.submit(in_pool, args))

    def take_back(head: _Handed) -> bool:
        """Assess here the first chunk not yet started, from `head` on (False when there is none)."""
        for item in (head, *window):
            if item.here is None and item.future.cancel():
                chunk = convert_range(*item.args)
                item.here = (chunk, assess_chunk(chunk, rules))
                return True
        return False

    def received(item: _Handed):
        while item.here is None and not item.future.done() and take_back(item):
            pass
        if item.here is not None:
            return item.here
        chunk, assessment, records = item.future.result()
        chunk.table = pa.ipc.open_file(pa.memory_map(records)).read_all()
        os.unlink(records)  # the mapping stays until the table is dropped
        return chunk, assessment

    try:
        for item in iter_jsonl_chunks(path, layout=layout, chunk_rows=chunk_rows, assess=hand):
            # a chunk converted here (no layout could be chosen: nothing but blank or broken lines) is routed as is
            window.append(item if isinstance(item, _Handed) else _Handed((), None, (item, None)))
            if len(window) > workers + 2:  # the chunks in the pool, and two or more to take back
                yield received(window.popleft())
        while window:
            yield received(window.popleft())
    finally:
        handing.shutdown(cancel_futures=True)
        pool.shutdown(cancel_futures=True)
        handover.cleanup()


def _prefetch(chunks):
    """Read and parse the next chunk on a second thread while this one is routed (Arrow, RE2, the
    JSON reader and the tokenizer release the GIL, so the two cores overlap)."""
    from concurrent.futures import ThreadPoolExecutor

    iterator = iter(chunks)
    sentinel = object()
    with ThreadPoolExecutor(1, thread_name_prefix="feedback-reader") as pool:
        future = pool.submit(next, iterator, sentinel)
        while True:
            chunk = future.result()
            if chunk is sentinel:
                return
            future = pool.submit(next, iterator, sentinel)
            yield chunk


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


def _count_truncation(acc: dict, frame: pd.DataFrame, rules: ValidationRules, kind: str) -> None:
    p = frame["prompt_tokens"].to_numpy()
    p_over = p > rules.max_prompt_tokens
    acc["rows"] += len(frame)
    acc["prompt_over"] += int(p_over.sum())
    acc["prompt_tokens_max"] = max(acc["prompt_tokens_max"], int(p.max()))
    acc["prompt_tokens_sum"] += int(p.sum())
    if COMPLETION_FIELDS[kind]:
        c = frame["completion_tokens"].to_numpy()
        c_over = c > rules.max_completion_tokens
        acc["completion_over"] += int(c_over.sum())
        acc["completion_tokens_max"] = max(acc["completion_tokens_max"], int(c.max()))
        acc["completion_tokens_sum"] += int(c.sum())
        acc["any_over"] += int((p_over | c_over).sum())
    else:
        acc["any_over"] += int(p_over.sum())


# --------------------------------------------------------------------------- public API


def validate_records(
    imported: ImportResult, rules: ValidationRules = ValidationRules(), known_keys: set[str] | None = None
) -> ValidationResult:
    """Route every imported row to `accepted` or `quarantined` (with a ReasonCode)."""
    known = KeySet.from_hex(known_keys) if known_keys else None
    return _route(imported, rules, known, KeySet())


def validate_file(
    path: str | Path,
    rules: ValidationRules = ValidationRules(),
    layout: str | None = None,
    known_keys: set[str] | None = None,
) -> ValidationResult:
    return validate_records(read_feedback_file(path, layout=layout), rules, known_keys)


# Repeats of rows already accepted are not defects: a weekly export that overlaps last week's is fine.
NOT_DEFECTS = frozenset({ReasonCode.DUPLICATE, ReasonCode.DUPLICATE_ACROSS_BATCHES})


def defect_count(by_reason: dict[str, int]) -> int:
    """Quarantined rows that count against the batch gate (everything but duplicates)."""
    return sum(n for reason, n in by_reason.items() if reason not in NOT_DEFECTS)


def _gate_result(quarantined: int, rows: int, rules: ValidationRules) -> dict:
    """`quarantined` defects among `rows` non-duplicate input rows."""
    fraction = (quarantined / rows) if rows else 0.0
    return {
        "expectation": GATE_EXPECTATION,
        "column": None,
        "success": fraction <= rules.max_quarantine_fraction,
        "unexpected_count": int(quarantined),
        "reason": ReasonCode.TOO_MANY_QUARANTINED,
        "observed_value": round(fraction, 4),
        "max_value": rules.max_quarantine_fraction,
    }


def _report_rows(frame: pd.DataFrame, rules: ValidationRules, kind: str) -> list[dict]:
    results: list[dict] = []
    for er, reason in _run_suite(frame, rules, complete=False, kind=kind):
        name, column = _describe(er)
        raised = bool(er.exception_info and er.exception_info.get("raised_exception"))
        results.append(
            {
                "expectation": name,
                "column": column,
                "success": bool(er.success) and not raised,
                "unexpected_count": int(er.result.get("unexpected_count") or 0),
                "reason": reason,
            }
        )
    return results


def run_expectation_suite(
    df: pd.DataFrame,
    rules: ValidationRules = ValidationRules(),
    quarantined_count: int | None = None,
    kind: str | None = None,
) -> SuiteReport:
    """The batch gate: the kind's suite over `df` (COLUMNS_BY_KIND[kind]; the kind is inferred
    from the columns when not given) plus the quarantine-fraction limit, where `quarantined_count`
    is the number of defective rows (see `defect_count`; duplicates are not defects)."""
    kind = kind or kind_of(df)
    frame = derived_frame(df.reset_index(drop=True), kind, rules)
    results = _report_rows(frame, rules, kind)
    if quarantined_count is not None:
        results.append(_gate_result(int(quarantined_count), len(df) + int(quarantined_count), rules))
    return SuiteReport(success=all(r["success"] for r in results), results=results)


def _gate_frame(table: pa.Table, kind: str, rules: ValidationRules, keys: np.ndarray | None) -> pd.DataFrame:
    """`derived_frame` of a records table read from Parquet (labels are booleans there), the key column
    from the batch's key file when given."""
    derived = derived_columns(table, kind)
    out: dict[str, Any] = {"row": columnar.as_array(table.column("row")).to_numpy(zero_copy_only=False)}
    for col in ("prompt_text", "prompt_final", *COMPLETION_FIELDS[kind]):
        out[col] = pd.Series(derived[col], dtype=pd.ArrowDtype(pa.string())).astype("str")
    normalized = {c: columnar.normalize(derived[c]) for c in COMPLETION_FIELDS[kind]}
    if kind == "pairwise":
        out["pair_differs"] = pd.Series(pc.not_equal(normalized["chosen"], normalized["rejected"])
                                        .to_numpy(zero_copy_only=False), dtype=object)
    labels = None
    if kind == "binary":
        label = columnar.as_array(table.column("label"))
        out["label_type"] = np.where(pc.is_null(label).to_numpy(zero_copy_only=False), "NoneType", "bool")
        labels = pc.fill_null(label, False).to_numpy(zero_copy_only=False)
    if rules.tokenizer:
        counter = load_token_counter(str(rules.tokenizer))
        out["prompt_tokens"] = counter(derived["prompt_text"])
        completions = [counter(derived[c]) for c in COMPLETION_FIELDS[kind]]
        out["completion_tokens"] = np.maximum.reduce(completions) if completions else np.zeros(table.num_rows, np.int64)
    if rules.pii == "quarantine":
        from alignment_pipelines.data.records import arrow_to_records

        pii_rows = _pii_scan(arrow_to_records(table), kind, redact=False)[1]
        out["pii_found"] = [int(r) in pii_rows for r in out["row"]]
    if keys is None:
        keys = columnar.record_key64(kind, columnar.prompt_keys(table.column("prompt")), normalized, labels)
    frame = pd.DataFrame(out)
    frame[KEY_COLUMN[kind]] = np.asarray(keys).view(np.int64)
    return frame


def run_expectation_suite_on_file(
    path: str | Path,
    rules: ValidationRules = ValidationRules(),
    quarantined_count: int | None = None,
    kind: str | None = None,
    keys_path: str | Path | None = None,
    chunk_rows: int = 250_000,
) -> SuiteReport:
    """`run_expectation_suite` on a batch's accepted Parquet file, in memory bounded by `chunk_rows`: the
    suite runs on each chunk (only the kind's columns are read) and the results add up; uniqueness is
    checked over the whole batch, from its key file (`key_index`) when given."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(Path(path))
    kind = kind or kind_of(pf.schema_arrow.empty_table().to_pandas())
    key_rows = all_keys = None
    if keys_path is not None:
        kt = pq.read_table(Path(keys_path), columns=["row", "key"])
        key_rows = kt.column("row").to_numpy()
        all_keys = kt.column("key").to_numpy()
        order = np.argsort(key_rows, kind="stable")
        key_rows, all_keys = key_rows[order], all_keys[order]
    merged: dict[tuple, dict] = {}
    order_of: list[tuple] = []
    seen_keys: list[np.ndarray] = []
    batches = pf.iter_batches(batch_size=chunk_rows, columns=COLUMNS_BY_KIND[kind])
    for batch in batches if pf.metadata.num_rows else [None]:
        table = pa.Table.from_batches([batch]) if batch is not None else pf.schema_arrow.empty_table()
        keys = None
        if all_keys is not None and table.num_rows:
            rows = table.column("row").to_numpy()
            keys = all_keys[np.searchsorted(key_rows, rows)]
        frame = _gate_frame(table, kind, rules, keys)
        seen_keys.append(frame[KEY_COLUMN[kind]].to_numpy())
        for r in _report_rows(frame, rules, kind):
            k = (r["expectation"], str(r["column"]))
            if k not in merged:
                merged[k] = dict(r)
                order_of.append(k)
            else:
                merged[k]["success"] = merged[k]["success"] and r["success"]
                merged[k]["unexpected_count"] += r["unexpected_count"]
    # uniqueness over the whole batch (GX saw one chunk at a time)
    keys_all = np.concatenate(seen_keys) if seen_keys else np.zeros(0, np.int64)
    uniq, counts = np.unique(keys_all, return_counts=True)
    dup_rows = int(counts[counts > 1].sum())
    for k in order_of:
        if merged[k]["reason"] is ReasonCode.DUPLICATE:
            merged[k]["unexpected_count"] = dup_rows
            merged[k]["success"] = dup_rows == 0
    results = [merged[k] for k in order_of]
    if quarantined_count is not None:
        results.append(_gate_result(int(quarantined_count), pf.metadata.num_rows + int(quarantined_count), rules))
    return SuiteReport(success=all(r["success"] for r in results), results=results)


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
) -> dict:
    """Validate a file chunk by chunk, streaming accepted rows (`write_records` format) and
    quarantined rows (QUARANTINE_COLUMNS) to Parquet. Memory is bounded by the chunk size (plus
    16 bytes per accepted row for duplicate detection). The outputs appear only when the whole
    file was read (written to temporary names, then renamed); a FeedbackFileError leaves none.

    Rows already accepted in earlier batches are duplicates: `known_keys` (row keys, hex) or
    `known_index` (an object whose `lookup(key64)` answers, e.g. `key_index.KeyIndex`). With
    `keys_path` the accepted rows' keys are written there too (`key_index.KEYS_SCHEMA`): the batch's
    entry in the key index. A large JSON Lines file is assessed by `workers` processes (default: one per CPU;
    1: none), with the same outcome.

    Returns the summary: rows, accepted, quarantined, by_reason, kind, layout, truncation, pii,
    over_length_policy, suite_success (the row rules hold on the accepted rows by construction; this is
    the batch quarantine-fraction gate, recorded as data: the batch gate is `run_expectation_suite`),
    suite (failed expectations), samples (<= 5 quarantined rows), chunks.
    """
    import pyarrow.parquet as pq

    from alignment_pipelines.data.key_index import KEYS_SCHEMA
    from alignment_pipelines.data.records import quarantine_schema, quarantine_table, records_schema

    accepted_path, quarantine_path = Path(accepted_path), Path(quarantine_path)
    outputs = [accepted_path, quarantine_path] + ([Path(keys_path)] if keys_path else [])
    for p in outputs:
        p.parent.mkdir(parents=True, exist_ok=True)
    partial = [p.with_name(p.name + ".partial") for p in outputs]
    known = known_index if known_index is not None else (KeySet.from_hex(known_keys) if known_keys else None)
    seen = KeySet()
    writers: list[Any] = []
    rows = accepted = quarantined = chunks = 0
    by_reason: Counter = Counter()
    samples: list[dict] = []
    truncation: dict | None = None
    pii: dict | None = None
    kind, file_layout = "pairwise", "none"
    try:
        for chunk, assessment in _iter_chunks(path, layout, chunk_rows, rules, workers):
            routed = route_chunk(chunk, rules, known, seen, assessment)
            kind, file_layout = chunk.kind, chunk.layout
            if not writers:
                # texts are nearly all distinct: dictionary encoding would only cost time
                writers = [pq.ParquetWriter(partial[0], records_schema(kind), use_dictionary=["prompt.list.element.role"]),
                           pq.ParquetWriter(partial[1], quarantine_schema())]
                if keys_path:
                    writers.append(pq.ParquetWriter(partial[2], KEYS_SCHEMA, use_dictionary=False))
            if routed.accepted.num_rows:
                writers[0].write_table(routed.accepted.cast(records_schema(kind)))
                if keys_path:
                    writers[2].write_table(routed.keys.cast(KEYS_SCHEMA))
            q = _quarantine(routed, rules)
            if len(q):
                writers[1].write_table(quarantine_table(q))
                for rec in q.head(5 - len(samples)).to_dict("records") if len(samples) < 5 else []:
                    samples.append({"row": int(rec["row"]), "reason": str(rec["reason"]), "detail": rec["detail"]})
                by_reason.update(q["reason"].map(str).tolist())
            rows += chunk.rows
            accepted += routed.accepted.num_rows
            quarantined += len(q)
            truncation = _add_truncation(truncation, routed.truncation)
            if chunk.pii is not None:
                pii = dict(chunk.pii) if pii is None else {
                    k: (v + chunk.pii[k] if isinstance(v, int) else v) for k, v in pii.items()
                }
            chunks += 1
        if not writers:  # pragma: no cover - the chunk iterators always yield
            raise RuntimeError("no chunk read")
    except BaseException:
        for w in writers:
            w.close()
        for p in partial:
            p.unlink(missing_ok=True)
        raise
    for w in writers:
        w.close()
    if accepted + quarantined != rows:  # the contract, checked every time
        for p in partial:
            p.unlink(missing_ok=True)
        raise AssertionError(f"{path}: rows lost in validation: {rows} in, {accepted} accepted, {quarantined} quarantined")
    for tmp, final in zip(partial, outputs):
        os.replace(tmp, final)
    defects = defect_count(by_reason)
    gate = _gate_result(defects, rows - (quarantined - defects), rules)
    failed = [] if gate["success"] else [{**gate, "reason": str(gate["reason"])}]
    return {
        "source": str(path),
        "kind": kind,
        "layout": file_layout,
        "rows": rows,
        "accepted": accepted,
        "quarantined": quarantined,
        "by_reason": {str(k): int(v) for k, v in sorted(by_reason.items())},
        "truncation": _truncation_summary(truncation, rules.over_length_policy),
        "pii": pii,
        "over_length_policy": rules.over_length_policy,
        "suite_success": bool(gate["success"]),
        "suite": {"failed": failed, "quarantine_fraction": gate["observed_value"]},
        "samples": samples,
        "chunks": chunks,
        "chunk_rows": chunk_rows,
    }
