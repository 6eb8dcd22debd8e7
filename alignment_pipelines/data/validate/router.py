"""Row routing over Arrow columns: every row of a chunk accepted, or quarantined with its reason.

The rules (`rules`) are those of the kind's Great Expectations suite (`gate._row_expectations`), in the same
order and with the same patterns, evaluated as Arrow kernels over the whole chunk: the first rule a row fails
is its reason. Duplicates among the rows that pass follow (earlier batches, earlier chunks, this chunk; the
first copy kept; `KeySet`). GX itself runs once on the batch, as its gate (`gate.run_expectation_suite_on_file`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from alignment_pipelines.data import columnar
from alignment_pipelines.data.columnar import COMPLETION_FIELDS, derived_columns
from alignment_pipelines.data.ingest.chunks import Chunk
from alignment_pipelines.data.schemas import ReasonCode
from alignment_pipelines.data.validate.rules import (COLUMN_NAMES, DETAIL, NON_BLANK, TEXT_RULES, TOKEN_DETAIL,
                                                     count_truncation, new_truncation)
from alignment_pipelines.data.validate.tokens import load_token_counter

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
            return COLUMN_NAMES.get(column, column)

        for col in non_blank:
            ok = pc.match_substring_regex(derived[col], NON_BLANK).to_numpy(zero_copy_only=False)
            fail(~ok, ReasonCode.EMPTY_FIELD, DETAIL[ReasonCode.EMPTY_FIELD].format(column=name(col)))
        for col in texts:
            bad = columnar.control_char_rows(derived[col])
            fail(bad, ReasonCode.INVALID_TEXT, DETAIL[ReasonCode.INVALID_TEXT].format(column=name(col)))
        for col in texts:
            long = pc.greater(pc.utf8_length(derived[col]), rules.max_chars).to_numpy(zero_copy_only=False)
            fail(long, ReasonCode.TOO_LONG,
                 DETAIL[ReasonCode.TOO_LONG].format(column=name(col), max_chars=rules.max_chars))
        normalized: dict[str, pa.Array] = {}
        if kind == "pairwise":
            normalized = {c: columnar.normalize(derived[c]) for c in ("chosen", "rejected")}
            same = pc.equal(normalized["chosen"], normalized["rejected"]).to_numpy(zero_copy_only=False)
            fail(same, ReasonCode.IDENTICAL_PAIR, DETAIL[ReasonCode.IDENTICAL_PAIR])
        if kind == "binary":
            label_ok = chunk.label_ok if chunk.label_ok is not None else np.ones(n, dtype=bool)
            fail(~label_ok, ReasonCode.WRONG_TYPE, DETAIL[ReasonCode.WRONG_TYPE])

        if rules.tokenizer:
            # token lengths of the rows still in: the accepted rows are among them
            live = np.flatnonzero(reason_of < 0)
            counter = load_token_counter(str(rules.tokenizer))
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
                     TOKEN_DETAIL["prompt_tokens"].format(n=rules.max_prompt_tokens))
                if COMPLETION_FIELDS[kind]:
                    fail(completion_tokens > rules.max_completion_tokens, ReasonCode.TOO_LONG,
                         TOKEN_DETAIL["completion_tokens"].format(n=rules.max_completion_tokens))
        if rules.pii == "quarantine":
            rows = table.column("row").to_numpy()
            pii_rows = chunk.pii_rows or {}
            found = np.fromiter((int(r) in pii_rows for r in rows), dtype=bool, count=n) if pii_rows else np.zeros(n, bool)
            fail(found, ReasonCode.PII, DETAIL[ReasonCode.PII])

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
    kind, table = chunk.kind, chunk.table
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
        reasons.append((ReasonCode.DUPLICATE_ACROSS_BATCHES, DETAIL[ReasonCode.DUPLICATE_ACROSS_BATCHES]))
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
                reasons.append((ReasonCode.DUPLICATE, DETAIL[ReasonCode.DUPLICATE].format(first=int(first))))
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
        truncation = new_truncation(rules)
        if accepted.num_rows:
            count_truncation(truncation, pd.DataFrame(accepted_tokens), rules, kind)
    return Routed(accepted=accepted, quarantine=quarantine, keys=keys_table, truncation=truncation,
                  accepted_mask=accepted_mask, token_columns=accepted_tokens)




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

