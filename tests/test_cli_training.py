"""`alignment-pipelines train`: a run sized in epochs with a warm-up and a schedule."""

from __future__ import annotations

import json

import pytest

from alignment_pipelines.cli import main
from alignment_pipelines.data.demo import demo_feedback_path


@pytest.fixture
def eight_pairs(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(demo_feedback_path().read_text().splitlines()[:8]) + "\n")
    return data


def test_a_run_sized_in_epochs_warms_up_then_decays(tmp_path, capsys, tiny_model_dir, eight_pairs):
    status = main(["train", "sft", "--model", str(tiny_model_dir), "--data", str(eight_pairs),
                   "--output", str(tmp_path / "sft"), "--no-packing", "--per-device-batch-size", "4",
                   "--max-steps", "-1", "--num-train-epochs", "2", "--warmup-steps", "2",
                   "--lr-scheduler-type", "linear", "--learning-rate", "1e-3"])
    assert status == 0
    result = json.loads(capsys.readouterr().out)
    assert result["metrics"]["steps"] == 4  # 8 pairs / 4 a step, twice
    history = result["history"]
    assert [h["epoch"] for h in history] == [0.5, 1.0, 1.5, 2.0]
    # linear warm-up over 2 steps to the peak, then linear decay to 0 at the run's end (step 4)
    assert [h["learning_rate"] for h in history] == pytest.approx([0.0, 5e-4, 1e-3, 5e-4])


def test_max_steps_zero_is_refused_naming_the_epoch_alternative(tmp_path, capsys, tiny_model_dir, eight_pairs):
    status = main(["train", "sft", "--model", str(tiny_model_dir), "--data", str(eight_pairs),
                   "--output", str(tmp_path / "sft"), "--max-steps", "0"])
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("alignment-pipelines train: max_steps=0") and "-1 to train num_train_epochs" in err
