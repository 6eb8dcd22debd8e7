"""The key index: every accepted batch's duplicate keys, stored once, queried without loading rows.

Each batch that validation accepts rows from writes `keys.parquet` beside its `accepted.parquet`: one row
per accepted row with
- `row`: the row number (joins the key to its record),
- `key`: the first 64 bits of the row's content key (`splits.record_key`), as a signed BIGINT,
- `prompt_key`: the prompt's key (`splits.prompt_key`, hex), which the split and the prompts dataset use.

Whether a new batch repeats history is one query: a semi-join of the chunk's keys against the key files
of the earlier batches whose gate passed (`KeyIndex.lookup`, DuckDB over Parquet). It reads 8 bytes per
historical row, never the rows themselves, and costs O(chunk) in memory. A batch validated before the
index existed gets its key file from its accepted rows the first time it is needed (`ensure_keys`).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa

KEYS_FILE = "keys.parquet"
KEYS_SCHEMA = pa.schema([("row", pa.int64()), ("key", pa.int64()), ("prompt_key", pa.string())])
_LOCK = threading.Lock()


def ensure_keys(batch_dir: Path, accepted_file: str = "accepted.parquet") -> Path:
    """The batch's key file, built from its accepted rows if it has none yet (batches ingested before
    the index); the rows are read once, chunk by chunk, and never again."""
    target = Path(batch_dir) / KEYS_FILE
    if target.exists():
        return target
    import pyarrow.parquet as pq

    from alignment_pipelines.data.columnar import derived_columns
    from alignment_pipelines.data.schemas import kind_of

    source = Path(batch_dir) / accepted_file
    pf = pq.ParquetFile(source)
    kind = kind_of(pa.schema(pf.schema_arrow).empty_table().to_pandas())
    tmp = target.with_name(target.name + f".{os.getpid()}.partial")
    with pq.ParquetWriter(tmp, KEYS_SCHEMA) as writer:
        for batch in pf.iter_batches(batch_size=50_000):
            table = pa.Table.from_batches([batch])
            writer.write_table(table_keys(table, kind, derived_columns(table, kind)))
    os.replace(tmp, target)
    return target


def table_keys(table: pa.Table, kind: str, derived: dict) -> pa.Table:
    """KEYS_SCHEMA rows of a records table (rows that passed the rules)."""
    from alignment_pipelines.data import columnar

    pk = columnar.prompt_keys(table.column("prompt"))
    texts = {c: columnar.normalize(derived[c]) for c in ("chosen", "rejected", "completion") if c in derived}
    labels = (columnar.as_array(table.column("label")).to_numpy(zero_copy_only=False).astype(bool)
              if kind == "binary" else None)
    k64 = columnar.record_key64(kind, pk, texts, labels)
    return pa.table({"row": columnar.as_array(table.column("row")).cast(pa.int64()),
                     "key": pa.array(k64.view(np.int64), type=pa.int64()),
                     "prompt_key": pa.array(pk, type=pa.string())}, schema=KEYS_SCHEMA)


class KeyIndex:
    """Lookups of row keys in the key files of a set of batches (see the module doc)."""

    def __init__(self, key_files: list[Path]):
        self.files = [str(f) for f in key_files]
        self._con = None

    def __len__(self) -> int:
        return len(self.files)

    def _connection(self):
        if self._con is None:
            import duckdb

            self._con = duckdb.connect()
        return self._con

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found mask, zeros): which of `keys` (uint64) any indexed batch holds."""
        keys = np.asarray(keys, dtype=np.uint64)
        found = np.zeros(len(keys), dtype=bool)
        if not self.files or not len(keys):
            return found, np.zeros(len(keys), dtype=np.int64)
        probe = pa.table({"key": pa.array(keys.view(np.int64), type=pa.int64())})  # noqa: F841 - read by DuckDB
        con = self._connection()
        con.register("probe", probe)
        try:
            hits = con.execute(
                "SELECT DISTINCT key FROM read_parquet(?) WHERE key IN (SELECT key FROM probe)", [self.files]
            ).fetchnumpy()["key"]
        finally:
            con.unregister("probe")
        if len(hits):
            found = np.isin(keys.view(np.int64), np.asarray(hits, dtype=np.int64))
        return found, np.zeros(len(keys), dtype=np.int64)

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None
