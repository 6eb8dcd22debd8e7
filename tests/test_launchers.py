"""Launchers chosen per deployment, the worker's config as data, the Kubernetes pod (against a golden file) and the
vLLM fallback. No cluster here: a fake ``dagster_k8s`` runs the pod's command as a local process."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import types
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from alignment_pipelines.assets.training import build_training_asset
from alignment_pipelines.definitions import build_resources
from alignment_pipelines.launch import (outside_root, relative_to_root, resolve_from_root, supports_multi_process,
                                        worker_command)
from alignment_pipelines.methods import METHODS, ConfigError, config_from_dict
from alignment_pipelines.refs import DatasetRef
from alignment_pipelines.resources.launcher import K8sLauncher, TrainingLauncher

GOLDEN = Path(__file__).parent / "golden"
RUN = "0123abcd-run"
MLFLOW = "http://mlflow.ml.svc.cluster.local:5000"


@pytest.fixture
def root(tmp_path, tiny_model_dir):
    """A data root holding a model and a pairs dataset, as the shared volume would."""
    root = tmp_path / "data"
    shutil.copytree(tiny_model_dir, root / "models" / "tiny")
    folder = root / "datasets" / "preference_pairs" / "v1"
    folder.mkdir(parents=True)
    rows = [{"prompt": [{"role": "user", "content": f"Name a colour, please ({i})."}],
             "chosen": f"Blue, number {i}.", "rejected": "No."} for i in range(12)]
    pd.DataFrame(rows[:8]).to_parquet(folder / "train.parquet")
    pd.DataFrame(rows[8:]).to_parquet(folder / "eval.parquet")
    return root.resolve()


def _dpo_values(root: Path, **overrides) -> dict:
    run_dir = root / "runs" / "policy_dpo" / RUN
    return {"model": str(root / "models" / "tiny"), "data": str(root / "datasets/preference_pairs/v1/train.parquet"),
            "eval_data": str(root / "datasets/preference_pairs/v1/eval.parquet"), "output_dir": str(run_dir / "model"),
            "checkpoint_dir": str(root / "checkpoints" / "policy_dpo" / "5f2c"), **overrides}


# ------------------------------------------------------------------------------------------------- the pod


def _golden_launcher() -> K8sLauncher:
    return K8sLauncher(image="registry.example.com/alignment-pipelines-worker:0.1.0", namespace="ml",
                       node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}, cpu="16", memory="128Gi",
                       data_volume_claim="alignment-pipelines-data", data_mount_path="/data",
                       mlflow_tracking_uri=MLFLOW, env_from_secrets=["mlflow-credentials"],
                       service_account_name="alignment-pipelines-training")


def test_k8s_launcher_renders_the_golden_pod_spec(root):
    config = METHODS["dpo"].config_cls.from_dict(_dpo_values(root, num_processes=2, deepspeed="zero2",
                                                             mixed_precision="bf16", max_steps=200))
    pod = _golden_launcher().render_pod("dpo", config, "sqlite:///local-only.db", "mlflow-run-1", root)
    golden = GOLDEN / "k8s_pod_dpo_2gpu_zero2.json"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(json.dumps(pod, indent=2, sort_keys=True) + "\n")
    assert pod == json.loads(golden.read_text()), f"pod spec changed; UPDATE_GOLDEN=1 rewrites {golden.name}"

    container = pod["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["MLFLOW_TRACKING_URI"] == env["ALIGNMENT_PIPELINES_MLFLOW_URI"] == MLFLOW
    assert env["ALIGNMENT_PIPELINES_HOME"] == "/data"
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "alignment-pipelines-data"}} in pod["spec"]["volumes"]
    command = container["command"]
    assert command[command.index("--deepspeed_config_file") + 1] == f"/data/runs/policy_dpo/{RUN}/deepspeed.json"
    assert json.loads((root / "runs" / "policy_dpo" / RUN / "deepspeed.json").read_text())["zero_optimization"][
        "stage"] == 2
    sent = json.loads(command[command.index("--config-json") + 1])
    assert sent["model"] == "models/tiny" and sent["output_dir"] == f"runs/policy_dpo/{RUN}/model"
    assert str(root) not in json.dumps(pod)  # nothing of the orchestrator's disk travels
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True and pod["spec"]["securityContext"]["runAsUser"] != 0
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "privileged": False,
                                            "capabilities": {"drop": ["ALL"]}}


def test_the_pod_spec_is_what_dagster_k8s_builds_a_pod_from():
    """The manifest goes through dagster-k8s's own pod builder unchanged (skipped where dagster-k8s is absent)."""
    pytest.importorskip("dagster_k8s")
    from dagster_k8s.pipes import build_pod_body
    from kubernetes.client import ApiClient

    manifest = json.loads((GOLDEN / "k8s_pod_dpo_2gpu_zero2.json").read_text())
    pod = build_pod_body("dagster-run-policy-dpo", image=None, command=None,
                         env_vars={"DAGSTER_PIPES_CONTEXT": "ctx", "DAGSTER_PIPES_MESSAGES": "msgs"},
                         base_pod_meta=manifest["metadata"], base_pod_spec=manifest["spec"])
    built = ApiClient().sanitize_for_serialization(pod)
    container, ours = built["spec"]["containers"][0], manifest["spec"]["containers"][0]
    for key in ("image", "command", "resources", "volumeMounts", "envFrom", "securityContext"):
        assert container[key] == ours[key]
    assert container["env"][:len(ours["env"])] == ours["env"]
    assert {e["name"] for e in container["env"]} >= {"DAGSTER_PIPES_CONTEXT", "DAGSTER_PIPES_MESSAGES"}
    for key in ("volumes", "nodeSelector", "tolerations", "restartPolicy", "serviceAccountName", "securityContext"):
        assert built["spec"][key] == manifest["spec"][key]


def test_k8s_launcher_refuses_paths_a_pod_cannot_see(root, tmp_path, tiny_model_dir):
    config = METHODS["dpo"].config_cls.from_dict(_dpo_values(root, model=str(tiny_model_dir)))
    with pytest.raises(dg.Failure, match="outside the data root") as failure:
        _golden_launcher().render_pod("dpo", config, MLFLOW, "r", root)
    assert not failure.value.allow_retries


class _FakeCluster:
    """``dagster_k8s.PipesK8sClient`` without a cluster: runs the pod's container command as a local process with the
    pod's environment, and records the pod."""

    pods: list = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def run(self, *, context, namespace, base_pod_meta, base_pod_spec, **kwargs):
        _FakeCluster.pods.append({"namespace": namespace, "metadata": base_pod_meta, "spec": base_pod_spec})
        container = base_pod_spec["containers"][0]
        env = {e["name"]: e["value"] for e in container["env"]}
        return dg.PipesSubprocessClient().run(context=context, command=container["command"], env=env)


@pytest.mark.timeout(240)
def test_the_k8s_launcher_trains_an_asset_with_the_pods_own_command(root, monkeypatch):
    """Through the k8s launcher end to end; the 'pod' runs its own command here (same data root path, no GPU). The
    config asks for vLLM: the orchestrator leaves that to the pod, which falls back to HF generate and says so in
    the Dagster run's log through Pipes."""
    from alignment_pipelines.refs import ModelRef

    monkeypatch.setitem(sys.modules, "dagster_k8s", types.SimpleNamespace(PipesK8sClient=_FakeCluster))
    _FakeCluster.pods.clear()
    folder = root / "datasets" / "preference_pairs" / "v1"

    @dg.asset(name="prompts")
    def given_prompts():
        return DatasetRef(name="prompts", version="v1", train_path=str(folder / "train.parquet"),
                          eval_path=str(folder / "eval.parquet"), batches=("b",), train_rows=8, eval_rows=4)

    @dg.asset(name="sft_model")
    def given_sft_model():
        return ModelRef(path=str(root / "models" / "tiny"), method="sft", base_model="tiny")

    launcher = K8sLauncher(image="worker:test", python=sys.executable, gpus=0, namespace="ml")
    resources = build_resources(data_root=root, base_model=str(root / "models" / "tiny")) | {"launcher": launcher}
    config = {"max_steps": 1, "max_length": 64, "max_new_tokens": 8, "per_device_batch_size": 2, "judge": "shorter",
              "use_vllm": True, "gradient_checkpointing": False, "save_steps": 0}
    with dg.instance_for_test() as instance:
        result = dg.materialize([given_prompts, given_sft_model, build_training_asset(METHODS["online_dpo"])],
                                instance=instance, resources=resources,
                                run_config={"ops": {"policy_online_dpo": {"config": config}}})
        assert result.success
        warnings = [e.message for e in instance.all_logs(result.run_id)
                    if e.message and e.level == logging.WARNING]
    assert result.output_for_node("policy_online_dpo").registered_version == "1"
    [pod] = _FakeCluster.pods
    assert pod["namespace"] == "ml" and "tolerations" not in pod["spec"]  # no GPU asked: no GPU taint tolerated
    assert "nvidia.com/gpu" not in json.dumps(pod["spec"]["containers"][0].get("resources", {}))
    sent = json.loads(pod["spec"]["containers"][0]["command"][-1])
    assert sent["use_vllm"] is True and sent["feedback_store"] == "ai_feedback"  # the pod decides, paths relative
    assert any("vLLM is not installed" in m and "falling back to HF generate" in m for m in warnings)


# --------------------------------------------------------------------------------------- choice and command


def test_the_launcher_is_chosen_per_deployment(monkeypatch, tmp_path):
    monkeypatch.delenv("ALIGNMENT_PIPELINES_LAUNCHER", raising=False)
    assert type(build_resources(data_root=tmp_path)["launcher"]) is TrainingLauncher
    monkeypatch.setenv("ALIGNMENT_PIPELINES_K8S_IMAGE", "worker:1")
    monkeypatch.setenv("ALIGNMENT_PIPELINES_K8S_NODE_SELECTOR", '{"pool": "gpu"}')
    monkeypatch.setenv("ALIGNMENT_PIPELINES_K8S_GPUS", "4")
    monkeypatch.setenv("ALIGNMENT_PIPELINES_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", MLFLOW)
    launcher = build_resources(deployment="k8s")["launcher"]
    assert isinstance(launcher, K8sLauncher) and launcher.node_selector == {"pool": "gpu"} and launcher.gpus == 4
    monkeypatch.setenv("ALIGNMENT_PIPELINES_LAUNCHER", "k8s")
    assert isinstance(build_resources(data_root=tmp_path)["launcher"], K8sLauncher)
    assert type(build_resources(data_root=tmp_path, launcher_mode="subprocess")["launcher"]) is TrainingLauncher
    with pytest.raises(ValueError, match="'subprocess' or 'k8s'"):
        build_resources(data_root=tmp_path, launcher_mode="slurm")


def test_worker_commands():
    values = {"model": "models/tiny"}
    assert worker_command("sft", values, python="py") == [
        "py", "-m", "alignment_pipelines.cli", "train", "sft", "--config-json", '{"model":"models/tiny"}']
    multi = worker_command("dpo", values, python="py", num_processes=4, mixed_precision="bf16", main_process_port=1234)
    assert multi[:4] == ["py", "-m", "accelerate.commands.accelerate_cli", "launch"]
    assert "--multi_gpu" in multi and multi[multi.index("--mixed_precision") + 1] == "bf16"
    assert multi[multi.index("-m", 3):][:4] == ["-m", "alignment_pipelines.cli", "train", "dpo"]
    zero = worker_command("dpo", values, num_processes=1, deepspeed_file="/data/ds.json")
    assert "--use_deepspeed" in zero and "--multi_gpu" not in zero and "--mixed_precision" not in zero  # auto


def test_config_travels_relative_to_the_data_root(root):
    cls = METHODS["dpo"].config_cls
    values = _dpo_values(root, deepspeed="zero3", judge="unused-not-a-path") | {"model": "/elsewhere/model"}
    values.pop("judge")
    sent = relative_to_root(values, cls, root)
    assert sent["data"] == "datasets/preference_pairs/v1/train.parquet" and sent["deepspeed"] == "zero3"
    assert outside_root(sent, cls) == {"model": "/elsewhere/model"}
    received = resolve_from_root(sent, cls, "/mnt/data")
    assert received["data"] == "/mnt/data/datasets/preference_pairs/v1/train.parquet"
    assert received["model"] == "/elsewhere/model" and received["deepspeed"] == "zero3"


def test_methods_with_their_own_loop_refuse_several_processes(root):
    assert supports_multi_process(METHODS["dpo"]) and supports_multi_process(METHODS["rloo"])
    assert not supports_multi_process(METHODS["ppo"]) and not supports_multi_process(METHODS["online_dpo"])
    config = METHODS["ppo"].config_cls.from_dict(_dpo_values(root, num_processes=2, reward_funcs=["length"]))
    with pytest.raises(dg.Failure, match="own loop in one process") as failure:
        TrainingLauncher().worker_invocation("ppo", config, "sqlite:///x.db", "r", root)
    assert not failure.value.allow_retries


def test_deepspeed_is_checked_on_the_machine_that_trains(root):
    with pytest.raises(ConfigError, match="needs CUDA GPUs"):  # this machine has none
        config_from_dict("dpo", _dpo_values(root, deepspeed="zero2"))
    config = METHODS["dpo"].config_cls.from_dict(_dpo_values(root, deepspeed="zero2"))
    assert config.validate(machine=False).zero_stage() == 2  # a GPU pod decides for itself
    with pytest.raises(ConfigError, match="writes its adapter"):
        METHODS["dpo"].config_cls.from_dict(_dpo_values(root, deepspeed="zero3", lora_output="merged")).validate(
            machine=False)
    with pytest.raises(ConfigError, match="must be one of"):
        METHODS["dpo"].config_cls.from_dict(_dpo_values(root, deepspeed="zero9")).validate(machine=False)


# ------------------------------------------------------------------------------------------- vLLM fallback


def _rloo_values(root: Path, **overrides) -> dict:
    return _dpo_values(root, reward_funcs=["length"], num_generations=2, per_device_batch_size=2, max_length=64,
                       max_new_tokens=8, use_vllm=True) | overrides


def test_without_vllm_use_vllm_falls_back_to_hf_generate_and_says_so(root, caplog):
    assert sys.modules.get("vllm") is None
    with caplog.at_level(logging.WARNING, logger="alignment_pipelines.generation"):
        config = config_from_dict("rloo", _rloo_values(root))
    assert config.use_vllm is False
    [record] = [r for r in caplog.records if r.name == "alignment_pipelines.generation"]
    assert "vLLM is not installed" in record.getMessage() and "falling back to HF generate" in record.getMessage()
    from alignment_pipelines.methods.rloo import RLOO

    assert RLOO().trl_args(config, None)["use_vllm"] is False  # what TRL is handed
    # Where the training runs elsewhere (a pod), the pod decides: nothing is turned off here, nothing refused
    remote = METHODS["online_dpo"].config_cls.from_dict(_dpo_values(root, judge="shorter", use_vllm=True,
                                                                    max_length=64, max_new_tokens=8))
    assert remote.validate(machine=False).use_vllm is True


def test_vllm_installed_without_a_gpu_falls_back_too(root, caplog, monkeypatch):
    import importlib.util

    import alignment_pipelines.generation as generation

    real = importlib.util.find_spec
    monkeypatch.setattr(generation.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "vllm" else real(name, *a))
    with caplog.at_level(logging.INFO, logger="alignment_pipelines.generation"):
        assert generation.vllm_availability() == (False, "no CUDA GPU is visible")
        config = config_from_dict("rloo", _rloo_values(root))
        backend = generation.generation_backend(root / "models" / "tiny")
    assert config.use_vllm is False and type(backend).__name__ == "TransformersBackend"
    messages = [r.getMessage() for r in caplog.records if r.name == "alignment_pipelines.generation"]
    assert any("no CUDA GPU is visible: falling back to HF generate" in m for m in messages)
    assert any("instead of vLLM: no CUDA GPU is visible" in m for m in messages)


@pytest.mark.timeout(180)
def test_an_rloo_worker_asked_for_vllm_trains_with_hf_generate(root, tmp_path, caplog):
    from alignment_pipelines.cli import main

    with caplog.at_level(logging.WARNING, logger="alignment_pipelines.generation"):
        assert main(["train", "rloo", "--model", str(root / "models" / "tiny"), "--data",
                     str(root / "datasets/preference_pairs/v1/train.parquet"), "--output", str(tmp_path / "rloo"),
                     "--reward-funcs", "length", "--num-generations", "2", "--per-device-batch-size", "2",
                     "--max-steps", "1", "--max-length", "64", "--max-new-tokens", "8", "--use-vllm",
                     "--no-gradient-checkpointing"]) == 0
    assert any("falling back to HF generate" in r.getMessage() for r in caplog.records)
    saved = json.loads((tmp_path / "rloo" / "alignment_config.json").read_text())
    assert saved["use_vllm"] is False  # the model records how it was sampled
