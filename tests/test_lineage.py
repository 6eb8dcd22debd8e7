"""Lineage a reviewer can follow: a training run's dataset is its MLflow dataset input, and the version it registers
carries a model card (data, method, config) that promotion completes with the gate's verdict and the judge."""

from __future__ import annotations

import json
import shutil

import dagster as dg

from alignment_pipelines.assets.training import build_training_asset
from alignment_pipelines.definitions import build_resources
from alignment_pipelines.methods import METHODS
from alignment_pipelines.tracking import CARD_VERDICT_HEADING, Lineage, Tracker, card_with_verdict
from pairs_dataset import write_pairs_dataset

SMALL = {"max_steps": 2, "max_length": 64, "gradient_checkpointing": False, "save_steps": 0, "logging_steps": 1}


def test_a_training_run_logs_its_dataset_and_registers_a_model_card(tmp_path, tiny_model_dir):
    root = tmp_path / "data"
    dataset = write_pairs_dataset(root, topics=6, repeats=2)
    base = root / "models" / "tiny"
    shutil.copytree(tiny_model_dir, base)

    @dg.asset(name="preference_pairs")
    def given_pairs():
        return dataset

    resources = build_resources(data_root=root, base_model=str(base))
    with dg.instance_for_test() as instance:
        result = dg.materialize([given_pairs, build_training_asset(METHODS["sft"])], instance=instance,
                                resources=resources, run_config={"ops": {"sft_model": {"config": SMALL}}})
    ref = result.output_for_node("sft_model")
    tracker = Tracker(resources["mlflow"].resolved_uri())

    [logged] = tracker.client.get_run(ref.mlflow_run_id).inputs.dataset_inputs
    assert logged.dataset.digest == dataset.version and logged.dataset.name == "preference_pairs"
    assert json.loads(logged.dataset.source)["uri"] == dataset.train_path
    assert json.loads(logged.dataset.profile) == {"train_rows": dataset.train_rows, "eval_rows": dataset.eval_rows,
                                                  "batches": 1}
    tags = {tag.key: tag.value for tag in logged.tags}
    assert tags["dataset.batches"] == "b1" and tags["dataset.train_rows"] == str(dataset.train_rows)
    assert tags["mlflow.data.context"] == "training"

    card = tracker.client.get_model_version("sft_model", ref.registered_version).description
    assert card.startswith("sft (LoRA adapter) on local:")
    assert f"- dataset version: {dataset.version}" in card and "- method: sft" in card
    assert f"- rows: {dataset.train_rows} train, {dataset.eval_rows} eval" in card
    assert "| max_steps | 2 |" in card and "- batches (1): b1" in card


def test_a_later_verdict_replaces_the_cards_evaluation_section():
    from alignment_pipelines.tracking import CardFacts, model_card

    card = model_card(Lineage(method="dpo", base_model="tiny", dataset_version="v9", batches=("a", "b")), "adapter",
                      CardFacts(rows={"train": 10}, config={"beta": 0.1}))
    refused = card_with_verdict(card, "refused", "win-rate 0.41", "reward-model:judge", {"preference_accuracy": 0.4})
    passed = card_with_verdict(refused, "passed", "win-rate 0.7", "reward-model:judge", {"preference_accuracy": 0.8})
    assert passed.count(CARD_VERDICT_HEADING) == 1 and passed.startswith(card.rstrip())
    assert "- gate verdict: passed" in passed and "refused" not in passed
    assert "| preference_accuracy | 0.8 |" in passed and "- judge: reward-model:judge" in passed
