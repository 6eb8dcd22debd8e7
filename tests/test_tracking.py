"""MLflow registration is all-or-nothing: a failed run or a failed alias leaves no model version and no artifacts."""

import os
import time

import dagster as dg
import pytest

from alignment_pipelines.data.demo import demo_feedback_path
from alignment_pipelines.definitions import ALL_ASSETS, build_resources
from alignment_pipelines.runs import ingest_batch, sense_inbox
from alignment_pipelines.layout import DataRoot
from alignment_pipelines.tracking import Lineage, Tracker
from alignment_pipelines.resources.launcher import TrainingLauncher

LINEAGE = Lineage(method="sft", base_model="tiny:tiny-random", dataset_version="abc", batches=("b1", "b2"))


def test_version_carries_lineage_and_alias(tmp_path, tiny_model_dir):
    tracker = Tracker(DataRoot(tmp_path).ensure().local_tracking_uri, artifact_root=tmp_path / "artifacts")
    run_id = tracker.start_run("r")
    registered = tracker.register_model(run_id, tiny_model_dir, "sft_model", LINEAGE)
    version = tracker.version_by_alias("sft_model", "candidate")
    assert str(version.version) == registered.version == "1"
    assert version.tags["lineage.batches"] == "b1,b2" and version.tags["lineage.batch_count"] == "2"
    assert version.tags["storage.format"] == "full" and int(version.tags["storage.bytes"]) == registered.bytes
    assert {a.path for a in tracker.client.list_artifacts(run_id, "model")} >= {"model/MLmodel", "model/model"}
    assert {a.path for a in tracker.client.list_artifacts(run_id, "model/model")} >= {"model/model/config.json",
                                                                                      "model/model/model.safetensors"}
    assert version.description == "sft (full weights) on tiny:tiny-random, dataset abc"


def test_failed_alias_deletes_the_new_version(tmp_path, tiny_model_dir, monkeypatch):
    tracker = Tracker(DataRoot(tmp_path).ensure().local_tracking_uri, artifact_root=tmp_path / "artifacts")
    run_id = tracker.start_run("r")

    def refuse(*args, **kwargs):
        raise RuntimeError("registry went away")

    monkeypatch.setattr(tracker.client, "set_registered_model_alias", refuse)
    with pytest.raises(RuntimeError, match="registry went away"):
        tracker.register_model(run_id, tiny_model_dir, "sft_model", LINEAGE)
    assert tracker.client.search_model_versions("name='sft_model'") == []
    assert tracker.client.list_artifacts(run_id) == []  # and no orphaned weights in the artifact store


def test_a_training_run_that_dies_registers_nothing(tmp_path, tiny_model_dir):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "f.jsonl").write_text(demo_feedback_path().read_text())
    stamp = time.time() - 60
    os.utime(inbox / "f.jsonl", (stamp, stamp))
    resources = build_resources(data_root=tmp_path, base_model=str(tiny_model_dir))
    resources["launcher"] = TrainingLauncher(python="/bin/false")  # the worker process exits 1 at once
    with dg.instance_for_test() as instance:
        [request] = sense_inbox(instance, resources).run_requests
        ingest_batch(instance, resources, request.partition_key)
        result = dg.materialize(ALL_ASSETS, selection=dg.AssetSelection.assets("preference_pairs", "sft_model"),
                                instance=instance, resources=resources, raise_on_error=False,
                                run_config={"ops": {"sft_model": {"config": {"max_steps": 2}}}})
    assert not result.success
    tracker = Tracker(resources["mlflow"].resolved_uri())
    assert tracker.client.search_registered_models() == [] or \
        tracker.client.search_model_versions("name='sft_model'") == []
    runs = tracker.client.search_runs([tracker.experiment_id])
    assert len(runs) == 3  # the first try and the training retry policy's two retries
    assert {run.info.status for run in runs} == {"FAILED"}


def test_training_curve_tolerates_steps_without_a_reward():
    from alignment_pipelines.assets.training import _history_table

    table = _history_table([{"step": 1, "loss": 0.7, "rewards/margins": 0.1}, {"step": 2, "loss": 0.6}])
    assert "| step | loss | rewards/margins |" in table
    assert "| 2 | 0.6 |  |" in table
