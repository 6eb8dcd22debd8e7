"""Validation of imported feedback with one Great Expectations 1.x suite, used twice.

1. Row routing (`validate_records`): the suite runs over every imported record with
   result_format COMPLETE; each failing row is quarantined with the ReasonCode of the first
   expectation it fails (suite order). Exact duplicates among the passing rows are found in
   pandas (first copy kept). Importer rejects are quarantined as they are.
2. Batch gate (`run_expectation_suite`): the same suite must pass on the accepted rows,
   plus uniqueness of (prompt, chosen, rejected) and a quarantine-fraction limit.

GX is imported lazily; one ephemeral context per process.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from alignment_pipelines.data.importers import ImportResult, read_feedback_file
from alignment_pipelines.data.schemas import (
    PAIR_COLUMNS,
    QUARANTINE_COLUMNS,
    ReasonCode,
    normalize_text,
    quarantine_frame,
    render_prompt,
    truncate_raw,
)

# C0 controls except tab/newline/carriage return, DEL, C1 controls, lone surrogates, U+FFFD.
CONTROL_CHARS = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff\ufffd]"
NON_BLANK = r"\S"
TEXT_COLUMNS = ("prompt_text", "chosen", "rejected")
GATE_EXPECTATION = "expect_quarantine_fraction_to_be_at_most"


@dataclass
class ValidationRules:
    max_chars: int = 20_000  # per field (rendered prompt / chosen / rejected)
    max_quarantine_fraction: float = 0.5  # batch-level gate used by the blocking check


@dataclass
class ValidationResult:
    source: str
    rows: int
    accepted: pd.DataFrame  # PAIR_COLUMNS
    quarantined: pd.DataFrame  # QUARANTINE_COLUMNS

    def counts_by_reason(self) -> dict[str, int]:
        counts = self.quarantined["reason"].map(str).value_counts()
        return {str(k): int(v) for k, v in sorted(counts.items())}

    def summary(self) -> dict:
        return {
            "source": self.source,
            "rows": int(self.rows),
            "accepted": int(len(self.accepted)),
            "quarantined": int(len(self.quarantined)),
            "by_reason": self.counts_by_reason(),
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


# --------------------------------------------------------------------------- derived frame


def derived_frame(records: pd.DataFrame) -> pd.DataFrame:
    """The frame the suite runs on: text columns plus helper columns (no list values)."""
    prompts = records["prompt"].tolist()
    chosen = records["chosen"].astype(str).tolist()
    rejected = records["rejected"].astype(str).tolist()
    prompt_text = [render_prompt(p) for p in prompts]
    prompt_final = [(p[-1]["content"] if len(p) else "") for p in (list(x) if not isinstance(x, str) else [{"content": x}] for x in prompts)]
    pair_differs = [normalize_text(c) != normalize_text(r) for c, r in zip(chosen, rejected)]
    out = pd.DataFrame(
        {
            "row": records["row"].astype("int64").to_numpy(),
            "prompt_text": prompt_text,
            "prompt_final": prompt_final,
            "chosen": chosen,
            "rejected": rejected,
            "pair_differs": pair_differs,
        }
    )
    out["pair_key"] = [
        "\x1f".join((normalize_text(p), normalize_text(c), normalize_text(r)))
        for p, c, r in zip(prompt_text, chosen, rejected)
    ]
    return out


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


def _row_expectations(rules: ValidationRules) -> list[tuple[Any, ReasonCode]]:
    """The row-level rules, in routing order (first failure wins)."""
    import great_expectations.expectations as gxe

    exp: list[tuple[Any, ReasonCode]] = []
    for col in ("prompt_final", "chosen", "rejected"):
        exp.append((gxe.ExpectColumnValuesToMatchRegex(column=col, regex=NON_BLANK), ReasonCode.EMPTY_FIELD))
    for col in TEXT_COLUMNS:
        exp.append((gxe.ExpectColumnValuesToNotMatchRegex(column=col, regex=CONTROL_CHARS), ReasonCode.INVALID_TEXT))
    for col in TEXT_COLUMNS:
        exp.append(
            (gxe.ExpectColumnValueLengthsToBeBetween(column=col, max_value=rules.max_chars), ReasonCode.TOO_LONG)
        )
    exp.append((gxe.ExpectColumnValuesToBeInSet(column="pair_differs", value_set=[True]), ReasonCode.IDENTICAL_PAIR))
    return exp


def _suite(rules: ValidationRules):
    """(suite, {expectation index -> ReasonCode}); row expectations first, then uniqueness."""
    gx, _ = _gx()
    key = (rules.max_chars,)
    with _LOCK:
        return _build_suite(gx, rules, key)


def _build_suite(gx, rules: ValidationRules, key: tuple):
    cache = _STATE["suites"]
    if key not in cache:
        import great_expectations.expectations as gxe

        suite = gx.ExpectationSuite(name=f"feedback_pairs_max{rules.max_chars}")
        order: list[tuple[tuple[str, Any], ReasonCode]] = []
        expectations = _row_expectations(rules)
        expectations.append((gxe.ExpectColumnValuesToBeUnique(column="pair_key"), ReasonCode.DUPLICATE))
        for expectation, reason in expectations:
            suite.add_expectation(expectation)
            order.append(((expectation.expectation_type, expectation.column), reason))
        cache[key] = (suite, order)
    return cache[key]


def _run_suite(frame: pd.DataFrame, rules: ValidationRules, complete: bool):
    """[(ExpectationValidationResult, ReasonCode)] in the suite's declared order."""
    _, batch_definition = _gx()
    suite, order = _suite(rules)
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
    ReasonCode.DUPLICATE: "same prompt, chosen and rejected as row {first} of this batch",
}
_COLUMN_NAMES = {"prompt_final": "the prompt's last user turn", "prompt_text": "prompt"}


# --------------------------------------------------------------------------- public API


def validate_records(imported: ImportResult, rules: ValidationRules = ValidationRules()) -> ValidationResult:
    """Route every imported row to `accepted` or `quarantined` (with a ReasonCode)."""
    records = imported.records.reset_index(drop=True)
    quarantine_rows: list[dict[str, Any]] = imported.rejected.to_dict("records")
    failed: dict[int, tuple[ReasonCode, str]] = {}

    if len(records):
        frame = derived_frame(records)
        for er, reason in _run_suite(frame, rules, complete=True):
            if reason is ReasonCode.DUPLICATE or er.success:
                continue
            if er.exception_info and er.exception_info.get("raised_exception"):
                raise RuntimeError(f"expectation {er.expectation_config.type} raised: {er.exception_info}")
            _, column = _describe(er)
            detail = _DETAIL[reason].format(column=_COLUMN_NAMES.get(column, column), max_chars=rules.max_chars, first="?")
            for item in er.result.get("unexpected_index_list") or []:
                row = int(item["row"])
                failed.setdefault(row, (reason, detail))  # first failure wins (suite order)

        passing = frame[~frame["row"].isin(failed.keys())]
        dup = passing.duplicated("pair_key", keep="first")
        if dup.any():
            first_row = passing.drop_duplicates("pair_key").set_index("pair_key")["row"]
            for key, row in zip(passing.loc[dup, "pair_key"], passing.loc[dup, "row"]):
                failed[int(row)] = (ReasonCode.DUPLICATE, _DETAIL[ReasonCode.DUPLICATE].format(first=int(first_row[key])))

        if failed:
            bad = records[records["row"].isin(failed.keys())]
            for rec in bad.to_dict("records"):
                reason, detail = failed[int(rec["row"])]
                quarantine_rows.append(
                    {
                        "row": int(rec["row"]),
                        "reason": reason,
                        "detail": detail,
                        "raw": imported.raw_lines.get(int(rec["row"])) or truncate_raw(_raw(rec)),
                    }
                )
    accepted = records[~records["row"].isin(failed.keys())].reset_index(drop=True)[PAIR_COLUMNS]
    quarantined = quarantine_frame(quarantine_rows)
    if len(quarantined):
        quarantined = quarantined.sort_values("row", kind="stable").reset_index(drop=True)[QUARANTINE_COLUMNS]
    out = ValidationResult(source=imported.source, rows=imported.rows, accepted=accepted, quarantined=quarantined)
    assert len(out.accepted) + len(out.quarantined) == out.rows, "validation must account for every row"
    return out


def _raw(rec: dict[str, Any]) -> str:
    import json

    prompt = [dict(m) for m in rec["prompt"]]
    return json.dumps({"prompt": prompt, "chosen": rec["chosen"], "rejected": rec["rejected"]}, ensure_ascii=False)


def validate_file(path: str | Path, rules: ValidationRules = ValidationRules()) -> ValidationResult:
    return validate_records(read_feedback_file(path), rules)


def run_expectation_suite(
    df: pd.DataFrame, rules: ValidationRules = ValidationRules(), quarantined_count: int | None = None
) -> SuiteReport:
    """The batch gate: the suite over `df` (PAIR_COLUMNS) plus the quarantine-fraction limit."""
    frame = derived_frame(df.reset_index(drop=True))
    results: list[dict] = []
    for er, reason in _run_suite(frame, rules, complete=False):
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
    if quarantined_count is not None:
        total = len(df) + int(quarantined_count)
        fraction = (int(quarantined_count) / total) if total else 0.0
        results.append(
            {
                "expectation": GATE_EXPECTATION,
                "column": None,
                "success": fraction <= rules.max_quarantine_fraction,
                "unexpected_count": int(quarantined_count),
                "reason": ReasonCode.TOO_MANY_QUARANTINED,
                "observed_value": round(fraction, 4),
                "max_value": rules.max_quarantine_fraction,
            }
        )
    return SuiteReport(success=all(r["success"] for r in results), results=results)
