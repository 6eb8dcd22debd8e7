"""The batch gate: the kind's rules as one Great Expectations 1.x suite, run over a batch's accepted rows.

What the blocking asset check runs (`run_expectation_suite_on_file`, chunk by chunk): the suite must pass
on the accepted rows, plus uniqueness of the row key and the quarantine-fraction limit. The router applies
the same rules row by row (`router`); here GX is the independent check that they hold. GX is imported
lazily; one ephemeral context per process.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from alignment_pipelines.data import columnar
from alignment_pipelines.data.columnar import COMPLETION_FIELDS, derived_columns
from alignment_pipelines.data.datasets.splits import record_key
from alignment_pipelines.data.ingest.chunks import records_to_arrow
from alignment_pipelines.data.schemas import COLUMNS_BY_KIND, ReasonCode, kind_of
from alignment_pipelines.data.validate.pii import scan_records
from alignment_pipelines.data.validate.rules import (CONTROL_CHARS, KEY_COLUMN, NON_BLANK, TEXT_RULES, ValidationRules,
                                                     gate_result)
from alignment_pipelines.data.validate.tokens import load_token_counter


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
        pii_rows = pii_rows if pii_rows is not None else scan_records(records, kind, redact=False)[1]
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

    non_blank, texts = TEXT_RULES[kind]
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
        results.append(gate_result(int(quarantined_count), len(df) + int(quarantined_count), rules))
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

        pii_rows = scan_records(arrow_to_records(table), kind, redact=False)[1]
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
        results.append(gate_result(int(quarantined_count), pf.metadata.num_rows + int(quarantined_count), rules))
    return SuiteReport(success=all(r["success"] for r in results), results=results)

