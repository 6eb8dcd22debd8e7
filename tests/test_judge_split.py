"""The three-way split on real HH-RLHF pairs: no training dataset holds a judge or eval prompt, eval keeps the
prompts it had before the judge split existed, and the SQL build equals the pandas reference."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from alignment_pipelines.data.datasets.sql import BatchFiles, build_dataset, judge_path_beside
from alignment_pipelines.data.datasets.key_index import KEYS_FILE
from alignment_pipelines.data.records import read_records
from alignment_pipelines.data.datasets.splits import prompt_key, split_three_ways
from alignment_pipelines.data.validate.engine import validate_file_to_parquet

HH_FILE = Path(__file__).parents[1].parent / "shared/data/hh-rlhf-harmless-base.jsonl.gz"
DATASETS = ("pairwise", "binary", "prompts")


def keys_of(path) -> set[str]:
    return set(read_records(path)["prompt"].map(prompt_key))


@pytest.fixture(scope="module")
def hh_batch(tmp_path_factory) -> BatchFiles:
    directory = tmp_path_factory.mktemp("hh") / "batches" / "hh"
    summary = validate_file_to_parquet(HH_FILE, directory / "accepted.parquet", directory / "quarantine.parquet",
                                       keys_path=directory / KEYS_FILE)
    assert summary["accepted"] > 1500
    return BatchFiles("hh", "pairwise", directory)


@pytest.mark.skipif(not HH_FILE.exists(), reason="shared HH-RLHF sample not present")
def test_no_training_dataset_holds_a_judge_or_eval_prompt(hh_batch, tmp_path):
    builds = {name: build_dataset(name, name, [hh_batch], tmp_path / name, eval_fraction=0.1, judge_fraction=0.2)
              for name in DATASETS}
    held_out = set().union(*(keys_of(b.eval_path) | keys_of(b.judge_path) for b in builds.values()))
    judge = keys_of(builds["pairwise"].judge_path)
    evaluation = keys_of(builds["pairwise"].eval_path)
    for name, build in builds.items():
        train = keys_of(build.train_path)
        assert train and not train & held_out, name  # what PPO, RLOO, DPO, KTO... learn from
        assert keys_of(build.judge_path) == judge and keys_of(build.eval_path) == evaluation, name  # one split
        assert build.train_rows + build.judge_rows + build.eval_rows == build.rows, name
    assert not judge & evaluation
    prompts = len(keys_of(builds["prompts"].train_path)) + len(judge) + len(evaluation)
    assert 0.15 < len(judge) / prompts < 0.25 and 0.07 < len(evaluation) / prompts < 0.13
    assert builds["pairwise"].judge_path == judge_path_beside(builds["pairwise"].train_path)

    # eval holds the same prompts as without a judge split: the judge split was carved out of train
    two_way = build_dataset("pairwise", "pairwise", [hh_batch], tmp_path / "two-way", eval_fraction=0.1)
    assert keys_of(two_way.eval_path) == evaluation and two_way.judge_rows == 0
    assert keys_of(two_way.train_path) == keys_of(builds["pairwise"].train_path) | judge
    assert two_way.version != builds["pairwise"].version


@pytest.mark.skipif(not HH_FILE.exists(), reason="shared HH-RLHF sample not present")
def test_the_sql_split_equals_the_pandas_reference(hh_batch, tmp_path):
    build = build_dataset("pairwise", "pairwise", [hh_batch], tmp_path, eval_fraction=0.1, judge_fraction=0.2, seed=3)
    reference = split_three_ways(read_records(hh_batch.accepted), eval_fraction=0.1, judge_fraction=0.2, seed=3)
    for side, path in (("train", build.train_path), ("judge", build.judge_path), ("eval", build.eval_path)):
        assert read_records(path)["row"].tolist() == reference[side]["row"].tolist(), side
    again = build_dataset("pairwise", "pairwise", [hh_batch], tmp_path, eval_fraction=0.1, judge_fraction=0.2, seed=3)
    assert not again.rewritten and again.judge_rows == build.judge_rows > 0


def test_tiny_datasets_still_get_every_split():
    rows = pd.DataFrame([{"row": i, "prompt": [{"role": "user", "content": f"Q{i}?"}], "chosen": "a", "rejected": "b"}
                         for i in range(3)])
    for seed in range(8):
        splits = split_three_ways(rows, eval_fraction=0.01, judge_fraction=0.01, seed=seed)
        assert [len(splits[side]) for side in ("train", "judge", "eval")] == [1, 1, 1], seed
    two = split_three_ways(rows.iloc[:2], eval_fraction=0.5, judge_fraction=0.5)
    assert len(two["train"]) == len(two["eval"]) == 1 and two["judge"].empty  # train and eval come first
    with pytest.raises(ValueError, match="at most 1"):
        split_three_ways(rows, eval_fraction=0.6, judge_fraction=0.5)
