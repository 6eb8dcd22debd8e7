"""Prompt-level splits, dataset versions, dedup and the Parquet round-trip."""

from __future__ import annotations

import pandas as pd
import pytest

from alignment_pipelines.data.records import read_records, write_records
from alignment_pipelines.data.datasets.splits import dataset_version, deduplicate_pairs, prompt_key, split_by_prompt


def user(text):
    return [{"role": "user", "content": text}]


@pytest.fixture()
def records() -> pd.DataFrame:
    rows = []
    for i in range(60):
        prompt = user(f"Question number {i % 40}?")  # 40 distinct prompts, some repeated
        rows.append({"row": i + 1, "prompt": prompt, "chosen": f"Good answer {i}.", "rejected": f"Bad answer {i}."})
    return pd.DataFrame(rows)


def test_prompt_key_is_stable_and_normalized():
    assert prompt_key(user("Hello")) == prompt_key(user("  Hello \n"))
    assert prompt_key("Hello") == prompt_key(user("Hello"))
    assert prompt_key(user("Hello")) != prompt_key(user("hello"))
    assert prompt_key(user("Hi")) != prompt_key([{"role": "system", "content": "Hi"}])
    # pinned: the key must not change between releases (splits depend on it)
    assert prompt_key(user("Hello")) == prompt_key([{"content": "Hello", "role": "user"}])
    assert len(prompt_key(user("x"))) == 64


def test_split_is_deterministic_and_disjoint(records):
    train, evaluation = split_by_prompt(records, eval_fraction=0.2, seed=0)
    assert len(train) + len(evaluation) == len(records)
    train_keys = set(train["prompt"].map(prompt_key))
    eval_keys = set(evaluation["prompt"].map(prompt_key))
    assert train_keys and eval_keys and not train_keys & eval_keys
    again_train, again_eval = split_by_prompt(records.sample(frac=1, random_state=3), eval_fraction=0.2, seed=0)
    assert sorted(again_eval["row"]) == sorted(evaluation["row"])
    assert sorted(again_train["row"]) == sorted(train["row"])
    _, other_seed = split_by_prompt(records, eval_fraction=0.2, seed=1)
    assert sorted(other_seed["row"]) != sorted(evaluation["row"])


def test_eval_nonempty_with_two_prompts():
    df = pd.DataFrame(
        [{"row": i, "prompt": user(p), "chosen": "a", "rejected": "b"} for i, p in enumerate(["One?", "Two?", "Two?"])]
    )
    for seed in range(5):
        train, evaluation = split_by_prompt(df, eval_fraction=0.01, seed=seed)
        assert len(evaluation) >= 1 and len(train) >= 1
        assert not set(train["prompt"].map(prompt_key)) & set(evaluation["prompt"].map(prompt_key))
    single = df.iloc[:1]
    train, evaluation = split_by_prompt(single, eval_fraction=0.1)
    assert len(train) + len(evaluation) == 1


def test_dataset_version_order_independent_and_content_sensitive(records):
    v = dataset_version(records)
    assert len(v) == 16 and int(v, 16) >= 0
    assert dataset_version(records.iloc[::-1].reset_index(drop=True)) == v
    changed = records.copy()
    changed.loc[5, "chosen"] = "A different answer."
    assert dataset_version(changed) != v
    assert dataset_version(records.iloc[1:]) != v


def test_deduplicate_pairs_keeps_first(records):
    doubled = pd.concat([records, records.iloc[:7].assign(row=range(100, 107))], ignore_index=True)
    deduped = deduplicate_pairs(doubled)
    assert len(deduped) == len(records)
    assert deduped["row"].tolist() == records["row"].tolist()


def test_parquet_round_trip_preserves_messages(tmp_path, records):
    records.loc[0, "prompt"] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Ünïcode ✓?"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "And again?"},
    ]
    path = write_records(records, tmp_path / "sub" / "pairs.parquet")
    back = read_records(path)
    assert list(back.columns) == list(records.columns)
    assert back["prompt"].tolist() == records["prompt"].tolist()
    assert isinstance(back["prompt"].iloc[0], list) and isinstance(back["prompt"].iloc[0][0], dict)
    assert back["row"].tolist() == records["row"].tolist()
    assert back["chosen"].tolist() == records["chosen"].tolist()
    assert dataset_version(back) == dataset_version(records)


def test_the_judge_split_is_carved_out_of_train(records):
    from alignment_pipelines.data.datasets.splits import split_three_ways

    train, evaluation = split_by_prompt(records, eval_fraction=0.2, seed=0)
    three = split_three_ways(records, eval_fraction=0.2, judge_fraction=0.3, seed=0)
    assert sorted(three["eval"]["row"]) == sorted(evaluation["row"])  # eval keeps its prompts
    assert sorted([*three["train"]["row"], *three["judge"]["row"]]) == sorted(train["row"])
    keys = {side: set(df["prompt"].map(prompt_key)) for side, df in three.items()}
    assert all(keys.values()) and not keys["train"] & keys["judge"] and not keys["judge"] & keys["eval"]
    shuffled = split_three_ways(records.sample(frac=1, random_state=3), eval_fraction=0.2, judge_fraction=0.3, seed=0)
    assert sorted(shuffled["judge"]["row"]) == sorted(three["judge"]["row"])
