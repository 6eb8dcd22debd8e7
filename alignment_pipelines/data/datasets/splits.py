"""Content keys, dataset versions, dedup, deterministic prompt-level splits and derivations.

Works on all three record kinds (COLUMNS_BY_KIND): pairwise, binary and prompts. Parquet I/O is in
`records.py`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pandas as pd

from alignment_pipelines.data.schemas import (
    BINARY_COLUMNS,
    COLUMNS_BY_KIND,
    PROMPT_COLUMNS,
    Message,
    as_messages,
    check_kind,
    empty_records,
    kind_of,
    normalize_text,
)


def prompt_key(prompt: list[Message] | str) -> str:
    """Stable sha256 hex of the prompt's turns, roles lowercased and contents NFC + stripped."""
    turns = [{"role": m["role"].strip().lower(), "content": normalize_text(m["content"])} for m in as_messages(prompt)]
    payload = json.dumps(turns, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8", errors="surrogatepass")).hexdigest()


SPLITS = ("train", "judge", "eval")
"""train: what every training asset learns from; judge: what only the evaluation's reward model learns from; eval:
what every model is measured on. No prompt is in two of them."""
DEFAULT_JUDGE_FRACTION = 0.2


def _unit(key: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def check_fractions(eval_fraction: float, judge_fraction: float = 0.0) -> None:
    """Each fraction in [0, 1] and together at most 1 (the rest is train)."""
    for name, value in (("eval_fraction", eval_fraction), ("judge_fraction", judge_fraction)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    if eval_fraction + judge_fraction > 1.0:
        raise ValueError(f"eval_fraction + judge_fraction must be at most 1, got {eval_fraction} + {judge_fraction}")


def assign_splits(units: dict[str, float], eval_fraction: float, judge_fraction: float = 0.0) -> dict[str, str]:
    """Each prompt key's split from its seeded hash ``unit`` in [0, 1): eval below ``eval_fraction``, judge in the
    next ``judge_fraction``, train above. The eval band does not depend on ``judge_fraction``: the judge split is
    carved out of what was train. With two or more prompts eval and train are never empty (the lowest prompt moves
    to eval, the highest to train); with ``judge_fraction > 0`` and two or more train prompts, neither is judge (the
    lowest train prompt moves there). ``sql.build_dataset`` applies the same rules in SQL."""
    check_fractions(eval_fraction, judge_fraction)
    side = {k: "eval" if u < eval_fraction else "judge" if u < eval_fraction + judge_fraction else "train"
            for k, u in units.items()}
    ranked = sorted(units, key=lambda k: (units[k], k))
    if len(ranked) >= 2:
        if "eval" not in side.values():
            side[ranked[0]] = "eval"
        if "train" not in side.values():
            side[ranked[-1]] = "train"
        train = [k for k in ranked if side[k] == "train"]
        if judge_fraction > 0 and "judge" not in side.values() and len(train) >= 2:
            side[train[0]] = "judge"
    return side


def split_three_ways(df: pd.DataFrame, eval_fraction: float = 0.1, judge_fraction: float = DEFAULT_JUDGE_FRACTION,
                     seed: int = 0) -> dict[str, pd.DataFrame]:
    """``{"train", "judge", "eval"}``: every row of a prompt goes to one of them, decided by a seeded hash of the
    prompt (:func:`assign_splits`). Independent of row order; each keeps the rows' order."""
    keys = df["prompt"].map(prompt_key) if len(df) else pd.Series([], dtype=object)
    side = assign_splits({k: _unit(k, seed) for k in set(keys)}, eval_fraction, judge_fraction)
    sides = keys.map(side).to_numpy() if len(df) else []
    return {name: (df[sides == name] if len(df) else df.copy()).reset_index(drop=True) for name in SPLITS}


def split_by_prompt(df: pd.DataFrame, eval_fraction: float = 0.1, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, eval): every row of a prompt goes to the same side, decided by a seeded hash.

    Independent of row order. Eval is non-empty whenever there are >= 2 distinct prompts
    (and train too): the prompt with the lowest (highest) hash is moved if a side is empty.
    The two-way case of :func:`split_three_ways` (no judge split).
    """
    splits = split_three_ways(df, eval_fraction, judge_fraction=0.0, seed=seed)
    return splits["train"], splits["eval"]


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


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool) or type(value).__name__ == "bool_"


def _label_token(label: Any) -> str:
    return ("1" if label else "0") if _is_bool(label) else repr(label)


def record_key(record: dict[str, Any], kind: str) -> str:
    """sha256 hex of a record's normalized content (the `row` is not content).

    pairwise: prompt + chosen + rejected; binary: prompt + completion + label; prompts: the
    prompt (equal to `prompt_key`). Used for duplicates within and across batches.
    """
    pk = prompt_key(record["prompt"])
    if kind == "prompts":
        return pk
    if kind == "pairwise":
        parts = [pk, normalize_text(str(record["chosen"])), normalize_text(str(record["rejected"]))]
    elif kind == "binary":
        parts = [pk, normalize_text(str(record["completion"])), _label_token(record["label"])]
    else:
        check_kind(kind)
    payload = json.dumps([kind, *parts], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8", errors="surrogatepass")).hexdigest()


def deduplicate(df: pd.DataFrame, kind: str | None = None) -> pd.DataFrame:
    """Drop rows whose normalized content (see `record_key`) was already seen; keep the first."""
    if not len(df):
        return df.copy()
    kind = kind or kind_of(df)
    columns = COLUMNS_BY_KIND[kind][1:]
    keys = [record_key(dict(zip(columns, values)), kind) for values in zip(*(df[c] for c in columns))]
    dup = pd.Series(keys, index=df.index).duplicated(keep="first")
    return df[~dup.to_numpy()].reset_index(drop=True)


def deduplicate_pairs(df: pd.DataFrame) -> pd.DataFrame:
    """Drop rows whose (normalized prompt, chosen, rejected) was already seen; keep the first."""
    return deduplicate(df, "pairwise")


# --------------------------------------------------------------------------- derivations


def binary_from_pairs(pairs: pd.DataFrame) -> pd.DataFrame:
    """BINARY_COLUMNS, two rows per pair: (prompt, chosen, True) then (prompt, rejected, False).

    `row` keeps the pair's row number (both rows share it)."""
    if not len(pairs):
        return empty_records("binary")
    rows = []
    for row, prompt, chosen, rejected in zip(pairs["row"], pairs["prompt"], pairs["chosen"], pairs["rejected"]):
        prompt = as_messages(prompt)
        rows.append({"row": int(row), "prompt": prompt, "completion": chosen, "label": True})
        rows.append({"row": int(row), "prompt": [dict(m) for m in prompt], "completion": rejected, "label": False})
    df = pd.DataFrame(rows, columns=BINARY_COLUMNS)
    df["label"] = df["label"].astype(bool)
    return df


def prompts_from(pairs: pd.DataFrame | None = None, binary: pd.DataFrame | None = None) -> pd.DataFrame:
    """PROMPT_COLUMNS from pairs and/or binary feedback, deduplicated by `prompt_key` (first kept,
    pairs before binary)."""
    frames = [df[["row", "prompt"]] for df in (pairs, binary) if df is not None and len(df)]
    if not frames:
        return empty_records("prompts")
    df = pd.concat(frames, ignore_index=True)
    keys = df["prompt"].map(prompt_key)
    out = df[~keys.duplicated(keep="first").to_numpy()].reset_index(drop=True)[PROMPT_COLUMNS]
    out["prompt"] = out["prompt"].map(as_messages)
    return out


def kto_balance(binary: pd.DataFrame) -> dict[str, Any]:
    """Desirable:undesirable counts, their ratio, and KTO class weights that balance them.

    The weights satisfy desirable_weight * n == undesirable_weight * m (50/50 in effect), which
    sits inside TRL's guidance of desirable_weight*n / (undesirable_weight*m) in [1, 4/3]. The
    larger class keeps weight 1.0 and the smaller one is up-weighted (so no class is scaled below
    its natural contribution). With one class empty the weights are 1.0 and `balanced` is False.
    """
    labels = binary["label"].tolist() if len(binary) else []
    bad = next((v for v in labels if not _is_bool(v)), None)
    if bad is not None:
        raise ValueError(f"label must be a boolean, got {bad!r:.40}")
    n = sum(1 for v in labels if v)
    return kto_balance_counts(n, len(labels) - n)


def kto_balance_counts(n: int, m: int) -> dict[str, Any]:
    """`kto_balance` from the counts: n desirable, m undesirable rows."""
    out: dict[str, Any] = {"desirable": n, "undesirable": m}
    if n == 0 or m == 0:
        out.update(ratio=None if m == 0 else 0.0, desirable_weight=1.0, undesirable_weight=1.0, balanced=False)
        if m == 0 and n:
            out["ratio"] = float("inf")
        return out
    if n >= m:
        w_d, w_u = 1.0, n / m
    else:
        w_d, w_u = m / n, 1.0
    out.update(
        ratio=n / m,
        desirable_weight=w_d,
        undesirable_weight=w_u,
        weighted_ratio=(w_d * n) / (w_u * m),
        balanced=True,
    )
    return out
