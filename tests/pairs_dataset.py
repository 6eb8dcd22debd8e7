"""A small preference-pairs dataset written as the `preference_pairs` asset lays one out, for tests that run a
training asset without building the datasets first."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from alignment_pipelines.refs import DatasetRef

TOPICS = ["tea", "rain", "maps", "bread", "owls", "glass", "rivers", "chess", "salt", "kites", "moss", "bells"]
EVAL_ROWS = 4


def write_pairs_dataset(root: Path, topics: int, repeats: int) -> DatasetRef:
    """``repeats`` pairs on each of the first ``topics`` topics (a polite chosen answer, a curt rejected one) under
    ``root``'s datasets folder; the last four rows are the eval split."""
    folder = root / "datasets" / "preference_pairs" / "v1"
    folder.mkdir(parents=True)
    rows = [{"prompt": [{"role": "user", "content": f"Tell me about {t} number {i}."}],
             "chosen": f"{t.title()} {i} is a fine thing to learn about.", "rejected": "No."}
            for i in range(repeats) for t in TOPICS[:topics]]
    train_rows = len(rows) - EVAL_ROWS
    pd.DataFrame(rows[:train_rows]).to_parquet(folder / "train.parquet")
    pd.DataFrame(rows[train_rows:]).to_parquet(folder / "eval.parquet")
    return DatasetRef(name="preference_pairs", version="v1", train_path=str(folder / "train.parquet"),
                      eval_path=str(folder / "eval.parquet"), batches=("b1",), train_rows=train_rows,
                      eval_rows=EVAL_ROWS)
