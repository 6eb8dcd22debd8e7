"""Parquet I/O of feedback records (every kind) and quarantine rows, with fixed Arrow schemas.

`prompt` is stored as list<struct<role, content>>, `row` as int64, `label` as bool, the answers as
strings; reading gives the prompt back as a list of {"role", "content"} dicts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from alignment_pipelines.data.schemas import COLUMNS_BY_KIND, QUARANTINE_COLUMNS, as_messages, check_kind


def _arrow_type(col: str):
    """The Arrow type of a records column (None: inferred from the values)."""
    import pyarrow as pa

    if col == "prompt":
        return pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    if col == "row":
        return pa.int64()
    if col in ("chosen", "rejected", "completion"):
        return pa.string()
    if col == "label":
        return pa.bool_()
    return None


def records_schema(kind: str):
    """The Arrow schema of `write_records` output for a kind (fixed, also for empty frames)."""
    import pyarrow as pa

    return pa.schema([pa.field(c, _arrow_type(c)) for c in COLUMNS_BY_KIND[check_kind(kind)]])


def records_table(df: pd.DataFrame):
    """Records as an Arrow table: prompt as list<struct<role, content>>, label as bool."""
    import pyarrow as pa

    arrays, fields = [], []
    for col in df.columns:
        values = df[col].tolist()
        if col == "prompt":
            values = [as_messages(v) for v in values]
        elif col == "label":
            values = [None if v is None else bool(v) for v in values]
        typ = _arrow_type(str(col))
        arr = pa.array(values, type=typ) if typ is not None else pa.array(values)
        arrays.append(arr)
        fields.append(pa.field(str(col), arr.type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def write_records(df: pd.DataFrame, path: str | Path) -> Path:
    """Write records of any kind as Parquet; `prompt` is stored as list<struct<role, content>>."""
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(records_table(df), path)
    return path


def read_records(path: str | Path, columns: list[str] | None = None) -> pd.DataFrame:
    """Read records written by `write_records` (only `columns`, when given); `prompt` comes back as
    list of {"role","content"} dicts, `label` as bool."""
    import pyarrow.parquet as pq

    return arrow_to_records(pq.read_table(Path(path), columns=columns))


def head_records(path: str | Path, n: int, columns: list[str] | None = None) -> pd.DataFrame:
    """The first `n` records of a file, reading only `columns` and only the row groups that hold them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(Path(path))
    batches, taken = [], 0
    if n > 0:
        for batch in pf.iter_batches(batch_size=min(n, 65_536), columns=columns):
            batches.append(batch.slice(0, n - taken))
            taken += min(len(batch), n - taken)
            if taken >= n:
                break
    schema = pf.schema_arrow if columns is None else pa.schema([pf.schema_arrow.field(c) for c in columns])
    return arrow_to_records(pa.Table.from_batches(batches, schema=schema))


def arrow_to_records(table) -> pd.DataFrame:
    """A records table (Arrow) as the DataFrame `read_records` gives."""
    data: dict[str, Any] = {}
    for name in table.column_names:
        column = table.column(name)
        if name == "prompt":
            data[name] = pd.Series([as_messages(v) for v in column.to_pylist()], dtype=object)
        else:
            data[name] = column.to_pandas()
    return pd.DataFrame(data, columns=table.column_names)


def quarantine_schema():
    """The Arrow schema of quarantine Parquet files (QUARANTINE_COLUMNS)."""
    import pyarrow as pa

    return pa.schema([("row", pa.int64()), ("reason", pa.string()), ("detail", pa.string()), ("raw", pa.string())])


def quarantine_table(df: pd.DataFrame):
    """Quarantine rows (QUARANTINE_COLUMNS) as an Arrow table; the reason as its string value."""
    import pyarrow as pa

    return pa.Table.from_arrays(
        [
            pa.array(df["row"].to_numpy(dtype="int64")),
            *(pa.array(df[c].map(str).tolist(), type=pa.string()) for c in QUARANTINE_COLUMNS[1:]),
        ],
        schema=quarantine_schema(),
    )


def records_jsonl(table) -> list[str]:
    """Accepted records (an Arrow records table whose rows passed the rules, so no control character but tab,
    newline and carriage return) as JSON Lines built on the columns: one object a row, with its newline."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from alignment_pipelines.data import columnar

    prompt = columnar.as_array(table.column("prompt"))
    roles, contents, _ = columnar.prompt_parts(prompt)
    turns = pc.binary_join_element_wise('{"role": "', columnar.json_escape(roles), '", "content": "',
                                        columnar.json_escape(contents), '"}', "")
    parts: list[Any] = ['{"row": ', pc.cast(columnar.as_array(table.column("row")), pa.string()), ', "prompt": [',
                        pc.fill_null(pc.binary_join(columnar.list_of(prompt, turns), ", "), ""), "]"]
    for col in ("chosen", "rejected", "completion"):
        if col in table.column_names:
            parts += [f', "{col}": "', columnar.json_escape(columnar.as_array(table.column(col))), '"']
    if "label" in table.column_names:
        parts += [', "label": ', pc.if_else(columnar.as_array(table.column("label")), "true", "false")]
    parts.append("}\n")
    return pc.binary_join_element_wise(*parts, "").to_pylist()
