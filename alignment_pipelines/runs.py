"""Drive the graph in-process as the daemon would: sense the inbox, ingest a batch, run the demo.

The demo, the tests and the benchmarks use these, so each step exists once.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg

from alignment_pipelines.assets.ingestion import (feedback_batches, feedback_inbox_sensor, raw_feedback,
                                                  validate_feedback_batch)
from alignment_pipelines.definitions import (ALL_ASSETS, ALL_CHECKS, EVALUATION_SELECTION, TRAINING_SELECTION,
                                             build_resources)
from alignment_pipelines.layout import DATA_ROOT_ENV
from alignment_pipelines.methods import METHODS


def sense_inbox(instance: dg.DagsterInstance, resources: dict, cursor: str | None = None) -> dg.SensorResult:
    """Evaluate the inbox sensor once and register the batches it asks for, as the daemon would."""
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources) as context:
        result = feedback_inbox_sensor(context)
    for request in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(feedback_batches.name, list(request.partition_keys))
    return result


def ingest_batch(instance: dg.DagsterInstance, resources: dict, key: str, run_config: dict | None = None,
                 raise_on_error: bool = True) -> dg.ExecuteInProcessResult:
    """What the sensor's run request for `key` runs: copy, validate and gate one batch."""
    return dg.materialize([raw_feedback, validate_feedback_batch, *ALL_CHECKS], partition_key=key,
                          instance=instance, resources=resources, run_config=run_config,
                          raise_on_error=raise_on_error)


# Settings that train every method on SmolLM2 + the demo feedback in about 15 minutes on 2 CPU cores: a few steps
# each, short samples for the online methods, and no extra pass over the eval split at the end of training (the
# evaluation_report scores every model on it). The demo's answers are short, so SFT trains unpacked (packing would
# fill every step with 512 tokens of several rows) and without activation checkpointing (it would cost time and save
# little memory). LoRA learning rates are higher than the full fine-tuning defaults, so that a few steps move a model.
# The budget goes where feedback shows: SFT is a short warm start (6 steps: it imitates the chosen answers, so a
# longer SFT leaves the preference methods nothing the evaluation can tell apart), ORPO learns the preference from the
# base model in one pass, and RLOO spends the most samples (8 steps of 2 prompts x 4 answers) climbing the training
# reward model, judged afterwards by the evaluation reward model it never saw.
DEMO_COMMON = {"gradient_checkpointing": False, "evaluate_at_end": False}
DEMO_METHOD_CONFIG = {
    "sft": {"max_steps": 6, "packing": False},
    "dpo": {"max_steps": 8, "learning_rate": 1e-4},
    "kto": {"max_steps": 8, "learning_rate": 1e-4},
    "orpo": {"max_steps": 16, "learning_rate": 3e-4},
    "reward": {"max_steps": 20},
    "ppo": {"max_steps": 5, "max_new_tokens": 32, "ppo_epochs": 2, "learning_rate": 1e-4},
    "rloo": {"max_steps": 8, "max_new_tokens": 24, "per_device_batch_size": 8, "learning_rate": 2e-4},
    # A 135M annotator prefers the same position in every pair (benchmarks/results/steerability.md), so every pair
    # would be a tie and nothing would train: the demo's annotator is the rule judge.
    "online_dpo": {"max_steps": 4, "max_new_tokens": 32, "learning_rate": 2e-4, "judge": "rule"},
}
DEMO_RUN_CONFIG = {"ops": {
    **{spec.asset: {"config": DEMO_COMMON | DEMO_METHOD_CONFIG.get(name, {"max_steps": 10})}
       for name, spec in METHODS.items()},
    # the evaluation's judge is the reward method on the judge split, with the demo's reward settings
    **({"evaluation_reward_model": {"config": DEMO_COMMON | DEMO_METHOD_CONFIG["reward"]}}
       if any(spec.produces == "reward" for spec in METHODS.values()) else {}),
    "evaluation_report": {"config": {"max_pairs": 32, "max_prompts": 64, "max_new_tokens": 48, "batch_size": 16}},
}}


def run_demo(base_model: str | None = None, data_root: str | Path | None = None,
             run_config: dict | None = None, instance: dg.DagsterInstance | None = None) -> dict:
    """Drop the demo feedback in the inbox, run the inbox sensor, train every method, evaluate, promote.

    Runs in the instance at DAGSTER_HOME, so `dagster dev` afterwards shows every asset
    materialized, with the same run history a scheduled deployment would have. Training and
    evaluation are separate runs, as under the daemon: a method that fails does not stop the
    evaluation of the others.
    """
    from alignment_pipelines.data.demo import demo_feedback_path

    resources = build_resources(data_root=data_root, base_model=base_model)
    layout = resources["storage"].layout
    shutil.copy2(demo_feedback_path(), layout.inbox / "demo_feedback.jsonl")  # keeps the old mtime: settled
    instance = instance or dg.DagsterInstance.get()
    run_config = run_config or DEMO_RUN_CONFIG

    batches = [request.partition_key for request in sense_inbox(instance, resources).run_requests or []]
    for key in batches:
        ingest_batch(instance, resources, key)
    training = dg.materialize(ALL_ASSETS, selection=TRAINING_SELECTION, instance=instance, resources=resources,
                              run_config=_ops(run_config, TRAINING_SELECTION), raise_on_error=False)
    evaluation = dg.materialize(ALL_ASSETS, selection=EVALUATION_SELECTION, instance=instance, resources=resources,
                                run_config=_ops(run_config, EVALUATION_SELECTION))
    failed = sorted(spec.asset for spec in METHODS.values()
                    if not training.asset_materializations_for_node(spec.asset))
    report = evaluation.asset_materializations_for_node("evaluation_report")[0].metadata
    promotion = evaluation.asset_materializations_for_node("model_promotion")[0].metadata
    return {
        "batches": batches,
        "runs": {"training": training.run_id, "evaluation": evaluation.run_id},
        "failed_methods": failed,
        "models": {spec.asset: training.output_for_node(spec.asset).uri for spec in METHODS.values()
                   if spec.asset not in failed},
        "evaluation": {k: v.value for k, v in report.items()
                       if k.endswith(("/win_rate_vs_sft", "/win_rate_vs_sft_ci_low", "/preference_accuracy"))},
        "champion": promotion["champion"].value,
        "gate": promotion["action"].value,
        "data_root": str(layout.root),
        "env": {DATA_ROOT_ENV: str(layout.root)},
    }


def _ops(run_config: dict, selection: dg.AssetSelection) -> dict:
    """The part of a run config whose ops are in ``selection`` (Dagster rejects config for ops a run lacks)."""
    names = {key.to_user_string() for key in selection.resolve(ALL_ASSETS)}
    return {"ops": {op: value for op, value in run_config.get("ops", {}).items() if op in names}}
