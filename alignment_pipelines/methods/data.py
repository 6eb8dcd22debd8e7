"""Training data for the methods: read a .parquet or .jsonl file once, check its columns, convert to TRL.

Each loader raises :class:`ConfigError` naming the file, the row and the rule. Prompts become lists of
chat messages ending with a user turn; answers become one assistant turn (TRL's conversational format).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from alignment_pipelines.data import schemas
from alignment_pipelines.methods.config import DATA_SUFFIXES, ConfigError

PAIR_COLUMNS = tuple(schemas.PAIR_COLUMNS[1:])  # without the row number
BINARY_COLUMNS = ("prompt", "completion", "label")
PROMPT_COLUMNS = ("prompt",)


def _read_table(path: Path, field: str) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        from alignment_pipelines.data.records import read_records

        return read_records(path)
    if suffix == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ConfigError(field, str(path), f"line {lineno} is not valid JSON ({exc.msg})") from exc
        return pd.DataFrame(rows)
    raise ConfigError(field, str(path), f"must be a file ending in one of {DATA_SUFFIXES}")


def normalize_prompt(prompt: Any, row: Any = None) -> list[dict[str, str]]:
    """:func:`alignment_pipelines.data.schemas.normalize_prompt`, its error as a :class:`ConfigError`."""
    if isinstance(prompt, str) and not prompt.strip():
        raise ConfigError("prompt", prompt, f"must not be empty{f' (row {row})' if row is not None else ''}")
    try:
        return schemas.normalize_prompt(prompt, row)
    except schemas.RowError as error:
        raise ConfigError("prompt", prompt, str(error)) from None


def load_table(path: str | os.PathLike, required: tuple[str, ...], field: str = "data") -> pd.DataFrame:
    """Read a data file into a DataFrame with normalized prompts and the ``required`` columns.

    Columns: ``row`` (added from the line index when missing), ``prompt`` (list of messages) and the
    required text columns as str. A pairs file serves as prompts too: only the columns asked for count.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(field, str(path), "file does not exist")
    df = _read_table(path, field)
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ConfigError(field, str(path), f"missing column(s) {missing}; found {list(df.columns)}")
    if len(df) == 0:
        raise ConfigError(field, str(path), "has no rows")
    df = df.copy()
    if "row" not in df.columns:
        df.insert(0, "row", range(len(df)))
    df["prompt"] = [normalize_prompt(p, r) for p, r in zip(df["prompt"], df["row"])]
    for col in ("chosen", "rejected", "completion"):
        if col in required:
            df[col] = [str(v) if v is not None else "" for v in df[col]]
    return df.reset_index(drop=True)


def load_pairs(path: str | os.PathLike, required: tuple[str, ...] = PAIR_COLUMNS, field: str = "data") -> pd.DataFrame:
    """Preference pairs: ``row``, ``prompt`` (messages), ``chosen``, ``rejected``."""
    return load_table(path, required, field)


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool) or type(v).__name__ == "bool_"  # numpy.bool_ from Parquet


def load_binary(path: str | os.PathLike, field: str = "data") -> pd.DataFrame:
    """Binary feedback: ``row``, ``prompt`` (messages), ``completion`` (str), ``label`` (bool, True = desirable).

    Both labels must occur (KTO needs both).
    """
    df = load_table(path, BINARY_COLUMNS, field)
    bad = [(r, v) for r, v in zip(df["row"], df["label"]) if not _is_bool(v)]
    if bad:
        row, value = bad[0]
        raise ConfigError(
            field, str(path), f"column 'label' must be boolean (true = desirable); row {row} has {value!r}"
            f" ({len(bad)} non-boolean value(s))"
        )
    df["label"] = df["label"].astype(bool)
    n_true = int(df["label"].sum())
    n_false = len(df) - n_true
    if n_true == 0 or n_false == 0:
        raise ConfigError(
            field, str(path), f"column 'label' must have both values; found {n_true} desirable, {n_false} undesirable"
        )
    return df


def rendered_prompt_lengths(tokenizer, prompts) -> list[int]:
    """Tokens of each prompt rendered by the chat template up to the assistant's turn (what a trainer feeds)."""
    texts = [tokenizer.apply_chat_template(list(p), add_generation_prompt=True, tokenize=False) for p in prompts]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def load_prompts(path: str | os.PathLike, field: str = "data") -> pd.DataFrame:
    """Prompts for online methods: any file with a ``prompt`` column (a pairs file works too), deduplicated."""
    df = load_table(path, PROMPT_COLUMNS, field)
    keys = [json.dumps(p, sort_keys=True) for p in df["prompt"]]
    return df.loc[~pd.Series(keys).duplicated().values].reset_index(drop=True)


def _answer(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def to_preference_dataset(df: pd.DataFrame):
    """TRL conversational preference dataset: prompt messages, chosen/rejected assistant turns."""
    from datasets import Dataset

    return Dataset.from_list([
        {"prompt": p, "chosen": _answer(c), "rejected": _answer(r)}
        for p, c, r in zip(df["prompt"], df["chosen"], df["rejected"])
    ])


def to_unpaired_dataset(df: pd.DataFrame):
    """TRL conversational unpaired-preference dataset: prompt messages, one assistant turn, bool label."""
    from datasets import Dataset

    return Dataset.from_list([
        {"prompt": p, "completion": _answer(c), "label": bool(lab)}
        for p, c, lab in zip(df["prompt"], df["completion"], df["label"])
    ])


def to_sft_dataset(df: pd.DataFrame, completion_only: bool = True):
    """TRL conversational SFT dataset from the chosen answers.

    ``completion_only=True`` gives the prompt-completion format (``prompt`` messages +
    ``completion`` assistant turn), on which TRL computes the loss on the answer only;
    ``False`` gives ``messages`` = prompt + chosen (loss on every token).
    """
    from datasets import Dataset

    if completion_only:
        return Dataset.from_list([{"prompt": p, "completion": _answer(c)} for p, c in zip(df["prompt"], df["chosen"])])
    return Dataset.from_list([{"messages": p + _answer(c)} for p, c in zip(df["prompt"], df["chosen"])])


def to_prompt_dataset(df: pd.DataFrame):
    """TRL conversational prompt-only dataset, what online trainers (RLOO, online DPO) sample from."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": p} for p in df["prompt"]])
