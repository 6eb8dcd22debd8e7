"""Training datasets built by a query engine: plain SQL over the batches' Parquet files (DuckDB here).

Inputs per batch: `accepted.parquet` (the rows) and `keys.parquet` (row, key, prompt_key: see
`key_index`); for a pairwise batch feeding `binary_feedback`, `binary_keys.parquet` (the keys of its
chosen and rejected answers as binary rows, computed once). The query
1. deduplicates by key, keeping the first copy in (source part, batch order, row) order, exactly as
   `splits.deduplicate` on the concatenated batches did;
2. versions the result by its content: a hash of the set of kept keys (count, XOR and sum of the 64-bit
   keys) with the columns and the split settings, computed from the key files alone, so an unchanged
   dataset is recognised before a single row is read and is not rewritten;
3. splits by prompt: `sha256("{seed}:{prompt_key}")` as a number in [0, 1) below `eval_fraction` goes to
   eval, in the next `judge_fraction` to judge, the rest to train (and if eval or train would be empty with two or
   more prompts, the lowest / highest prompt moves; an empty judge split takes the lowest train prompt), exactly
   `splits.assign_splits`;
4. writes train.parquet, judge.parquet and eval.parquet in (part, batch, row) order, each with COPY … TO.
Memory stays bounded (DuckDB spills to a temp folder under its memory limit); nothing is loaded into
pandas. Every statement is standard SQL apart from `read_parquet`, `sha256` and `COPY`, which have direct
equivalents in Spark SQL and Trino (docs/data-at-scale.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from alignment_pipelines.data.datasets.key_index import KEYS_FILE
from alignment_pipelines.data.datasets.splits import SPLITS, check_fractions, kto_balance_counts

BINARY_KEYS_FILE = "binary_keys.parquet"
BINARY_KEYS_SCHEMA = pa.schema([("row", pa.int64()), ("chosen_key", pa.int64()), ("rejected_key", pa.int64())])
COLUMNS = {"pairwise": ["row", "prompt", "chosen", "rejected"], "binary": ["row", "prompt", "completion", "label"],
           "prompts": ["row", "prompt"]}
SPLIT_FILES = {side: f"{side}.parquet" for side in SPLITS}


@dataclass
class BatchFiles:
    key: str  # the partition key
    kind: str  # pairwise | binary | prompts
    directory: Path

    @property
    def accepted(self) -> Path:
        return self.directory / "accepted.parquet"

    @property
    def keys(self) -> Path:
        return self.directory / KEYS_FILE

    @property
    def binary_keys(self) -> Path:
        return self.directory / BINARY_KEYS_FILE


@dataclass
class DatasetBuild:
    name: str
    version: str
    train_path: Path
    eval_path: Path
    rows: int  # after deduplication
    input_rows: int  # before
    train_rows: int
    eval_rows: int
    rewritten: bool  # False: this version was already there
    balance: dict | None = None
    timings: dict = field(default_factory=dict)
    judge_rows: int = 0  # the judge split: only the evaluation's reward model trains on it

    @property
    def judge_path(self) -> Path:
        return judge_path_beside(self.train_path)


def judge_path_beside(train_path: str | Path) -> Path:
    """A dataset version's judge split, beside its train split (``DatasetRef`` names train and eval only)."""
    return Path(train_path).with_name(SPLIT_FILES["judge"])


def ensure_binary_keys(batch: BatchFiles) -> Path:
    """A pairwise batch's binary keys of (prompt, chosen, True) and (prompt, rejected, False), computed
    once from its rows and kept beside them."""
    target = batch.binary_keys
    if target.exists():
        return target
    import pyarrow.parquet as pq

    from alignment_pipelines.data import columnar
    from alignment_pipelines.data.columnar import derived_columns

    pf = pq.ParquetFile(batch.accepted)
    tmp = target.with_name(target.name + f".{os.getpid()}.partial")
    with pq.ParquetWriter(tmp, BINARY_KEYS_SCHEMA) as writer:
        for chunk in pf.iter_batches(batch_size=50_000):
            table = pa.Table.from_batches([chunk])
            derived = derived_columns(table, "pairwise")
            pk = columnar.prompt_keys(table.column("prompt"))
            n = table.num_rows
            keys = {}
            for col, label in (("chosen", True), ("rejected", False)):
                texts = {"completion": columnar.normalize(derived[col])}
                keys[col] = columnar.record_key64("binary", pk, texts, np.full(n, label)).view(np.int64)
            writer.write_table(pa.table({"row": table.column("row"), "chosen_key": keys["chosen"],
                                         "rejected_key": keys["rejected"]}, schema=BINARY_KEYS_SCHEMA))
    os.replace(tmp, target)
    return target


def _connect(temp_dir: Path, memory_limit: str, threads: int | None):
    import duckdb

    con = duckdb.connect()
    temp_dir.mkdir(parents=True, exist_ok=True)
    con.execute(f"SET temp_directory = '{temp_dir}'")
    con.execute(f"SET memory_limit = '{memory_limit}'")
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    return con


def _files_table(batches: list[BatchFiles]) -> pa.Table:
    return pa.table({
        "ord": pa.array(range(len(batches)), type=pa.int64()),
        "kind": pa.array([b.kind for b in batches], type=pa.string()),
        "accepted": pa.array([str(b.accepted) for b in batches], type=pa.string()),
        "keys": pa.array([str(b.keys) for b in batches], type=pa.string()),
        "binary_keys": pa.array([str(b.binary_keys) for b in batches], type=pa.string()),
    })


def _source_sql(dataset: str, batches: list[BatchFiles]) -> tuple[str, str]:
    """(keyed rows: part, ord, row, sub, key, prompt_key; the rows themselves: part, ord, row, sub and the
    dataset's columns) as SQL over the registered `files` table."""
    def files_of(kind: str, column: str = "accepted") -> str:
        paths = [str(getattr(b, column)) for b in batches if b.kind == kind]
        return "[" + ", ".join("'" + p.replace("'", "''") + "'" for p in paths) + "]" if paths else ""

    keyed, rows = [], []
    acc = lambda kind: f"read_parquet({files_of(kind)}, filename = true)"  # noqa: E731
    keys = lambda kind: f"read_parquet({files_of(kind, 'keys')}, filename = true)"  # noqa: E731
    # the first 64 bits of the prompt key as the signed BIGINT the key files hold
    u = "CAST(CAST(('0x' || substr(k.prompt_key, 1, 16)) AS UBIGINT) AS HUGEINT)"
    pk64 = f"CAST(CASE WHEN {u} >= 9223372036854775808 THEN {u} - 18446744073709551616 ELSE {u} END AS BIGINT)"
    if dataset == "pairwise" and files_of("pairwise"):
        keyed.append(f"SELECT 0 AS part, f.ord, k.row, 0 AS sub, k.key, k.prompt_key FROM {keys('pairwise')} k "
                     "JOIN files f ON k.filename = f.keys")
        rows.append(f"SELECT 0 AS part, f.ord, a.row, 0 AS sub, a.prompt, a.chosen, a.rejected FROM {acc('pairwise')} a "
                    "JOIN files f ON a.filename = f.accepted")
    if dataset == "binary":
        if files_of("binary"):
            keyed.append(f"SELECT 0 AS part, f.ord, k.row, 0 AS sub, k.key, k.prompt_key FROM {keys('binary')} k "
                         "JOIN files f ON k.filename = f.keys")
            rows.append(f"SELECT 0 AS part, f.ord, a.row, 0 AS sub, a.prompt, a.completion, a.label "
                        f"FROM {acc('binary')} a JOIN files f ON a.filename = f.accepted")
        if files_of("pairwise"):
            bk = f"read_parquet({files_of('pairwise', 'binary_keys')}, filename = true)"
            for sub, col, label in ((0, "chosen", "TRUE"), (1, "rejected", "FALSE")):
                keyed.append(f"SELECT 1 AS part, f.ord, k.row, {sub} AS sub, b.{col}_key AS key, k.prompt_key "
                             f"FROM {keys('pairwise')} k JOIN files f ON k.filename = f.keys "
                             f"JOIN {bk} b ON b.filename = f.binary_keys AND b.row = k.row")
                rows.append(f"SELECT 1 AS part, f.ord, a.row, {sub} AS sub, a.prompt, a.{col} AS completion, "
                            f"{label} AS label FROM {acc('pairwise')} a JOIN files f ON a.filename = f.accepted")
    if dataset == "prompts":
        for part, kind in enumerate(("prompts", "pairwise", "binary")):
            if files_of(kind):
                key = "k.key" if kind == "prompts" else pk64
                keyed.append(f"SELECT {part} AS part, f.ord, k.row, 0 AS sub, {key} AS key, k.prompt_key "
                             f"FROM {keys(kind)} k JOIN files f ON k.filename = f.keys")
                rows.append(f"SELECT {part} AS part, f.ord, a.row, 0 AS sub, a.prompt FROM {acc(kind)} a "
                            "JOIN files f ON a.filename = f.accepted")
    if not keyed:
        return "", ""
    return " UNION ALL ".join(keyed), " UNION ALL ".join(rows)


def build_dataset(name: str, dataset: str, batches: list[BatchFiles], root: Path, eval_fraction: float = 0.1,
                  seed: int = 0, memory_limit: str = "2GB", threads: int | None = None,
                  judge_fraction: float = 0.0) -> DatasetBuild | None:
    """Build (or find) the dataset `name` of kind `dataset` from `batches` (in order) under
    `root/<version>/`. None when the batches hold no row of a usable kind."""
    import time

    check_fractions(eval_fraction, judge_fraction)
    from alignment_pipelines.data.datasets.key_index import ensure_keys

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    for b in batches:
        ensure_keys(b.directory)
        if dataset == "binary" and b.kind == "pairwise":
            ensure_binary_keys(b)
    timings["keys_s"] = time.perf_counter() - t0
    keyed, rows = _source_sql(dataset, batches)
    if not keyed:
        return None
    con = _connect(root / ".tmp", memory_limit, threads)
    try:
        con.register("files", _files_table(batches))
        con.execute(f"CREATE TEMP TABLE keyed AS {keyed}")
        con.execute("""
            CREATE TEMP TABLE kept AS
            SELECT part, ord, row, sub, key, prompt_key FROM (
                SELECT *, row_number() OVER (PARTITION BY key ORDER BY part, ord, row, sub) AS copy FROM keyed
            ) WHERE copy = 1""")
        input_rows, = con.execute("SELECT count(*) FROM keyed").fetchone()
        kept_rows, xor, total = con.execute(
            "SELECT count(*), coalesce(bit_xor(key), 0), coalesce(sum(key), 0) FROM kept").fetchone()
        if kept_rows == 0:
            return None
        version = hashlib.sha256(json.dumps(
            [COLUMNS[dataset], eval_fraction, judge_fraction, seed, int(kept_rows), int(xor), str(total)]
        ).encode()).hexdigest()[:16]
        timings["dedup_version_s"] = time.perf_counter() - t0 - timings["keys_s"]
        target = root / version
        paths = {side: target / file for side, file in SPLIT_FILES.items()}
        balance = None
        if all(path.exists() for path in paths.values()):
            import pyarrow.parquet as pq

            rows_by_side = {side: pq.ParquetFile(path).metadata.num_rows for side, path in paths.items()}
            if dataset == "binary":
                balance = _balance(con, target)
            return DatasetBuild(name, version, paths["train"], paths["eval"], int(kept_rows), int(input_rows),
                                rows_by_side["train"], rows_by_side["eval"], rewritten=False, balance=balance,
                                timings=timings, judge_rows=rows_by_side["judge"])

        # the split, per distinct prompt
        con.execute("""
            CREATE TEMP TABLE units AS
            SELECT prompt_key,
                   CAST(CAST(('0x' || substr(sha256(? || ':' || prompt_key), 1, 16)) AS UBIGINT) AS DOUBLE)
                       / 18446744073709551616.0 AS unit
            FROM (SELECT DISTINCT prompt_key FROM kept)""", [str(seed)])
        con.execute("CREATE TEMP TABLE split AS SELECT prompt_key, unit, CASE WHEN unit < ? THEN 'eval' "
                    "WHEN unit < ? THEN 'judge' ELSE 'train' END AS side FROM units",
                    [float(eval_fraction), float(eval_fraction + judge_fraction)])

        def prompts_in(side: str) -> int:
            return con.execute("SELECT count(*) FROM split WHERE side = ?", [side]).fetchone()[0]

        def move(side: str, order: str, among: str = "TRUE") -> None:
            con.execute(f"UPDATE split SET side = ? WHERE prompt_key = (SELECT prompt_key FROM split WHERE {among} "
                        f"ORDER BY {order} LIMIT 1)", [side])

        prompts, = con.execute("SELECT count(*) FROM split").fetchone()
        if prompts >= 2 and not prompts_in("eval"):
            move("eval", "unit, prompt_key")
        if prompts >= 2 and not prompts_in("train"):
            move("train", "unit DESC, prompt_key DESC")
        if judge_fraction > 0 and not prompts_in("judge") and prompts_in("train") >= 2:
            move("judge", "unit, prompt_key", among="side = 'train'")
        timings["split_s"] = time.perf_counter() - t0 - sum(timings.values())

        tmp = root / f".{version}.{os.getpid()}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        columns = ", ".join(f"r.{c}" for c in COLUMNS[dataset])
        counts = {}
        for side, file in SPLIT_FILES.items():
            out = tmp / file
            con.execute(f"""
                COPY (
                    SELECT {columns} FROM ({rows}) r
                    JOIN kept k ON r.part = k.part AND r.ord = k.ord AND r.row = k.row AND r.sub = k.sub
                    JOIN split s ON s.prompt_key = k.prompt_key
                    WHERE s.side = '{side}'
                    ORDER BY r.part, r.ord, r.row, r.sub
                ) TO '{out}' (FORMAT parquet, COMPRESSION zstd)""")
            counts[side] = con.execute(f"SELECT count(*) FROM read_parquet('{out}')").fetchone()[0]
        if target.exists():  # a build that died half-way; this one is complete
            shutil.rmtree(target)
        os.replace(tmp, target)
        timings["write_s"] = time.perf_counter() - t0 - sum(timings.values())
        if dataset == "binary":
            balance = _balance(con, target)
        return DatasetBuild(name, version, paths["train"], paths["eval"], int(kept_rows), int(input_rows),
                            int(counts["train"]), int(counts["eval"]), rewritten=True, balance=balance, timings=timings,
                            judge_rows=int(counts["judge"]))
    finally:
        con.close()


def _balance(con, target: Path) -> dict:
    files = ", ".join(f"'{target / file}'" for file in SPLIT_FILES.values())
    n, m = con.execute(
        f"SELECT coalesce(sum(CASE WHEN label THEN 1 ELSE 0 END), 0), coalesce(sum(CASE WHEN label THEN 0 ELSE 1 END), 0) "
        f"FROM read_parquet([{files}])").fetchone()
    return kto_balance_counts(int(n), int(m))
