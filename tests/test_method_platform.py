"""The method platform: the registry drives the graph, one config per method, models by role."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import dagster as dg
import pytest
import torch

from alignment_pipelines.assets.training import launchpad_config, policy_asset_names
from alignment_pipelines.data.demo import demo_feedback_path
from alignment_pipelines.definitions import EVALUATION_SELECTION, build_assets, build_definitions, build_resources
from alignment_pipelines.methods import METHOD_PLUGINS_ENV, METHODS, config_from_dict, load_plugins, run_training
from alignment_pipelines.methods.sft import SFTMethodConfig
from alignment_pipelines.models.loading import load_causal_lm, read_model_card
from alignment_pipelines.runs import ingest_batch, sense_inbox
from alignment_pipelines.tracking import Tracker

TOY_METHOD = '''
from dataclasses import dataclass

from alignment_pipelines.methods import MethodSpec, register
from alignment_pipelines.methods.config import option
from alignment_pipelines.methods.sft import SFT, SFTMethodConfig


@dataclass
class ToyConfig(SFTMethodConfig):
    toy_strength: float = option(1.0, "a knob only this method has", minimum=0)


class Toy(SFT):
    name = "toy"


register(MethodSpec("toy", ToyConfig, Toy().train, "pairs", "sft", description="A toy method from a plugin."))
'''


def _drop_feedback(root, rows=40):
    inbox = root / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    (inbox / "feedback.jsonl").write_text("\n".join(demo_feedback_path().read_text().splitlines()[:rows]) + "\n")
    settled = time.time() - 60
    os.utime(inbox / "feedback.jsonl", (settled, settled))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_launchpad_defaults_equal_cli_defaults(method, tmp_path, tiny_model_dir):
    from alignment_pipelines.cli import build_parser

    spec = METHODS[method]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "hi", "chosen": "a", "rejected": "b", "completion": "a",
                                 "label": True}) + "\n")
    paths = {"model": str(tiny_model_dir), "data": str(pairs), "output_dir": str(tmp_path / "out")}
    args = build_parser().parse_args(["train", method, "--model", paths["model"], "--data", paths["data"],
                                      "--output", paths["output_dir"]])
    from_cli = spec.config_cls.from_dict(spec.config_cls.values_from_args(args))
    from_launchpad = spec.config_cls.from_dict(launchpad_config(spec)().model_dump() | paths)
    assert from_cli.to_dict() == from_launchpad.to_dict()
    launchpad_fields = launchpad_config(spec).model_fields
    for field, _ in spec.config_cls.tunable_fields():  # same descriptions in the launchpad and --help
        assert launchpad_fields[field.name].description == field.metadata["help"]
    help_text = build_parser()._subparsers._group_actions[0].choices["train"]._subparsers._group_actions[0] \
        .choices[method].format_help()
    for field, _ in spec.config_cls.tunable_fields():
        assert "--" + field.name.replace("_", "-") in help_text


def test_cli_flags_reach_the_config(tmp_path, tiny_model_dir):
    from alignment_pipelines.cli import build_parser

    args = build_parser().parse_args(["train", "orpo", "--model", str(tiny_model_dir), "--data", "d.jsonl",
                                      "--output", "o", "--learning-rate", "3e-4", "--no-lora", "--beta", "0.2"])
    values = METHODS["orpo"].config_cls.values_from_args(args)
    assert (values["learning_rate"], values["lora"], values["beta"]) == (3e-4, False, 0.2)
    assert isinstance(args, argparse.Namespace) and "max_steps" not in values  # unset flags keep --config's values


def test_lora_adapter_gives_the_merged_models_logits_and_registers_small(tmp_path, tiny_model_dir):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Tell me about tea {i}.", "chosen": "Tea is good.",
                                         "rejected": "No."}) + "\n" for i in range(8)))
    outputs = {}
    for lora_output in ("adapter", "merged"):
        outputs[lora_output] = tmp_path / lora_output
        run_training("sft", SFTMethodConfig(model=str(tiny_model_dir), data=str(pairs), max_steps=3, seed=1,
                                            output_dir=str(outputs[lora_output]), learning_rate=1e-2,
                                            lora_output=lora_output))
    adapter, merged = outputs["adapter"], outputs["merged"]
    assert read_model_card(adapter)["format"] == "adapter" and read_model_card(merged)["format"] == "full"
    ids = torch.tensor([[3, 10, 11, 12, 13]])
    from_adapter, _ = load_causal_lm(adapter, device="cpu", dtype="float32")
    from_merged, _ = load_causal_lm(merged, device="cpu", dtype="float32")
    torch.testing.assert_close(from_adapter(ids).logits, from_merged(ids).logits, atol=1e-5, rtol=1e-4)
    size = {name: sum(p.stat().st_size for p in folder.glob("*.safetensors")) for name, folder in outputs.items()}
    assert size["adapter"] < size["merged"] / 2

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_root=tmp_path / "artifacts")
    from alignment_pipelines.tracking import Lineage

    run_id = tracker.start_run("adapter")
    registered = tracker.register_model(run_id, adapter, "sft_model",
                                        Lineage(method="sft", base_model="tiny", dataset_version="v1",
                                                extra={"role": "policy"}))
    stored = {a.path for a in tracker.client.list_artifacts(run_id, "model/peft")}
    assert "model/peft/adapter_model.safetensors" in stored and not tracker.client.list_artifacts(run_id, "model/model")
    assert tracker.client.get_model_version("sft_model", registered.version).tags["lineage.role"] == "policy"


@pytest.fixture
def toy_method(tmp_path, monkeypatch):
    """A method that exists only in a plugin module: registered through the registry, nothing else."""
    plugin_dir = tmp_path / "plugins"
    plugin_dir.mkdir()
    (plugin_dir / "toy_method.py").write_text(TOY_METHOD)
    monkeypatch.syspath_prepend(str(plugin_dir))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(plugin_dir), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv(METHOD_PLUGINS_ENV, "toy_method")
    load_plugins()
    yield METHODS["toy"]
    METHODS.pop("toy")
    sys.modules.pop("toy_method", None)


@pytest.mark.integration
def test_a_method_registered_as_a_plugin_trains_registers_and_is_evaluated(toy_method, tmp_path, tiny_model_dir):
    assets = build_assets()
    toy = next(a for a in assets if dg.AssetKey("policy_toy") in a.keys)
    assert toy.op.config_schema.as_field().config_type.fields["toy_strength"].default_value == 1.0
    evaluation = next(a for a in assets if dg.AssetKey("evaluation_report") in a.keys)
    assert dg.AssetKey("policy_toy") in evaluation.asset_deps[dg.AssetKey("evaluation_report")]
    root = tmp_path / "data"
    _drop_feedback(root)
    with dg.instance_for_test() as instance:
        resources = build_resources(data_root=root, base_model=str(tiny_model_dir))
        [request] = sense_inbox(instance, resources).run_requests
        ingest_batch(instance, resources, request.partition_key)
        small = {"max_steps": 2, "max_length": 128}
        trained = dg.materialize(assets, selection=dg.AssetSelection.assets("preference_pairs", "sft_model",
                                                                            "policy_toy"),
                                 instance=instance, resources=resources,
                                 run_config={"ops": {"sft_model": {"config": small},
                                                     "policy_toy": {"config": small | {"toy_strength": 2.0}}}})
        assert trained.success  # trained by the worker process, which loaded the plugin from the environment
        evaluated = dg.materialize(assets, selection=EVALUATION_SELECTION, instance=instance, resources=resources,
                                   run_config={"ops": {"evaluation_report": {"config": {
                                       "max_pairs": 4, "max_prompts": 2, "max_new_tokens": 4}}}})
    tracker = Tracker(resources["mlflow"].resolved_uri())
    version = tracker.version_by_alias("policy_toy", "candidate")
    assert version.tags["lineage.method"] == "toy" and version.tags["lineage.parent_model"] == "models:/sft_model/1"
    assert tracker.client.get_run(version.run_id).data.params["toy_strength"] == "2.0"
    report = evaluated.asset_materializations_for_node("evaluation_report")[0].metadata
    assert "| policy_toy |" in report["comparison"].value
    assert 0.0 <= report["policy_toy/win_rate_vs_sft"].value <= 1.0
    assert set(report["not_evaluated"].value) == set(policy_asset_names()) - {"policy_toy"}


@pytest.mark.integration
def test_a_failed_method_does_not_block_the_evaluation_of_the_others(tmp_path, tiny_model_dir):
    root = tmp_path / "data"
    _drop_feedback(root)
    defs = build_definitions(data_root=root, base_model=str(tiny_model_dir))
    assets = build_assets()
    evaluation = dg.AssetKey("evaluation_report")
    with dg.instance_for_test() as instance:
        resources = build_resources(data_root=root, base_model=str(tiny_model_dir))
        [request] = sense_inbox(instance, resources).run_requests
        ingest_batch(instance, resources, request.partition_key)
        state = dg.evaluate_automation_conditions(defs=defs, instance=instance)
        small = {"max_steps": 2, "max_length": 128}
        trained = dg.materialize(
            assets, selection=dg.AssetSelection.assets("preference_pairs", "binary_feedback", "sft_model",
                                                       "policy_dpo", "policy_kto"),
            instance=instance, resources=resources, raise_on_error=False,
            run_config={"ops": {"sft_model": {"config": small}, "policy_dpo": {"config": small},
                                # rejected by the method's own rules: KTO's KL estimate needs two rows a batch
                                "policy_kto": {"config": small | {"per_device_batch_size": 1}}}})
        assert not trained.success
        assert trained.asset_materializations_for_node("policy_dpo")
        assert not trained.asset_materializations_for_node("policy_kto")
        state = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=state.cursor)
        assert state.get_num_requested(evaluation) == 1  # the daemon would evaluate what did train
        evaluated = dg.materialize(assets, selection=EVALUATION_SELECTION, instance=instance, resources=resources,
                                   run_config={"ops": {"evaluation_report": {"config": {
                                       "max_pairs": 4, "max_prompts": 2, "max_new_tokens": 4}}}})
    report = evaluated.asset_materializations_for_node("evaluation_report")[0].metadata
    assert "| policy_dpo |" in report["comparison"].value and "| policy_kto |" not in report["comparison"].value
    assert "policy_kto" in report["not_evaluated"].value


def test_config_validation_reads_no_data(tmp_path, tiny_model_dir, monkeypatch):
    import pandas as pd

    pairs = tmp_path / "pairs.parquet"
    pd.DataFrame({"prompt": ["hi"], "chosen": ["a"], "rejected": ["b"]}).to_parquet(pairs)

    def no_reading(*args, **kwargs):
        raise AssertionError("validation read the data")

    monkeypatch.setattr(pd, "read_parquet", no_reading)
    monkeypatch.setattr("pyarrow.parquet.read_table", no_reading)
    config = config_from_dict("dpo", {"model": str(tiny_model_dir), "data": str(pairs), "output_dir": str(tmp_path / "o")})
    assert config.data == str(pairs)


@pytest.mark.parametrize("method", ["ppo", "online_dpo"])
def test_own_loop_methods_refuse_epoch_sized_runs(method, tmp_path, tiny_model_dir):
    """PPO's and online DPO's own loops count steps: max_steps -1 (num_train_epochs) is refused, naming the fix."""
    from alignment_pipelines.methods.config import ConfigError

    values = {"model": str(tiny_model_dir), "data": str(demo_feedback_path()), "output_dir": str(tmp_path / "o"),
              "reward_model": str(tiny_model_dir), "judge": "rule"}
    values = {k: v for k, v in values.items() if k in {f.name for f, _ in METHODS[method].config_cls.field_specs()}}
    assert config_from_dict(method, values).max_steps >= 1  # the default is a step count
    with pytest.raises(ConfigError, match=r"max_steps=-1: .*own training loop counts steps: give max_steps >= 1"):
        config_from_dict(method, {**values, "max_steps": -1})
