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

import json
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

from alignment_pipelines.data.importers import ImportResult, iter_feedback_chunks, read_feedback_file
from alignment_pipelines.data.pii import PII_TYPES, find_pii, redact_pii
from alignment_pipelines.data.schemas import (
    COLUMNS_BY_KIND,
    QUARANTINE_COLUMNS,
    FeedbackKind,
    ReasonCode,
    as_messages,
    kind_of,
    last_user_turn,
    normalize_text,
    quarantine_frame,
    render_prompt,
    truncate_raw,
)
from alignment_pipelines.data.splits import record_key

# C0 controls except tab/newline/carriage return, DEL, C1 controls, lone surrogates, U+FFFD.
CONTROL_CHARS = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff\ufffd]"
NON_BLANK = r"\S"
_SURROGATES = re.compile(r"[\ud800-\udfff]")
GATE_EXPECTATION = "expect_quarantine_fraction_to_be_at_most"
# per kind: (columns that must be non-blank, text columns checked for control chars and length)
_TEXT = {
    "pairwise": (("prompt_final", "chosen", "rejected"), ("prompt_text", "chosen", "rejected")),
    "binary": (("prompt_final", "completion"), ("prompt_text", "completion")),
    "prompts": (("prompt_final",), ("prompt_text",)),
}
KEY_COLUMN = {"pairwise": "pair_key", "binary": "feedback_key", "prompts": "prompt_key"}
COMPLETION_FIELDS = {"pairwise": ("chosen", "rejected"), "binary": ("completion",), "prompts": ()}


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

_TOKENIZERS: dict[str, Any] = {}


def load_token_counter(path: str):
    """A function texts -> token counts, from a local tokenizer (tokenizer.json via `tokenizers`,
    else transformers' AutoTokenizer with local files only). Cached per path."""
    with _LOCK:
        if path not in _TOKENIZERS:
            p = Path(path)
            file = p if p.is_file() else p / "tokenizer.json"
            if file.is_file():
                from tokenizers import Tokenizer

                tok = Tokenizer.from_file(str(file))
                tok.no_truncation()
                tok.no_padding()

                def count(texts: list[str], tok=tok) -> list[int]:
                    return [len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False)]

            elif p.is_dir():
                from transformers import AutoTokenizer

                hf = AutoTokenizer.from_pretrained(str(p), local_files_only=True)

                def count(texts: list[str], hf=hf) -> list[int]:
                    return [len(ids) for ids in hf(texts, add_special_tokens=False)["input_ids"]]

            else:
                raise FileNotFoundError(f"tokenizer not found: {path} (a tokenizer folder or tokenizer.json)")
            _TOKENIZERS[path] = count
        return _TOKENIZERS[path]


def _token_counts(texts: list[str], rules: ValidationRules) -> np.ndarray:
    # a text over max_chars is quarantined anyway: cap what is tokenized (a 10 MB line stays cheap)
    cap = rules.max_chars + 1
    counter = load_token_counter(str(rules.tokenizer))
    clean = [t[:cap].encode("utf-8", "replace").decode("utf-8") for t in texts]
    return np.asarray(counter(clean), dtype=np.int64) if clean else np.zeros(0, dtype=np.int64)


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
    """The frame the suite runs on: text columns plus helper columns (no list values)."""
    kind = kind or kind_of(records)
    rules = rules or ValidationRules()
    prompts = records["prompt"].tolist()
    out: dict[str, Any] = {
        "row": records["row"].astype("int64").to_numpy(),
        "prompt_text": [render_prompt(p) for p in prompts],
        "prompt_final": [last_user_turn(p) for p in prompts],
    }
    for col in COMPLETION_FIELDS[kind]:
        out[col] = ["" if v is None else str(v) for v in records[col].tolist()]
    if kind == "pairwise":
        out["pair_differs"] = [normalize_text(c) != normalize_text(r) for c, r in zip(out["chosen"], out["rejected"])]
    if kind == "binary":
        out["label_type"] = ["bool" if isinstance(v, (bool, np.bool_)) else type(v).__name__ for v in records["label"]]
    if rules.tokenizer:
        out["prompt_tokens"] = _token_counts(out["prompt_text"], rules)
        completions = [_token_counts(out[c], rules) for c in COMPLETION_FIELDS[kind]]
        out["completion_tokens"] = (
            np.maximum.reduce(completions) if completions else np.zeros(len(records), dtype=np.int64)
        )
    if rules.pii == "quarantine":
        pii_rows = pii_rows if pii_rows is not None else _pii_scan(records, kind, redact=False)[1]
        out["pii_found"] = [int(r) in pii_rows for r in out["row"]]
    # lone surrogates (invalid UTF-8, "\ud800" escapes) cannot be hashed or stored by pandas/GX:
    # they become U+FFFD, which the suite's text rule quarantines as INVALID_TEXT
    for col in ("prompt_text", "prompt_final", *COMPLETION_FIELDS[kind]):
        out[col] = [_SURROGATES.sub("\ufffd", t) if _SURROGATES.search(t) else t for t in out[col]]
    frame = pd.DataFrame(
        {k: (pd.Series(v, dtype=object) if isinstance(v, list) else v) for k, v in out.items()}
    )
    columns = COLUMNS_BY_KIND[kind][1:]
    keys = [record_key(dict(zip(columns, values)), kind) for values in zip(*(records[c] for c in columns))]
    frame[KEY_COLUMN[kind]] = pd.Series(keys, dtype=object)
    return frame


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
    """Row keys as sorted uint64 (first 64 bits of the sha256) with the row that had each first:
    16 bytes a key, so a batch of millions of rows can be checked for duplicates across chunks."""

    def __init__(self) -> None:
        self.keys = np.zeros(0, dtype=np.uint64)
        self.rows = np.zeros(0, dtype=np.int64)

    @classmethod
    def from_hex(cls, keys: Iterable[str] | None) -> KeySet:
        out = cls()
        if keys:
            arr = np.fromiter((_key64(k) for k in keys), dtype=np.uint64)
            out.add(arr, np.zeros(len(arr), dtype=np.int64))
        return out

    def __len__(self) -> int:
        return len(self.keys)

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found mask, first row of each found key)."""
        if not len(self.keys) or not len(keys):
            return np.zeros(len(keys), dtype=bool), np.zeros(len(keys), dtype=np.int64)
        pos = np.searchsorted(self.keys, keys)
        pos_c = np.minimum(pos, len(self.keys) - 1)
        found = self.keys[pos_c] == keys
        return found, self.rows[pos_c]

    def add(self, keys: np.ndarray, rows: np.ndarray) -> None:
        if not len(keys):
            return
        keys = np.concatenate([self.keys, keys.astype(np.uint64)])
        rows = np.concatenate([self.rows, rows.astype(np.int64)])
        order = np.argsort(keys, kind="stable")
        keys, rows = keys[order], rows[order]
        first = np.ones(len(keys), dtype=bool)
        first[1:] = keys[1:] != keys[:-1]
        self.keys, self.rows = keys[first], rows[first]


# --------------------------------------------------------------------------- routing


@dataclass
class _Routed:
    result: ValidationResult
    accepted_frame: pd.DataFrame | None  # derived frame of the accepted rows (for the chunk gate)


def _route(
    imported: ImportResult,
    rules: ValidationRules,
    known: KeySet | None = None,
    seen: KeySet | None = None,
) -> _Routed:
    kind = imported.kind
    records = imported.records.reset_index(drop=True)
    quarantine_rows: list[dict[str, Any]] = imported.rejected.to_dict("records")
    failed: dict[int, tuple[ReasonCode, str]] = {}
    pii_summary: dict | None = None
    truncation: dict | None = _new_truncation(rules) if rules.tokenizer else None
    accepted_frame = None

    if rules.pii != "off":
        records, pii_rows, counts = _pii_scan(records, kind, redact=rules.pii == "redact")
        pii_summary = {"mode": rules.pii, "rows": len(pii_rows), **{t: int(counts.get(t, 0)) for t in PII_TYPES}}
    else:
        pii_rows = {}

    if len(records):
        frame = derived_frame(records, kind, rules, pii_rows)
        key_col = KEY_COLUMN[kind]
        for er, reason in _run_suite(frame, rules, complete=True, kind=kind):
            if reason is ReasonCode.DUPLICATE or er.success:
                continue
            if er.exception_info and er.exception_info.get("raised_exception"):
                raise RuntimeError(f"expectation {er.expectation_config.type} raised: {er.exception_info}")
            _, column = _describe(er)
            if column in _TOKEN_DETAIL:
                n = rules.max_prompt_tokens if column == "prompt_tokens" else rules.max_completion_tokens
                detail = _TOKEN_DETAIL[column].format(n=n)
            else:
                detail = _DETAIL[reason].format(
                    column=_COLUMN_NAMES.get(column, column), max_chars=rules.max_chars, first="?"
                )
            for item in er.result.get("unexpected_index_list") or []:
                row = int(item["row"])
                failed.setdefault(row, (reason, detail))  # first failure wins (suite order)

        # duplicates among the rows that pass: earlier batches, then this batch (earlier chunks,
        # then this chunk); the first copy is kept
        passing = frame[~frame["row"].isin(failed.keys())]
        k64 = np.fromiter((_key64(k) for k in passing[key_col]), dtype=np.uint64, count=len(passing))
        rows = passing["row"].to_numpy(dtype=np.int64)
        if known is not None and len(known):
            hit, _ = known.lookup(k64)
            for row in rows[hit]:
                failed[int(row)] = (ReasonCode.DUPLICATE_ACROSS_BATCHES, _DETAIL[ReasonCode.DUPLICATE_ACROSS_BATCHES])
            keep = ~hit
            passing, k64, rows = passing[keep], k64[keep], rows[keep]
        if seen is not None and len(seen):
            hit, first_rows = seen.lookup(k64)
            for row, first in zip(rows[hit], first_rows[hit]):
                failed[int(row)] = (ReasonCode.DUPLICATE, _DETAIL[ReasonCode.DUPLICATE].format(first=int(first)))
            keep = ~hit
            passing, k64, rows = passing[keep], k64[keep], rows[keep]
        dup = passing.duplicated(key_col, keep="first").to_numpy()
        if dup.any():
            first_row = passing[~dup].set_index(key_col)["row"]
            for key, row in zip(passing.loc[dup, key_col], passing.loc[dup, "row"]):
                failed[int(row)] = (ReasonCode.DUPLICATE, _DETAIL[ReasonCode.DUPLICATE].format(first=int(first_row[key])))
        if seen is not None:
            seen.add(k64[~dup], rows[~dup])

        if failed:
            bad = records[records["row"].isin(failed.keys())]
            for rec in bad.to_dict("records"):
                row = int(rec["row"])
                reason, detail = failed[row]
                if reason is ReasonCode.PII:
                    detail = "contains personal data: " + ", ".join(
                        f"{n} {t}" for t, n in sorted(pii_rows.get(row, Counter()).items())
                    )
                quarantine_rows.append(
                    {"row": row, "reason": reason, "detail": detail,
                     "raw": imported.raw_lines.get(row) or truncate_raw(_raw(rec))}
                )
        accepted_frame = frame[~frame["row"].isin(failed.keys())].reset_index(drop=True)
        if truncation is not None and len(accepted_frame):
            _count_truncation(truncation, accepted_frame, rules, kind)

    accepted = records[~records["row"].isin(failed.keys())].reset_index(drop=True)[COLUMNS_BY_KIND[kind]]
    if kind == "binary":
        accepted["label"] = accepted["label"].astype(bool)
    if rules.pii != "off":  # with screening on, no PII is persisted: not even in the quarantine
        for q in quarantine_rows:
            q["raw"] = redact_pii(str(q["raw"]))[0]
    quarantined = quarantine_frame(quarantine_rows)
    if len(quarantined):
        quarantined = quarantined.sort_values("row", kind="stable").reset_index(drop=True)[QUARANTINE_COLUMNS]
    out = ValidationResult(
        source=imported.source,
        rows=imported.rows,
        accepted=accepted,
        quarantined=quarantined,
        kind=kind,
        layout=imported.layout,
        truncation=truncation,
        pii=pii_summary,
        over_length_policy=rules.over_length_policy,
    )
    assert len(out.accepted) + len(out.quarantined) == out.rows, "validation must account for every row"
    return _Routed(out, accepted_frame)


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


def _raw(rec: dict[str, Any]) -> str:
    out = {k: ([dict(m) for m in as_messages(v)] if k == "prompt" else v) for k, v in rec.items() if k != "row"}
    return json.dumps(out, ensure_ascii=False, default=str)


# --------------------------------------------------------------------------- public API


def validate_records(
    imported: ImportResult, rules: ValidationRules = ValidationRules(), known_keys: set[str] | None = None
) -> ValidationResult:
    """Route every imported row to `accepted` or `quarantined` (with a ReasonCode)."""
    known = KeySet.from_hex(known_keys) if known_keys else None
    return _route(imported, rules, known, KeySet()).result


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


def validate_file_to_parquet(
    path: str | Path,
    accepted_path: str | Path,
    quarantine_path: str | Path,
    rules: ValidationRules = ValidationRules(),
    layout: str | None = None,
    known_keys: set[str] | None = None,
    chunk_rows: int = 50_000,
) -> dict:
    """Validate a file chunk by chunk, streaming accepted rows (`write_records` format) and
    quarantined rows (QUARANTINE_COLUMNS) to Parquet. Memory is bounded by the chunk size (plus
    16 bytes per accepted row for duplicate detection). The outputs appear only when the whole
    file was read (written to temporary names, then renamed); a FeedbackFileError leaves none.

    Returns the summary: rows, accepted, quarantined, by_reason, kind, layout, truncation, pii,
    over_length_policy, suite_success (the suite on every accepted chunk and the batch
    quarantine-fraction gate, recorded as data: the batch gate is `run_expectation_suite`),
    suite (failed expectations), samples (<= 5 quarantined rows), chunks.
    """
    import pyarrow.parquet as pq

    from alignment_pipelines.data.records import quarantine_schema, quarantine_table, records_schema, records_table

    accepted_path, quarantine_path = Path(accepted_path), Path(quarantine_path)
    for p in (accepted_path, quarantine_path):
        p.parent.mkdir(parents=True, exist_ok=True)
    tmp_a = accepted_path.with_name(accepted_path.name + ".partial")
    tmp_q = quarantine_path.with_name(quarantine_path.name + ".partial")
    known = KeySet.from_hex(known_keys) if known_keys else None
    seen = KeySet()
    writer_a = writer_q = None
    rows = accepted = quarantined = chunks = 0
    by_reason: Counter = Counter()
    samples: list[dict] = []
    failed_expectations: dict[str, dict] = {}
    chunk_gates_ok = True
    truncation: dict | None = None
    pii: dict | None = None
    kind, file_layout = "pairwise", "none"
    try:
        for imported in iter_feedback_chunks(path, layout=layout, chunk_rows=chunk_rows):
            routed = _route(imported, rules, known, seen)
            result = routed.result
            kind, file_layout = result.kind, result.layout
            if writer_a is None:
                writer_a = pq.ParquetWriter(tmp_a, records_schema(kind))
                writer_q = pq.ParquetWriter(tmp_q, quarantine_schema())
            if len(result.accepted):
                writer_a.write_table(records_table(result.accepted).cast(records_schema(kind)))
            if len(result.quarantined):
                q = result.quarantined
                writer_q.write_table(quarantine_table(q))
                for rec in q.head(5 - len(samples)).to_dict("records") if len(samples) < 5 else []:
                    samples.append({"row": int(rec["row"]), "reason": str(rec["reason"]), "detail": rec["detail"]})
            # the chunk gate: the suite on this chunk's accepted rows (reusing the derived frame)
            if routed.accepted_frame is not None and len(routed.accepted_frame):
                for r in _report_rows(routed.accepted_frame, rules, kind):
                    if not r["success"]:
                        chunk_gates_ok = False
                        entry = failed_expectations.setdefault(
                            f"{r['expectation']}:{r['column']}", {**r, "reason": str(r["reason"]), "unexpected_count": 0}
                        )
                        entry["unexpected_count"] += r["unexpected_count"]
            rows += result.rows
            accepted += len(result.accepted)
            quarantined += len(result.quarantined)
            by_reason.update(result.counts_by_reason())
            truncation = _add_truncation(truncation, result.truncation)
            if result.pii is not None:
                pii = dict(result.pii) if pii is None else {
                    k: (v + result.pii[k] if isinstance(v, int) else v) for k, v in pii.items()
                }
            chunks += 1
        if writer_a is None:  # pragma: no cover - iter_feedback_chunks always yields
            raise RuntimeError("no chunk read")
    except BaseException:
        for w in (writer_a, writer_q):
            if w is not None:
                w.close()
        for p in (tmp_a, tmp_q):
            p.unlink(missing_ok=True)
        raise
    writer_a.close()
    writer_q.close()
    if accepted + quarantined != rows:  # the contract, checked every time
        tmp_a.unlink(missing_ok=True)
        tmp_q.unlink(missing_ok=True)
        raise AssertionError(f"{path}: rows lost in validation: {rows} in, {accepted} accepted, {quarantined} quarantined")
    os.replace(tmp_a, accepted_path)
    os.replace(tmp_q, quarantine_path)
    defects = defect_count(by_reason)
    gate = _gate_result(defects, rows - (quarantined - defects), rules)
    if not gate["success"]:
        failed_expectations[GATE_EXPECTATION] = {**gate, "reason": str(gate["reason"])}
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
        "suite_success": bool(chunk_gates_ok and gate["success"]),
        "suite": {"failed": list(failed_expectations.values()), "quarantine_fraction": gate["observed_value"]},
        "samples": samples,
        "chunks": chunks,
        "chunk_rows": chunk_rows,
    }
