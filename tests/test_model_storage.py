"""Model storage stays flat: one copy per version, adapters where LoRA trained, retention on a schedule."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import defaultdict

import dagster as dg
import pytest

from alignment_pipelines.assets.storage import storage_retention, storage_retention_schedule
from alignment_pipelines.data.demo import demo_feedback_path
from alignment_pipelines.definitions import ALL_ASSETS, build_resources
from alignment_pipelines.layout import DataRoot
from alignment_pipelines.models.loading import load_model
from alignment_pipelines.models.registry import ModelPrunedError, fetch_model
from alignment_pipelines.promotion import GateDecision, PromotionRefused, current_version, promote, rollback
from alignment_pipelines.retention import (RetentionPolicy, VersionInfo, apply_retention, prune_versions,
                                           registry_versions, versions_to_keep)
from alignment_pipelines.runs import ingest_batch, sense_inbox
from alignment_pipelines.tracking import Lineage, Tracker

ROUND_CONFIG = {"ops": {name: {"config": {"max_steps": 2, "max_length": 64}} for name in ("sft_model", "policy_dpo")}}
ROUND = dg.AssetSelection.assets("preference_pairs", "sft_model", "policy_dpo")


def _drop(root, name, rows):
    inbox = root / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    (inbox / name).write_text("\n".join(demo_feedback_path().read_text().splitlines()[rows]) + "\n")
    settled = time.time() - 60
    os.utime(inbox / name, (settled, settled))


@pytest.mark.integration
def test_two_retraining_rounds_keep_one_copy_of_every_model(tmp_path, tiny_model_dir):
    root = tmp_path / "data"
    resources = build_resources(data_root=root, base_model=str(tiny_model_dir))
    with dg.instance_for_test() as instance:
        for name, rows in (("first.jsonl", slice(0, 30)), ("second.jsonl", slice(30, 60))):
            _drop(root, name, rows)
            for request in sense_inbox(instance, resources).run_requests:
                ingest_batch(instance, resources, request.partition_key)
            result = dg.materialize(ALL_ASSETS, selection=ROUND, instance=instance, resources=resources,
                                    run_config=ROUND_CONFIG)
        dpo = result.asset_materializations_for_node("policy_dpo")[0].metadata
    tracker = Tracker(resources["mlflow"].resolved_uri())
    by_content = defaultdict(list)
    for path in root.rglob("*.safetensors"):
        by_content[hashlib.sha256(path.read_bytes()).hexdigest()].append(str(path.relative_to(root)))
    assert [paths for paths in by_content.values() if len(paths) > 1] == []
    assert not list((root / "runs").rglob("*.safetensors"))  # the run folders were staging
    assert dpo["storage/format"].value == "adapter"
    assert 0 < dpo["storage/version_bytes"].value < dpo["storage/asset_bytes"].value
    assert dpo["model_path"].value == str(fetch_model("models:/policy_dpo/2", tracker.tracking_uri))
    for name in ("sft_model", "policy_dpo"):
        for version in ("1", "2"):
            model, _ = load_model(fetch_model(f"models:/{name}/{version}", tracker.tracking_uri), device="cpu")
            assert model.num_parameters() > 0


def _adapter(base, target, seed):
    """A LoRA adapter on the tiny base with random (non-zero) weights, as a method would save it."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model, tokenizer = load_model(base, device="cpu")
    get_peft_model(model, LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False)).save_pretrained(target)
    (target / "alignment_model.json").write_text(json.dumps({"role": "policy", "format": "adapter",
                                                             "parent": str(base), "method": "x"}))
    return target


def _age(path, hours):
    stamp = time.time() - hours * 3600
    for p in [path, *path.rglob("*")]:
        os.utime(p, (stamp, stamp))


def test_retention_keeps_champion_and_rollback_target_and_prunes_the_rest(tmp_path, tiny_model_dir):
    layout = DataRoot(tmp_path / "data").ensure()
    resources = build_resources(data_root=layout.root, base_model=str(tiny_model_dir))
    tracker = resources["mlflow"].tracker()
    for version in range(1, 5):
        lineage = Lineage(method="x", base_model="tiny", dataset_version=f"d{version}", batches=("b",))
        tracker.register_model(tracker.start_run(f"r{version}"), _adapter(tiny_model_dir, tmp_path / f"a{version}",
                                                                          version), "policy_x", lineage)
    decision = GateDecision(promote=True, reason="test", evidence={})
    promote(tracker.client, "policy_x", "1", decision, actor="test")
    promote(tracker.client, "policy_x", "2", decision, actor="test")  # 1 becomes the rollback target
    leftovers = [layout.checkpoints / "policy_x" / "0123abcd" / "checkpoint-2",
                 layout.runs / "policy_x" / "old-run" / ".model.staging-1234abcd" / "trainer",
                 layout.datasets / "preference_pairs" / "unused", layout.datasets / "preference_pairs" / "d3"]
    for folder in leftovers:
        folder.mkdir(parents=True)
        (folder / "blob.bin").write_bytes(b"x" * 1000)
        _age(folder.parents[0] if folder.name in ("checkpoint-2", "trainer") else folder, 12)
    (layout.datasets / "preference_pairs" / "d4").mkdir()  # the newest dataset version: in use
    pruned_bytes = int(tracker.client.get_model_version("policy_x", "3").tags["storage.bytes"])

    with dg.instance_for_test() as instance:
        result = dg.materialize([storage_retention], instance=instance, resources=resources, run_config={
            "ops": {"storage_retention": {"config": {"keep_last": 1, "min_age_hours": 1.0}}}})
    metadata = result.asset_materializations_for_node("storage_retention")[0].metadata
    assert metadata["pruned_versions"].value == ["policy_x/3"]
    kept = metadata["kept_versions"].value
    assert "alias champion" in kept["policy_x/2"] and "rollback target" in kept["policy_x/1"]
    assert "alias candidate" in kept["policy_x/4"]
    assert metadata["bytes_freed/model_versions"].value == pruned_bytes
    assert metadata["bytes_freed/checkpoints"].value == metadata["bytes_freed/staging"].value == 1000
    assert metadata["bytes_freed/datasets"].value == 2000  # d3 went with version 3; d4 is the newest
    assert metadata["bytes_freed"].value == pruned_bytes + 4000
    assert sorted(p.name for p in (layout.datasets / "preference_pairs").iterdir()) == ["d4"]

    pruned = tracker.client.get_model_version("policy_x", "3")
    assert pruned.tags["storage.pruned"] == "true" and pruned.tags["lineage.dataset_version"] == "d3"
    assert pruned.tags["lineage.method"] == "x"
    with pytest.raises(ModelPrunedError):
        fetch_model("models:/policy_x/3", tracker.tracking_uri)
    assert rollback(tracker.client, "policy_x", actor="test") == "1"
    for version in ("1", "2", "4"):
        load_model(fetch_model(f"models:/policy_x/{version}", tracker.tracking_uri), device="cpu")
    assert storage_retention_schedule.job.name == "storage_retention_job"


def test_what_a_kept_version_needs_is_kept_too():
    """The champion of `aligned_policy` shares its source's artifacts; a kept adapter keeps its base and start."""
    versions = [
        VersionInfo("aligned_policy", "1", {"source.uri": "models:/policy_dpo/1"}, ("champion",), "loc-dpo-1"),
        VersionInfo("policy_dpo", "1", {"lineage.parent_model": "models:/sft_model/1"}, (), "loc-dpo-1"),
        VersionInfo("policy_dpo", "2", {"lineage.parent_model": "models:/sft_model/2"}, ("candidate",), "loc-dpo-2"),
        VersionInfo("reward_model", "1", {"storage.depends_on": "models:/sft_model/1"}, (), "loc-rm-1"),
        *(VersionInfo("sft_model", str(v), {}, (), f"loc-sft-{v}") for v in (1, 2, 3)),
    ]
    kept = versions_to_keep(versions, keep_last=1)
    assert kept["policy_dpo/1"] == ["aligned_policy/1 re-registers it"]
    assert sorted(kept["sft_model/1"]) == ["policy_dpo/1 was trained from it", "reward_model/1 loads onto it"]
    assert kept["sft_model/2"] == ["policy_dpo/2 was trained from it"]
    assert sorted(set(v.key for v in versions) - set(kept)) == []  # reward_model/1 is its model's newest
    assert sorted(versions_to_keep(versions[4:], keep_last=1)) == ["sft_model/3"]


def test_every_version_a_rollback_can_reach_is_kept():
    """Champion 4 was promoted over 3, 3 over 2, 2 over 1: three rollbacks walk back to 1, so all four are kept."""
    chain = [VersionInfo("policy_x", str(v), {"promotion.previous_champion": str(v - 1)} if v > 1 else {},
                         ("champion",) if v == 4 else (), f"loc-{v}") for v in range(1, 6)]
    chain[4] = VersionInfo("policy_x", "5", {"promotion.previous_champion": "4"}, (), "loc-5")  # demoted: not a start
    kept = versions_to_keep(chain, keep_last=1)
    assert sorted(kept) == ["policy_x/1", "policy_x/2", "policy_x/3", "policy_x/4", "policy_x/5"]
    assert kept["policy_x/1"] == kept["policy_x/2"] == kept["policy_x/3"] == ["rollback target"]
    assert kept["policy_x/5"] == ["among the newest 1"]
    looped = [VersionInfo("m", "1", {"promotion.previous_champion": "2"}, ("champion",)),  # re-promoted after 2
              VersionInfo("m", "2", {"promotion.previous_champion": "1"})]
    assert sorted(versions_to_keep(looped, keep_last=1)) == ["m/1", "m/2"]


def test_retention_keeps_the_rollback_chain_and_rollback_refuses_a_pruned_version(tmp_path, tiny_model_dir):
    layout = DataRoot(tmp_path / "data").ensure()
    tracker = Tracker(layout.local_tracking_uri, artifact_root=layout.mlflow_artifacts)
    for version in range(1, 5):
        lineage = Lineage(method="x", base_model="tiny", dataset_version=f"d{version}", batches=("b",))
        tracker.register_model(tracker.start_run(f"r{version}"), _adapter(tiny_model_dir, tmp_path / f"a{version}",
                                                                          version), "policy_x", lineage)
        promote(tracker.client, "policy_x", str(version), GateDecision(True, "test", {}), actor="test")
    # a model that trained but did not register (the registry was down), and one a newer version superseded
    waiting, superseded = layout.runs / "policy_x" / "waiting", layout.runs / "policy_x" / "superseded"
    for folder in (waiting, superseded):
        (folder / "model").mkdir(parents=True)
        (folder / "model" / "adapter_model.safetensors").write_bytes(b"x" * 100)
        (folder / "model" / "metrics.json").write_text("{}")
    _age(superseded, 12)  # finished before every registered version

    report = apply_retention(tracker, layout, RetentionPolicy(keep_last=1, min_age_hours=0), busy_assets=set())
    assert report.pruned == []  # keep_last=1, yet 1, 2 and 3 are where rollbacks from 4 lead
    assert all("rollback target" in report.kept[f"policy_x/{v}"] for v in ("1", "2", "3"))
    assert report.awaiting_registration == [str(waiting)] and waiting.is_dir() and not superseded.exists()

    # Version 1 pruned as retention did before it kept the whole chain (only the first rollback target)
    prune_versions(tracker, [v for v in registry_versions(tracker) if v.key == "policy_x/1"])
    assert rollback(tracker.client, "policy_x", actor="test") == "3"
    assert rollback(tracker.client, "policy_x", actor="test") == "2"
    with pytest.raises(PromotionRefused, match="retention pruned the weights of policy_x version 1"):
        rollback(tracker.client, "policy_x", actor="test")
    assert current_version(tracker.client, "policy_x") == "2"
    load_model(fetch_model("models:/policy_x/2", tracker.tracking_uri), device="cpu")  # the champion still loads
