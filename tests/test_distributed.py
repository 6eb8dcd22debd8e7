"""Data-parallel training that really runs: two processes on the CPU (DDP over gloo) through the launcher, as a
Dagster asset materialization, against a single process on the same global batch."""

from __future__ import annotations

import json
import shutil

import dagster as dg
import pytest

from alignment_pipelines.assets.training import build_training_asset
from alignment_pipelines.definitions import build_resources
from alignment_pipelines.methods import METHODS, run_training
from alignment_pipelines.methods.sft import SFTMethodConfig
from alignment_pipelines.resources.launcher import TrainingLauncher
from alignment_pipelines.tracking import Tracker
from pairs_dataset import write_pairs_dataset

SMALL = {"max_steps": 3, "max_length": 64, "learning_rate": 1e-3, "gradient_checkpointing": False, "save_steps": 0,
         "seed": 3}


COMMANDS: list = []


class RecordingLauncher(TrainingLauncher):
    """The subprocess launcher, keeping the commands it ran."""

    def run_worker(self, context, method, command, env, config, root):
        COMMANDS.append((command, env))
        return super().run_worker(context, method, command, env, config, root)


@pytest.mark.timeout(240)
def test_two_cpu_processes_train_the_sft_asset_with_ddp_like_one_process_on_the_same_global_batch(
        tmp_path, tiny_model_dir):
    root = tmp_path / "data"
    dataset = write_pairs_dataset(root, topics=12, repeats=3)
    base = root / "models" / "tiny"  # under the data root: every path travels relative to it
    shutil.copytree(tiny_model_dir, base)

    @dg.asset(name="preference_pairs")
    def given_pairs():
        return dataset

    resources = build_resources(data_root=root, base_model=str(base)) | {"launcher": RecordingLauncher()}
    COMMANDS.clear()
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [given_pairs, build_training_asset(METHODS["sft"])], instance=instance, resources=resources,
            run_config={"ops": {"sft_model": {"config": SMALL | {"per_device_batch_size": 2, "num_processes": 2}}}})
        assert result.success
        logs = [e.message for e in instance.all_logs(result.run_id) if e.message]

    # Through accelerate launch, two ranks, the config as data with paths relative to the data root
    [(command, env)] = COMMANDS
    assert command[command.index("launch") + 1:command.index("launch") + 3] == ["--num_processes", "2"]
    assert "--multi_gpu" in command and "--cpu" not in command  # --cpu would start one process (accelerate 1.x)
    config = json.loads(command[command.index("--config-json") + 1])
    assert (config["model"], config["data"]) == ("models/tiny", "datasets/preference_pairs/v1/train.parquet")
    assert not any(str(root) in str(v) for v in config.values())
    assert env["ALIGNMENT_PIPELINES_HOME"] == str(root.resolve())
    assert any("2 process(es) through accelerate launch" in m for m in logs)

    # One registered model, reported once (rank 0 alone streams to MLflow and Pipes)
    ref = result.output_for_node("sft_model")
    assert ref.metrics["num_processes"] == 2.0
    tracker = Tracker(resources["mlflow"].resolved_uri())
    versions = tracker.client.search_model_versions("name='sft_model'")
    assert [str(v.version) for v in versions] == ["1"]
    losses = tracker.client.get_metric_history(ref.mlflow_run_id, "loss")
    assert sorted(m.step for m in losses) == [1, 2, 3]
    assert sum("step 1:" in m for m in logs) == 1
    assert not list((root / "runs").rglob("*.staging-*"))  # every rank's staging is gone

    # One process on the same global batch (2 ranks x 2 = 4): the same losses
    single = run_training("sft", SFTMethodConfig(model=str(base), data=dataset.train_path, eval_data=dataset.eval_path,
                                                 output_dir=str(tmp_path / "single"), per_device_batch_size=4,
                                                 **SMALL))
    expected = [h["loss"] for h in single.history if "loss" in h]
    assert [m.value for m in sorted(losses, key=lambda m: m.step)] == pytest.approx(expected, rel=1e-4)
    assert ref.metrics["train_tokens"] == single.metrics["train_tokens"]  # counted over both ranks
    assert ref.metrics["eval_loss"] == pytest.approx(single.metrics["eval_loss"], rel=1e-4)
