"""The whole graph in real Dagster runs: sensor → ingestion → gates → training → evaluation → MLflow."""

from __future__ import annotations

import json
import os
import time

import dagster as dg
import pytest

from alignment_pipelines.data.demo import demo_feedback_path
from alignment_pipelines.definitions import (ALL_ASSETS, EVALUATION_SELECTION, TRAINING_SELECTION,
                                            build_definitions, build_resources)
from alignment_pipelines.evaluation.schema import EvaluationReport
from alignment_pipelines.runs import ingest_batch, sense_inbox
from alignment_pipelines.tracking import Tracker
from alignment_pipelines.assets.ingestion import feedback_batches

pytestmark = pytest.mark.integration

TINY_TRAINING_CONFIG = {"ops": {
    "sft_model": {"config": {"max_steps": 4, "max_length": 128}},
    "policy_dpo": {"config": {"max_steps": 4, "max_length": 128}},
    "policy_orpo": {"config": {"max_steps": 4, "max_length": 128}},
    "policy_kto": {"config": {"max_steps": 4, "max_length": 128}},
    "reward_model": {"config": {"max_steps": 2, "max_length": 128}},
    "policy_ppo": {"config": {"max_steps": 2, "max_length": 128, "max_new_tokens": 8}},
    "policy_rloo": {"config": {"max_steps": 2, "max_length": 128, "max_new_tokens": 8}},
    "policy_online_dpo": {"config": {"max_steps": 2, "max_length": 128, "max_new_tokens": 8}},
    "evaluation_reward_model": {"config": {"max_steps": 2, "max_length": 128}},
}}
TINY_EVALUATION_CONFIG = {"ops": {"evaluation_report": {"config": {"max_pairs": 8, "max_prompts": 4,
                                                                    "max_new_tokens": 8}}}}
MALFORMED = [
    '{"prompt": "What is 2+2?", "chosen": "4', # truncated JSON
    json.dumps({"prompt": "Same?", "chosen": "yes", "rejected": "yes"}),
    json.dumps({"prompt": "", "chosen": "a", "rejected": "b"}),
]


def _inbox_file(root, name, good_rows=40, bad_lines=()):
    lines = demo_feedback_path().read_text().splitlines()[:good_rows] + list(bad_lines)
    inbox = root / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    (inbox / name).write_text("\n".join(lines) + "\n")
    settled = time.time() - 60  # as if dropped a minute ago: complete, past the sensor's settle time
    os.utime(inbox / name, (settled, settled))
    return inbox / name


def _sense(instance, resources):
    return sense_inbox(instance, resources)


def _ingest(instance, resources, key):
    return ingest_batch(instance, resources, key, raise_on_error=False)


@pytest.fixture
def env(tmp_path, tiny_model_dir):
    with dg.instance_for_test() as instance:
        resources = build_resources(data_root=tmp_path / "data", base_model=str(tiny_model_dir))
        yield instance, resources, tmp_path / "data"


def test_feedback_becomes_a_registered_evaluated_policy(env):
    instance, resources, root = env
    _inbox_file(root, "feedback.jsonl", bad_lines=MALFORMED)

    sensed = _sense(instance, resources)
    assert len(sensed.run_requests) == 1
    key = sensed.run_requests[0].partition_key
    assert key.startswith("feedback.jsonl-")
    assert _sense(instance, resources).run_requests in (None, [])  # idempotent: same file, no new batch

    ingest = _ingest(instance, resources, key)
    assert ingest.success
    quarantine = ingest.asset_materializations_for_node("validate_feedback_batch")
    by_key = {m.asset_key.to_user_string(): m.metadata for m in quarantine}
    assert by_key["validated_feedback"]["dagster/row_count"].value == 40
    assert by_key["quarantine"]["dagster/row_count"].value == 3
    reasons = by_key["quarantine"]["counts_by_reason"].value
    assert reasons == {"invalid_json": 1, "identical_pair": 1, "empty_field": 1}
    checks = ingest.get_asset_check_evaluations()
    assert [c.passed for c in checks] == [True]

    result = dg.materialize(ALL_ASSETS, selection=TRAINING_SELECTION, instance=instance,
                            resources=resources, run_config=TINY_TRAINING_CONFIG)
    assert result.success
    evaluation = dg.materialize(ALL_ASSETS, selection=EVALUATION_SELECTION, instance=instance,
                                resources=resources, run_config=TINY_EVALUATION_CONFIG)
    assert evaluation.success

    tracker = Tracker(resources["mlflow"].resolved_uri())
    for name, method in (("sft_model", "sft"), ("policy_dpo", "dpo")):
        version = tracker.version_by_alias(name, "candidate")
        assert version.tags["lineage.method"] == method
        assert version.tags["lineage.batches"] == key
        assert version.tags["lineage.dagster_run_id"] == result.run_id
        assert version.tags["lineage.dataset_version"] == result.output_for_node("preference_pairs").version
    dpo = tracker.version_by_alias("policy_dpo", "candidate")
    assert dpo.tags["lineage.parent_model"] == "models:/sft_model/1"
    run = tracker.client.get_run(dpo.run_id)
    assert "rewards/margins" in run.data.metrics  # per-step metrics streamed from the Pipes worker
    assert len(tracker.client.get_metric_history(dpo.run_id, "loss")) == 4

    orpo = tracker.version_by_alias("policy_orpo", "candidate")
    assert orpo.tags["lineage.method"] == "orpo" and "lineage.parent_model" not in orpo.tags  # from base

    report = evaluation.asset_materializations_for_node("evaluation_report")[0].metadata
    for policy in ("policy_dpo", "policy_kto", "policy_orpo"):
        assert 0.0 <= report[f"{policy}/win_rate_vs_sft"].value <= 1.0
        assert 0.0 <= report[f"{policy}/preference_accuracy"].value <= 1.0
        assert report[f"{policy}/judged_vs_sft"].value == min(4, result.output_for_node("preference_pairs").eval_rows)
        assert f"**{policy}**" in report["report"].value
        assert f"| {policy} |" in report["comparison"].value
        version = tracker.version_by_alias(policy, "candidate")
        assert tracker.client.get_model_version(policy, version.version).tags["evaluation.gate"] in ("passed", "refused")
    assert version.tags["lineage.role"] == "policy"

    # the judge: a reward model trained on the judge split, never the reward model PPO and RLOO optimised
    judge_version = tracker.version_by_alias("evaluation_reward_model", "candidate")
    assert judge_version.tags["alignment.judge"] == "evaluation" and judge_version.tags["lineage.role"] == "reward"
    assert judge_version.tags["lineage.split"] == "judge"
    judged_by = f"models:/evaluation_reward_model/{judge_version.version}"
    output = evaluation.output_for_node("evaluation_report")
    written = EvaluationReport.read(f"{output['evidence']['path']}/evaluation.json")
    assert written.to_dict() == output
    assert (written.judge.source, written.judge.model_uri, written.judge.heuristic) == \
        ("evaluation_reward_model", judged_by, False)
    assert report["report"].value.splitlines()[0].startswith(f"**Judged by `reward_model` {judged_by}**")
    for policy in ("policy_ppo", "policy_rloo"):
        optimised = tracker.version_by_alias(policy, "candidate").tags["lineage.uses.reward_model"]
        assert optimised == "models:/reward_model/1" != judged_by
        assert optimised in written.models[policy].optimised_against


def test_failed_blocking_check_keeps_the_batch_out_of_training(env):
    instance, resources, root = env
    _inbox_file(root, "good.jsonl", good_rows=20)
    _sense(instance, resources)
    _inbox_file(root, "junk.jsonl", good_rows=2, bad_lines=["not json"] * 10)
    keys = sorted(instance.get_dynamic_partitions(feedback_batches.name))
    keys += [r.partition_key for r in _sense(instance, resources).run_requests]
    for key in keys:
        _ingest(instance, resources, key)

    junk = next(k for k in keys if k.startswith("junk"))
    check = instance.event_log_storage.get_latest_asset_check_execution_by_key(
        [dg.AssetCheckKey(dg.AssetKey("validated_feedback"), "validated_feedback_expectations")])
    assert check  # the check ran; its per-batch verdict is recorded in the batch summary
    summary = json.loads((root / "batches" / junk / "summary.json").read_text())
    assert summary["suite_success"] is False
    assert summary["by_reason"] == {"invalid_json": 10, "duplicate_across_batches": 2}  # its 2 good rows were in good.jsonl

    result = dg.materialize(ALL_ASSETS, selection=dg.AssetSelection.assets("preference_pairs"),
                            instance=instance, resources=resources)
    dataset = result.output_for_node("preference_pairs")
    assert junk not in dataset.batches and len(dataset.batches) == 1
    judge_rows = result.asset_materializations_for_node("preference_pairs")[0].metadata["judge_rows"].value
    assert dataset.train_rows + judge_rows + dataset.eval_rows == 20 and judge_rows > 0


def test_new_data_retrains_and_rejected_data_retrains_nothing(env):
    instance, resources, root = env
    defs = build_definitions(data_root=root, base_model="tiny-random")
    pairs, sft = dg.AssetKey("preference_pairs"), dg.AssetKey("sft_model")

    def tick(previous):
        return dg.evaluate_automation_conditions(defs=defs, instance=instance,
                                                 cursor=previous.cursor if previous else None)

    def ingest(name, **rows):
        _inbox_file(root, name, **rows)
        _ingest(instance, resources, _sense(instance, resources).run_requests[0].partition_key)

    def build_pairs():
        return dg.materialize(ALL_ASSETS, selection=dg.AssetSelection.assets(pairs), instance=instance,
                              resources=resources).output_for_node("preference_pairs")

    state = tick(None)  # the first tick only records where things stand
    ingest("first.jsonl", good_rows=10)
    state = tick(state)
    assert state.get_num_requested(pairs) == 1
    assert state.get_num_requested(sft) == 0  # its input does not exist yet
    first = build_pairs()
    state = tick(state)
    assert state.get_num_requested(sft) == 1

    ingest("junk.jsonl", good_rows=1, bad_lines=["not json"] * 5)  # fails its blocking check
    state = tick(state)
    assert state.get_num_requested(pairs) == 1
    assert build_pairs().version == first.version
    state = tick(state)
    assert state.get_num_requested(sft) == 0  # nothing new got through the gate

    ingest("second.jsonl", good_rows=14)
    state = tick(state)
    assert state.get_num_requested(pairs) == 1
    assert build_pairs().version != first.version
    state = tick(state)
    assert state.get_num_requested(sft) == 1
