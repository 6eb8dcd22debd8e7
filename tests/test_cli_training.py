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


def test_train_by_hand_logs_its_run_where_mlflow_tracking_uri_points(tmp_path, capsys, monkeypatch, tiny_model_dir,
                                                                     eight_pairs):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main(["train", "sft", "--model", str(tiny_model_dir), "--data", str(eight_pairs),
                 "--output", str(tmp_path / "sft"), "--no-packing", "--max-steps", "2"]) == 0
    result = json.loads(capsys.readouterr().out)

    client = MlflowClient(tracking_uri=uri)
    [run] = client.search_runs([client.get_experiment_by_name("alignment-pipelines").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "cli-sft"
    assert run.data.params["method"] == "sft" and run.data.params["max_steps"] == "2"
    assert run.data.metrics["train_loss"] == pytest.approx(result["metrics"]["train_loss"])
    assert {m.step for m in client.get_metric_history(run.info.run_id, "loss")} == {1, 2}  # every step, as it ran
