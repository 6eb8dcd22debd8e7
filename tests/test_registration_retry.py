"""Nothing trained is lost: the MLflow server dies (SIGKILL) at the moment a trained model is registered; the model
is kept, and once the server is back the asset's next run registers it once, without training again."""

from __future__ import annotations

import re
import shutil

import dagster as dg
import pytest

from alignment_pipelines import tracking
from alignment_pipelines.assets.training import TRAINED_IN, build_training_asset
from alignment_pipelines.definitions import build_resources
from alignment_pipelines.methods import METHODS
from alignment_pipelines.models.loading import load_model, safetensors_sha256
from alignment_pipelines.models.registry import fetch_model
from alignment_pipelines.resources.mlflow import MlflowResource
from alignment_pipelines.tracking import Backoff, Tracker
from mlflow_server import FAIL_FAST_ENV, MlflowServer
from pairs_dataset import write_pairs_dataset

STEPS = 3
SMALL = {"max_steps": STEPS, "max_length": 64, "learning_rate": 1e-3, "gradient_checkpointing": False,
         "save_steps": 0, "logging_steps": 1}


@pytest.fixture
def server(tmp_path, monkeypatch):
    for name, value in FAIL_FAST_ENV.items():
        monkeypatch.setenv(name, value)
    server = MlflowServer(tmp_path / "mlflow").start()
    yield server
    server.stop()


def _worker_steps(instance, run_id: str) -> list[str]:
    """The training worker's lines in the run's log (it streams each logged step through Pipes: "step 2: {...}")."""
    return [e.message for e in instance.all_logs(run_id) if e.message and re.search(r"\bstep \d+: \{", e.message)]


@pytest.mark.timeout(420)
def test_a_model_trained_while_the_registry_died_is_registered_by_the_retry_without_training_again(
        tmp_path, tiny_model_dir, server, monkeypatch):
    root = tmp_path / "data"
    dataset = write_pairs_dataset(root, topics=8, repeats=2)
    base = root / "models" / "tiny"
    shutil.copytree(tiny_model_dir, base)

    @dg.asset(name="preference_pairs")
    def given_pairs():
        return dataset

    sft = build_training_asset(METHODS["sft"])
    resources = build_resources(data_root=root, base_model=str(base))
    resources["mlflow"] = MlflowResource(storage=resources["storage"], tracking_uri=server.uri)
    run_config = {"ops": {"sft_model": {"config": SMALL}}}
    monkeypatch.setattr(tracking, "REGISTRATION_BACKOFF", Backoff(attempts=2, first_delay=0.5))

    store_artifacts = Tracker._store_artifacts

    def store_then_die(self, run_id, folder):  # the weights are uploaded; the version is not created yet
        store_artifacts(self, run_id, folder)
        server.kill()

    monkeypatch.setattr(Tracker, "_store_artifacts", store_then_die)
    with dg.instance_for_test() as instance:
        first = dg.materialize([given_pairs, sft], instance=instance, resources=resources, run_config=run_config,
                               raise_on_error=False)
        assert not first.success
        first_logs = [e.message for e in instance.all_logs(first.run_id) if e.message]
        assert any('"loss"' in m for m in _worker_steps(instance, first.run_id))  # it trained, in the first try
        assert any("registering sft_model: try 1 of 2 failed, the registry is unreachable" in m for m in first_logs)
        assert any("it finished training; a retry registers it as it is" in m for m in first_logs)
        [kept] = list((root / "runs" / "sft_model").glob("*/model"))  # the asset's retries did not remove it
        trained_in = (kept.parent / TRAINED_IN).read_text()

        monkeypatch.setattr(Tracker, "_store_artifacts", store_artifacts)
        server.start()  # same port, database and artifacts
        client = Tracker(server.uri).client
        assert client.search_model_versions("name='sft_model'") == []  # nothing half-registered meanwhile

        second = dg.materialize([given_pairs, sft], instance=instance, resources=resources, run_config=run_config)
        assert second.success
        second_logs = [e.message for e in instance.all_logs(second.run_id) if e.message]
        assert _worker_steps(instance, second.run_id) == []  # no training step ran the second time
        assert any("registering it without training again" in m for m in second_logs)

    ref = second.output_for_node("sft_model")
    [version] = client.search_model_versions("name='sft_model'")
    assert (str(version.version), ref.registered_version) == ("1", "1")
    assert {k: str(v) for k, v in client.get_registered_model("sft_model").aliases.items()} == {"candidate": "1"}
    assert version.run_id == ref.mlflow_run_id and ref.mlflow_run_id in trained_in  # the run that trained it
    training_run = client.get_run(version.run_id)
    assert training_run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(version.run_id, "loss")) == list(range(1, STEPS + 1))
    assert not (root / "runs" / "sft_model").exists() or not any((root / "runs" / "sft_model").iterdir())
    folder = fetch_model("models:/sft_model/1", server.uri, cache_dir=tmp_path / "cache")
    assert client.get_model_version("sft_model", "1").tags["storage.weights_sha256"] == safetensors_sha256(folder)
    model, _ = load_model(folder, device="cpu")
    assert model.num_parameters() > 0
