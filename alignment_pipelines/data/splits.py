"""Deterministic prompt-level splits, content versions, dedup and Parquet I/O for pair records."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pandas as pd

from alignment_pipelines.data.schemas import Message, as_messages, normalize_text


def _normalized(prompt: Any) -> list[dict[str, str]]:
    return [{"role": m["role"].strip().lower(), "content": normalize_text(m["content"])} for m in as_messages(prompt)]


def prompt_key(prompt: list[Message] | str) -> str:
    """Stable sha256 hex of the normalized prompt (roles lowercased, contents NFC + stripped)."""
    payload = json.dumps(_normalized(prompt), ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _unit(key: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_by_prompt(df: pd.DataFrame, eval_fraction: float = 0.1, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, eval): every row of a prompt goes to the same side, decided by a seeded hash.

    Independent of row order. Eval is non-empty whenever there are >= 2 distinct prompts
    (and train too): the prompt with the lowest (highest) hash is moved if a side is empty.
    """
    if not 0.0 <= eval_fraction <= 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction}")
    keys = df["prompt"].map(prompt_key) if len(df) else pd.Series([], dtype=object)
    units = {k: _unit(k, seed) for k in set(keys)}
    in_eval = {k: u < eval_fraction for k, u in units.items()}
    if len(units) >= 2:
        ranked = sorted(units, key=lambda k: (units[k], k))
        if not any(in_eval.values()):
            in_eval[ranked[0]] = True
        if all(in_eval.values()):
            in_eval[ranked[-1]] = False
    mask = keys.map(in_eval).astype(bool).to_numpy() if len(df) else []
    train = df[~mask] if len(df) else df.copy()
    evaluation = df[mask] if len(df) else df.copy()
    return train.reset_index(drop=True), evaluation.reset_index(drop=True)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def dataset_version(df: pd.DataFrame) -> str:
    """sha256 (first 16 hex) of the rows' content, independent of row order.

    Provenance columns (`row`) are excluded: the same pairs from other line numbers are the
    same dataset. The prompt is hashed as its message list.
    """
    columns = sorted(c for c in df.columns if c != "row")
    row_hashes = []
    for rec in df[columns].to_dict("records"):
        rec = {k: (as_messages(v) if k == "prompt" else _jsonable(v)) for k, v in rec.items()}
        payload = json.dumps(rec, ensure_ascii=False, sort_keys=True, separators=(",", ":"), default=str)
        row_hashes.append(hashlib.sha256(payload.encode("utf-8")).hexdigest())
    digest = hashlib.sha256(json.dumps(columns).encode())
    for h in sorted(row_hashes):
        digest.update(h.encode())
    return digest.hexdigest()[:16]


def deduplicate_pairs(df: pd.DataFrame) -> pd.DataFrame:
    """Drop rows whose (normalized prompt, chosen, rejected) was already seen; keep the first."""
    if not len(df):
        return df.copy()
    keys = [
        (prompt_key(p), normalize_text(str(c)), normalize_text(str(r)))
        for p, c, r in zip(df["prompt"], df["chosen"], df["rejected"])
    ]
    dup = pd.Series(keys, index=df.index).duplicated(keep="first")
    return df[~dup.to_numpy()].reset_index(drop=True)


def _arrow_schema(df: pd.DataFrame):
    import pyarrow as pa

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    fields = []
    for col in df.columns:
        if col == "prompt":
            fields.append(pa.field("prompt", pa.list_(message)))
        elif col == "row":
            fields.append(pa.field("row", pa.int64()))
        elif col in ("chosen", "rejected", "completion"):
            fields.append(pa.field(col, pa.string()))
    return fields


def write_records(df: pd.DataFrame, path: str | Path) -> Path:
    """Write records as Parquet; `prompt` is stored as list<struct<role, content>>."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    known = {f.name: f for f in _arrow_schema(df)}
    arrays, fields = [], []
    for col in df.columns:
        values = df[col].tolist()
        if col == "prompt":
            values = [as_messages(v) for v in values]
        if col in known:
            arrays.append(pa.array(values, type=known[col].type))
            fields.append(known[col])
        else:
            arr = pa.array(values)
            arrays.append(arr)
            fields.append(pa.field(str(col), arr.type))
    table = pa.Table.from_arrays(arrays, schema=pa.schema(fields))
    pq.write_table(table, path)
    return path


def read_records(path: str | Path) -> pd.DataFrame:
    """Read records written by `write_records`; `prompt` comes back as list of {"role","content"} dicts."""
    import pyarrow.parquet as pq

    table = pq.read_table(Path(path))
    data: dict[str, Any] = {}
    for name in table.column_names:
        column = table.column(name)
        if name == "prompt":
            data[name] = pd.Series([as_messages(v) for v in column.to_pylist()], dtype=object)
        else:
            data[name] = column.to_pandas()
    return pd.DataFrame(data, columns=table.column_names)
