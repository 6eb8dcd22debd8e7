"""Training datasets of every kind: derivations, dedup, KTO balance, Parquet round-trip, splits."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from alignment_pipelines.data.records import read_records, write_records
from alignment_pipelines.data.schemas import BINARY_COLUMNS, PROMPT_COLUMNS
from alignment_pipelines.data.datasets.splits import (binary_from_pairs, dataset_version, deduplicate,
                                                      deduplicate_pairs, kto_balance, prompt_key, prompts_from,
                                                      split_by_prompt)


def user(text):
    return [{"role": "user", "content": text}]


@pytest.fixture()
def pairs() -> pd.DataFrame:
    return pd.DataFrame(
        [{"row": i + 1, "prompt": user(f"Q{i % 3}?"), "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(5)]
    )


def test_binary_from_pairs(pairs):
    binary = binary_from_pairs(pairs)
    assert list(binary.columns) == BINARY_COLUMNS and len(binary) == 10
    assert binary["label"].tolist() == [True, False] * 5
    assert binary["completion"].tolist()[:2] == ["good 0", "bad 0"]
    assert binary["row"].tolist()[:4] == [1, 1, 2, 2]
    assert binary_from_pairs(pairs.iloc[:0]).columns.tolist() == BINARY_COLUMNS


def test_prompts_from_pairs_and_binary(pairs):
    extra = pd.DataFrame([{"row": 9, "prompt": user(" Q1? "), "completion": "x", "label": True},
                          {"row": 10, "prompt": "New?", "completion": "y", "label": False}])
    prompts = prompts_from(pairs, extra)
    assert list(prompts.columns) == PROMPT_COLUMNS
    assert [p[0]["content"] for p in prompts["prompt"]] == ["Q0?", "Q1?", "Q2?", "New?"]
    assert prompts["row"].tolist() == [1, 2, 3, 10]
    assert prompts_from(None, None).empty and prompts_from(pairs).shape == (3, 2)


def test_deduplicate_by_kind(pairs):
    doubled = pd.concat([pairs, pairs.assign(row=pairs["row"] + 100)], ignore_index=True)
    assert deduplicate(doubled, "pairwise")["row"].tolist() == [1, 2, 3, 4, 5]
    assert deduplicate_pairs(doubled).equals(deduplicate(doubled))  # kind inferred from columns
    binary = binary_from_pairs(doubled)
    assert len(deduplicate(binary, "binary")) == 10
    flipped = binary.assign(label=~binary["label"])  # same text, other label: kept
    assert len(deduplicate(pd.concat([binary, flipped], ignore_index=True), "binary")) == 20
    assert len(deduplicate(prompts_from(doubled).pipe(lambda d: pd.concat([d, d])), "prompts")) == 3


def test_kto_balance():
    def frame(n, m):
        return pd.DataFrame({"row": range(n + m), "prompt": [user("q")] * (n + m), "completion": ["a"] * (n + m),
                             "label": [True] * n + [False] * m})

    b = kto_balance(frame(30, 10))
    assert (b["desirable"], b["undesirable"], b["ratio"]) == (30, 10, 3.0)
    assert (b["desirable_weight"], b["undesirable_weight"]) == (1.0, 3.0)
    assert b["desirable_weight"] * 30 == b["undesirable_weight"] * 10 and 1 <= b["weighted_ratio"] <= 4 / 3
    b = kto_balance(frame(4, 12))
    assert (b["desirable_weight"], b["undesirable_weight"]) == (3.0, 1.0) and b["ratio"] == pytest.approx(1 / 3)
    assert kto_balance(frame(5, 5))["weighted_ratio"] == 1.0
    one_sided = kto_balance(frame(5, 0))
    assert one_sided["balanced"] is False and math.isinf(one_sided["ratio"])
    assert kto_balance(frame(0, 0))["ratio"] is None
    with pytest.raises(ValueError, match="boolean"):
        kto_balance(frame(1, 1).assign(label=["yes", "no"]))


def test_round_trip_every_kind(tmp_path, pairs):
    binary = binary_from_pairs(pairs)
    binary.loc[0, "prompt"] = [{"role": "system", "content": "Be kind ✓"}, {"role": "user", "content": "Hi"}]
    prompts = prompts_from(pairs)
    for name, df in (("pairs", pairs), ("binary", binary), ("prompts", prompts)):
        back = read_records(write_records(df, tmp_path / f"{name}.parquet"))
        assert list(back.columns) == list(df.columns)
        assert back["prompt"].tolist() == [list(p) for p in df["prompt"]]
        assert back["row"].tolist() == df["row"].tolist()
        assert dataset_version(back) == dataset_version(df), name
    back = read_records(tmp_path / "binary.parquet")
    assert back["label"].dtype == bool and back["label"].tolist() == binary["label"].tolist()
    assert dataset_version(binary) != dataset_version(binary.assign(label=~binary["label"]))
    empty = read_records(write_records(binary.iloc[:0], tmp_path / "empty.parquet"))
    assert empty.empty and list(empty.columns) == BINARY_COLUMNS


def test_splits_keep_prompts_on_one_side_for_every_kind(pairs):
    binary = binary_from_pairs(pd.concat([pairs] * 4, ignore_index=True).assign(prompt=[user(f"P{i % 7}") for i in range(20)]))
    train, evaluation = split_by_prompt(binary, eval_fraction=0.3)
    assert len(train) + len(evaluation) == len(binary)
    assert not set(train["prompt"].map(prompt_key)) & set(evaluation["prompt"].map(prompt_key))
    assert len(evaluation) and len(train)
