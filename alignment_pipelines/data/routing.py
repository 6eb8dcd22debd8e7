"""Row routing over Arrow columns: every row of a chunk accepted, or quarantined with its reason.

The rules are the kind's Great Expectations suite (`validation._row_expectations`), in the same order
and with the same patterns, evaluated as Arrow kernels over the whole chunk: the first rule a row fails
is its reason. Duplicates among the rows that pass follow (earlier batches, earlier chunks, this
chunk; the first copy kept). GX itself runs once on the batch, as its gate (`run_expectation_suite`).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from alignment_pipelines.data import columnar
from alignment_pipelines.data.schemas import (
    COLUMNS_BY_KIND,
    ReasonCode,
    as_messages,
    truncate_raw,
)

_SURROGATES = re.compile(r"[\ud800-\udfff]")
COMPLETION_FIELDS = {"pairwise": ("chosen", "rejected"), "binary": ("completion",), "prompts": ()}
# per kind: (columns that must be non-blank, text columns checked for control chars and length)
TEXT_RULES = {
    "pairwise": (("prompt_final", "chosen", "rejected"), ("prompt_text", "chosen", "rejected")),
    "binary": (("prompt_final", "completion"), ("prompt_text", "completion")),
    "prompts": (("prompt_final",), ("prompt_text",)),
}


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


@dataclass
class Routed:
    accepted: pa.Table  # COLUMNS_BY_KIND[kind], row order
    quarantine: list[dict]  # {"row", "reason", "detail", "raw"}, importer rejects included, row order
    keys: pa.Table  # of the accepted rows: row, key (int64: first 64 bits of the row key), prompt_key (hex)
    truncation: dict | None
    accepted_mask: np.ndarray  # over chunk.table
    token_columns: dict[str, np.ndarray] = field(default_factory=dict)  # of the accepted rows


def _rows_where(table: pa.Table, mask: np.ndarray) -> pa.Table:
    """The rows where `mask` holds, as slices of the table (no copy: nearly every row is usually kept)."""
    if mask.all():
        return table
    edges = np.flatnonzero(np.diff(np.concatenate([[False], mask, [False]]).astype(np.int8)))
    runs = [table.slice(int(a), int(b - a)) for a, b in zip(edges[0::2], edges[1::2])]
    return pa.concat_tables(runs) if runs else table.slice(0, 0)


def _cheaper_whole(index: np.ndarray, n: int) -> bool:
    """Compute over every row and keep `index`, rather than copying those rows out first."""
    return len(index) >= 0.8 * n


def derived_columns(table: pa.Table, kind: str) -> dict[str, pa.Array]:
    """The suite's text columns (prompt_text, prompt_final and the answers) of a records table."""
    prompt = columnar.as_array(table.column("prompt"))
    out = {"prompt_text": columnar.render_prompts(prompt), "prompt_final": columnar.last_user_turns(prompt)}
    for col in COMPLETION_FIELDS[kind]:
        out[col] = pc.fill_null(columnar.as_array(table.column(col)), "")
    return out


@dataclass
class Assessment:
    """What a chunk's rows are worth on their own (the part of routing that needs no other chunk): the
    first rule each row fails, token counts, and the keys of the rows that pass every rule."""

    reason_of: np.ndarray  # per row: index into `reasons`, -1 while the row passes
    reasons: list  # [(ReasonCode, detail)]
    token_columns: dict  # prompt_tokens, completion_tokens per row (with a tokenizer)
    passing: np.ndarray  # rows that pass every rule (indices)
    k64: np.ndarray  # their row keys (first 64 bits)
    prompt_keys: pa.Array  # their prompt keys (hex)


def assess_chunk(chunk: Chunk, rules) -> Assessment:
    """The rules (the kind's suite, in its order: the first failure is the reason), token lengths and the
    keys of the passing rows; see `route_chunk`."""
    from alignment_pipelines.data import validation as v

    kind, table = chunk.kind, chunk.table
    n = table.num_rows
    reason_of = np.full(n, -1, dtype=np.int32)
    reasons: list[tuple[ReasonCode, str]] = []

    def fail(mask: np.ndarray, reason: ReasonCode, detail: str) -> None:
        hit = mask & (reason_of < 0)
        if hit.any():
            reason_of[hit] = len(reasons)
        reasons.append((reason, detail))

    token_columns: dict[str, np.ndarray] = {}
    passing = np.zeros(0, dtype=np.int64)
    k64 = np.zeros(0, dtype=np.uint64)
    pk: pa.Array = pa.array([], pa.string())
    if n:
        derived = derived_columns(table, kind)
        non_blank, texts = TEXT_RULES[kind]

        def name(column: str) -> str:
            return v._COLUMN_NAMES.get(column, column)

        for col in non_blank:
            ok = pc.match_substring_regex(derived[col], v.NON_BLANK).to_numpy(zero_copy_only=False)
            fail(~ok, ReasonCode.EMPTY_FIELD, v._DETAIL[ReasonCode.EMPTY_FIELD].format(column=name(col)))
        for col in texts:
            bad = columnar.control_char_rows(derived[col])
            fail(bad, ReasonCode.INVALID_TEXT, v._DETAIL[ReasonCode.INVALID_TEXT].format(column=name(col)))
        for col in texts:
            long = pc.greater(pc.utf8_length(derived[col]), rules.max_chars).to_numpy(zero_copy_only=False)
            fail(long, ReasonCode.TOO_LONG,
                 v._DETAIL[ReasonCode.TOO_LONG].format(column=name(col), max_chars=rules.max_chars))
        normalized: dict[str, pa.Array] = {}
        if kind == "pairwise":
            normalized = {c: columnar.normalize(derived[c]) for c in ("chosen", "rejected")}
            same = pc.equal(normalized["chosen"], normalized["rejected"]).to_numpy(zero_copy_only=False)
            fail(same, ReasonCode.IDENTICAL_PAIR, v._DETAIL[ReasonCode.IDENTICAL_PAIR])
        if kind == "binary":
            label_ok = chunk.label_ok if chunk.label_ok is not None else np.ones(n, dtype=bool)
            fail(~label_ok, ReasonCode.WRONG_TYPE, v._DETAIL[ReasonCode.WRONG_TYPE])

        if rules.tokenizer:
            # token lengths of the rows still in: the accepted rows are among them
            live = np.flatnonzero(reason_of < 0)
            counter = v.load_token_counter(str(rules.tokenizer))
            prompt_tokens = np.zeros(n, dtype=np.int64)
            completion_tokens = np.zeros(n, dtype=np.int64)
            if len(live) and _cheaper_whole(live, n):
                prompt_tokens[:] = counter(derived["prompt_text"])
                for col in COMPLETION_FIELDS[kind]:
                    completion_tokens[:] = np.maximum(completion_tokens, counter(derived[col]))
            elif len(live):
                prompt_tokens[live] = counter(columnar.subset(derived["prompt_text"], live))
                for col in COMPLETION_FIELDS[kind]:
                    completion_tokens[live] = np.maximum(completion_tokens[live], counter(columnar.subset(derived[col], live)))
            token_columns = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
            if rules._token_rule:
                fail(prompt_tokens > rules.max_prompt_tokens, ReasonCode.TOO_LONG,
                     v._TOKEN_DETAIL["prompt_tokens"].format(n=rules.max_prompt_tokens))
                if COMPLETION_FIELDS[kind]:
                    fail(completion_tokens > rules.max_completion_tokens, ReasonCode.TOO_LONG,
                         v._TOKEN_DETAIL["completion_tokens"].format(n=rules.max_completion_tokens))
        if rules.pii == "quarantine":
            rows = table.column("row").to_numpy()
            pii_rows = chunk.pii_rows or {}
            found = np.fromiter((int(r) in pii_rows for r in rows), dtype=bool, count=n) if pii_rows else np.zeros(n, bool)
            fail(found, ReasonCode.PII, v._DETAIL[ReasonCode.PII])

        passing = np.flatnonzero(reason_of < 0)
        if len(passing):
            whole = _cheaper_whole(passing, n)
            sub = table if whole else columnar.subset(table, passing)
            pk_hex = columnar.prompt_keys(sub.column("prompt"))
            if kind == "pairwise":
                texts = {c: normalized[c] if whole else columnar.subset(normalized[c], passing) for c in ("chosen", "rejected")}
                k64 = columnar.record_key64(kind, pk_hex, texts)
            elif kind == "binary":
                completion = derived["completion"] if whole else columnar.subset(derived["completion"], passing)
                texts = {"completion": columnar.normalize(completion)}
                labels = pc.fill_null(columnar.as_array(sub.column("label")), False).to_numpy(zero_copy_only=False)
                k64 = columnar.record_key64(kind, pk_hex, texts, labels)
            else:
                k64 = columnar.key64(pk_hex)
            pk = pa.array(pk_hex, type=pa.string())
            if whole:  # keys of every row were computed: keep the passing rows'
                k64 = k64[passing]
                pk = columnar.subset(pk, passing)
    return Assessment(reason_of, reasons, token_columns, passing, k64, pk)


def route_chunk(chunk: Chunk, rules, known=None, seen=None, assessment: Assessment | None = None) -> Routed:
    """Route every record of `chunk` (see the module doc): `assess_chunk` (unless given), then duplicates
    among the rows that pass. `known` has `lookup(key64) -> (found, _)` (keys of earlier batches), `seen`
    is the batch's KeySet of earlier chunks (updated here)."""
    from alignment_pipelines.data import validation as v

    kind, table = chunk.kind, chunk.table
    n = table.num_rows
    rows = table.column("row").to_numpy()
    a = assessment if assessment is not None else assess_chunk(chunk, rules)
    reason_of, reasons, token_columns, passing, k64 = a.reason_of, list(a.reasons), a.token_columns, a.passing, a.k64
    keys_table = pa.table({"row": pa.array([], pa.int64()), "key": pa.array([], pa.int64()),
                           "prompt_key": pa.array([], pa.string())})
    if len(passing):
        # duplicates among the rows that pass: earlier batches, then earlier chunks, then this chunk
        prows = rows[passing]
        alive = np.ones(len(passing), dtype=bool)
        dup_across = len(reasons)
        reasons.append((ReasonCode.DUPLICATE_ACROSS_BATCHES, v._DETAIL[ReasonCode.DUPLICATE_ACROSS_BATCHES]))
        if known is not None:
            hit, _ = known.lookup(k64)
            reason_of[passing[hit]] = dup_across
            alive &= ~hit
        first_row = np.zeros(len(passing), dtype=np.int64)
        dup = np.zeros(len(passing), dtype=bool)
        if seen is not None and len(seen):
            hit, firsts = seen.lookup(k64)
            hit &= alive
            dup |= hit
            first_row[hit] = firsts[hit]
        # within the chunk: the first alive, not yet duplicate copy of each key wins
        cand = np.flatnonzero(alive & ~dup)
        if len(cand):
            order = np.argsort(k64[cand], kind="stable")
            sorted_keys = k64[cand][order]
            new_group = np.ones(len(cand), dtype=bool)
            new_group[1:] = sorted_keys[1:] != sorted_keys[:-1]
            group_first = cand[order][np.maximum.accumulate(np.where(new_group, np.arange(len(cand)), 0))]
            later = cand[order][~new_group]
            dup[later] = True
            first_row[later] = prows[group_first[~new_group]]
        if dup.any():
            dup_index = np.flatnonzero(dup)
            # one reason entry per distinct "first" row keeps details exact
            for first in np.unique(first_row[dup_index]):
                which = dup_index[first_row[dup_index] == first]
                reason_of[passing[which]] = len(reasons)
                reasons.append((ReasonCode.DUPLICATE, v._DETAIL[ReasonCode.DUPLICATE].format(first=int(first))))
        keep = alive & ~dup
        if seen is not None:
            seen.add(k64[keep], prows[keep])
        kept = np.flatnonzero(keep)
        keys_table = pa.table({
            "row": pa.array(prows[kept], type=pa.int64()),
            "key": pa.array(k64[kept].view(np.int64), type=pa.int64()),
            "prompt_key": columnar.subset(a.prompt_keys, kept),
        })

    accepted_mask = reason_of < 0
    accepted = _rows_where(table, accepted_mask)
    quarantine = list(chunk.rejected)
    bad = np.flatnonzero(~accepted_mask)
    if len(bad):
        bad_rows = rows[bad].tolist()
        raws = chunk.raw(bad_rows)
        pii_rows = chunk.pii_rows or {}
        for row, code, raw in zip(bad_rows, reason_of[bad].tolist(), raws):
            reason, detail = reasons[code]
            if reason is ReasonCode.PII:
                detail = "contains personal data: " + ", ".join(
                    f"{k} {t}" for t, k in sorted(pii_rows.get(row, Counter()).items()))
            quarantine.append({"row": int(row), "reason": reason, "detail": detail, "raw": raw})
    quarantine.sort(key=lambda q: q["row"])

    truncation = None
    accepted_tokens = {k: col[accepted_mask] for k, col in token_columns.items()}
    if rules.tokenizer:
        truncation = v._new_truncation(rules)
        if accepted.num_rows:
            v._count_truncation(truncation, pd.DataFrame(accepted_tokens), rules, kind)
    return Routed(accepted=accepted, quarantine=quarantine, keys=keys_table, truncation=truncation,
                  accepted_mask=accepted_mask, token_columns=accepted_tokens)


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
