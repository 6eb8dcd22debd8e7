"""The demo feedback shipped with the package."""

from __future__ import annotations

import json

from alignment_pipelines.data.demo import demo_feedback_path
from alignment_pipelines.data.datasets.splits import prompt_key, split_by_prompt
from alignment_pipelines.data.validate.engine import validate_file
from alignment_pipelines.data.validate.gate import run_expectation_suite


def load():
    return [json.loads(line) for line in demo_feedback_path().read_text(encoding="utf-8").splitlines() if line.strip()]


def test_demo_file_is_shipped_and_in_layout_a():
    path = demo_feedback_path()
    assert path.is_file() and path.name == "feedback.jsonl"
    rows = load()
    assert len(rows) >= 160
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected"}
        assert all(isinstance(row[k], str) and row[k].strip() for k in row)


def test_demo_prompts_unique_and_answers_shaped():
    rows = load()
    prompts = [r["prompt"] for r in rows]
    assert len(set(prompts)) == len(prompts)
    assert len({prompt_key(p) for p in prompts}) == len(prompts)
    chosen_mean = sum(len(r["chosen"]) for r in rows) / len(rows)
    rejected_mean = sum(len(r["rejected"]) for r in rows) / len(rows)
    assert chosen_mean * 1.5 < rejected_mean, (chosen_mean, rejected_mean)
    assert max(len(r["chosen"]) for r in rows) < 400  # short: 1-3 sentences
    assert len({r["chosen"] for r in rows}) == len(rows)


def test_demo_validates_clean():
    result = validate_file(demo_feedback_path())
    assert result.rows == len(load())
    assert len(result.quarantined) == 0, result.quarantined.to_dict("records")
    assert run_expectation_suite(result.accepted, quarantined_count=0).success
    train, evaluation = split_by_prompt(result.accepted, eval_fraction=0.1)
    assert len(evaluation) > 0 and len(train) > len(evaluation)
