"""Ingestion assets on real and varied feedback: every row accounted for, in the UI's metadata."""

import gzip
import json
import os
import shutil
import time
from pathlib import Path

import dagster as dg
import pytest

from alignment_pipelines.assets.datasets import binary_feedback, preference_pairs, prompts
from alignment_pipelines.assets.ingestion import SUMMARY_FILE, gate_verdicts, raw_feedback, validate_feedback_batch
from alignment_pipelines.data.demo import demo_feedback_path
from alignment_pipelines.definitions import ALL_ASSETS, build_resources
from alignment_pipelines.runs import ingest_batch, sense_inbox

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-base.jsonl.gz"


def _settle(path: Path) -> None:
    stamp = time.time() - 60
    os.utime(path, (stamp, stamp))


def _ingest_inbox(instance, resources, run_config=None) -> dict[str, dg.ExecuteInProcessResult]:
    return {r.partition_key: ingest_batch(instance, resources, r.partition_key, run_config=run_config)
            for r in sense_inbox(instance, resources).run_requests}


def _split_rows(built, dataset: str) -> int:
    """A dataset's rows over its train, eval and judge splits, from its materialization."""
    [event] = built.asset_materializations_for_node(dataset)
    return sum(event.metadata[f"{split}_rows"].value for split in ("train", "eval", "judge"))


def _metadata(result, asset: str) -> dict:
    [event] = [m for m in result.asset_materializations_for_node("validate_feedback_batch")
               if m.asset_key.to_user_string() == asset]
    return {k: v.value for k, v in event.metadata.items()}


@pytest.mark.skipif(not HH.exists(), reason="../shared/data is not beside the project")
def test_real_hh_rlhf_batch_is_fully_accounted_for_with_token_statistics(tmp_path, tiny_model_dir):
    resources = build_resources(data_root=tmp_path, base_model=str(tiny_model_dir))
    inbox = resources["storage"].layout.inbox
    shutil.copyfile(HH, inbox / HH.name)
    _settle(inbox / HH.name)
    with dg.instance_for_test() as instance:
        [(key, result)] = _ingest_inbox(instance, resources, run_config={"ops": {"validate_feedback_batch": {
            "config": {"max_prompt_tokens": 256}}}}).items()
        accepted, quarantine = _metadata(result, "validated_feedback"), _metadata(result, "quarantine")
        assert accepted["input_rows"] == 1717
        assert accepted["dagster/row_count"] == 1709 and quarantine["dagster/row_count"] == 8
        assert quarantine["counts_by_reason"] == {"empty_field": 3, "prompt_mismatch": 5}
        assert accepted["layout"] == "hh-rlhf" and accepted["kind"] == "pairwise"
        assert "| 387 | empty_field |" in quarantine["sample"]
        truncation = accepted["truncation"]  # measured with the base model's own tokenizer
        assert truncation["measured_rows"] == 1709 and truncation["max_prompt_tokens"] == 256
        assert 0 < truncation["prompt_over"] < 1709  # long multi-turn prompts counted, not dropped
        assert truncation["prompt_tokens_max"] > 256
        assert [c.passed for c in result.get_asset_check_evaluations()] == [True]


def test_binary_and_pairwise_batches_feed_the_kto_dataset_with_balancing_weights(tmp_path):
    resources = build_resources(data_root=tmp_path, base_model="tiny-random")
    inbox = resources["storage"].layout.inbox
    pairs = demo_feedback_path().read_text().splitlines()[:20]
    (inbox / "pairs.jsonl").write_text("\n".join(pairs) + "\n")
    logs = [{"messages": [{"role": "user", "content": f"Question {i}?"},
                          {"role": "assistant", "content": f"Answer number {i}."}],
             "thumbs": "up" if i % 4 == 0 else "down"} for i in range(16)]
    with gzip.open(inbox / "chat_logs.jsonl.gz", "wt") as handle:
        handle.write("\n".join(json.dumps(log) for log in logs) + "\n")
    for name in ("pairs.jsonl", "chat_logs.jsonl.gz"):
        _settle(inbox / name)
    with dg.instance_for_test() as instance:
        results = _ingest_inbox(instance, resources)
        kinds = {key.split("-")[0]: _metadata(r, "validated_feedback")["kind"] for key, r in results.items()}
        assert kinds == {"pairs.jsonl": "pairwise", "chat_logs.jsonl.gz": "binary"}
        built = dg.materialize(ALL_ASSETS, selection=dg.AssetSelection.assets("binary_feedback", "prompts"),
                               instance=instance, resources=resources)
        binary = built.output_for_node("binary_feedback")
        # 20 pairs → 20 up + 20 down; chat logs: 4 up, 12 down → 24 up : 32 down
        assert binary.balance["desirable"] == 24 and binary.balance["undesirable"] == 32
        assert binary.balance["desirable_weight"] * 24 == pytest.approx(binary.balance["undesirable_weight"] * 32)
        assert _split_rows(built, "binary_feedback") == 56
        assert _split_rows(built, "prompts") == 36  # 20 pair prompts + 16 chat-log prompts


def test_datasets_admit_a_batch_on_its_blocking_checks_recorded_verdict(tmp_path):
    """One gate verdict: the check's result recorded in the instance, on the batch as it is now."""
    resources = build_resources(data_root=tmp_path, base_model="tiny-random")
    layout = resources["storage"].layout
    no_tokens = {"ops": {"validate_feedback_batch": {"config": {"measure_tokens": False}}}}
    rows = demo_feedback_path().read_text().splitlines()
    ingestion = [raw_feedback, validate_feedback_batch]
    datasets = [*ingestion, preference_pairs, binary_feedback, prompts]

    def drop_and_ingest(instance, name, lines):
        (layout.inbox / name).write_text("\n".join(lines) + "\n")
        _settle(layout.inbox / name)
        [request] = sense_inbox(instance, resources).run_requests
        key = request.partition_key
        return key, ingest_batch(instance, resources, key, run_config=no_tokens, raise_on_error=False)

    with dg.instance_for_test() as instance:
        junk, result = drop_and_ingest(instance, "junk.jsonl", rows[:2] + ["not json"] * 10)
        assert [c.passed for c in result.get_asset_check_evaluations()] == [False]
        good, result = drop_and_ingest(instance, "good.jsonl", rows[:20])
        assert [c.passed for c in result.get_asset_check_evaluations()] == [True]
        # the rejected batch's two good rows never reach a trainer, so here they are not duplicates
        assert _metadata(result, "quarantine")["dagster/row_count"] == 0
        assert gate_verdicts(instance) == {junk: False, good: True}

        # summary.json records the suite's results as data; the datasets do not decide by it
        for key, flipped in ((junk, True), (good, False)):
            summary_file = layout.batch_dir(key) / SUMMARY_FILE
            summary_file.write_text(json.dumps({**json.loads(summary_file.read_text()), "suite_success": flipped}))
        built = dg.materialize(datasets, selection=dg.AssetSelection.assets(preference_pairs), instance=instance,
                               resources=resources)
        dataset = built.output_for_node("preference_pairs")
        assert dataset.batches == (good,) and _split_rows(built, "preference_pairs") == 20
        [event] = built.asset_materializations_for_node("preference_pairs")
        assert event.metadata["batches_blocked_by_checks"].value == [junk]
        assert event.metadata["batches_awaiting_checks"].value == []

        # validated again without its check: no verdict on its current rows, so it waits for one
        dg.materialize(ingestion, partition_key=good, instance=instance, resources=resources, run_config=no_tokens)
        assert gate_verdicts(instance) == {junk: False, good: None}
        waiting = dg.materialize(datasets, selection=dg.AssetSelection.assets(preference_pairs), instance=instance,
                                 resources=resources, raise_on_error=False)
        assert not waiting.success
        ingest_batch(instance, resources, good, run_config=no_tokens)  # validated and checked
        assert gate_verdicts(instance) == {junk: False, good: True}
