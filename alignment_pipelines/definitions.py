"""The Dagster code location: assets, checks, resources, sensors and the schedule."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import dagster as dg

from alignment_pipelines.layout import DATA_ROOT_ENV, default_data_root
from alignment_pipelines.models.spec import DEFAULT_MODEL
from assets.datasets import binary_feedback, preference_pairs, prompts
from assets.evaluation import evaluation_report
from assets.ingestion import (feedback_batches, feedback_inbox_sensor, raw_feedback,
                              validate_feedback_batch, validated_feedback_expectations)
from assets.training import policy_dpo, policy_kto, policy_orpo, sft_model
from resources.launcher import TrainingLauncher
from resources.mlflow import MlflowResource
from resources.models import BaseModelResource
from resources.storage import StorageResource

BASE_MODEL_ENV = "ALIGNMENT_PIPELINES_BASE_MODEL"

DATASETS = [preference_pairs, binary_feedback, prompts]
POLICIES = [policy_dpo, policy_kto, policy_orpo]
ALL_ASSETS = [raw_feedback, validate_feedback_batch, *DATASETS, sft_model, *POLICIES, evaluation_report]
ALL_CHECKS = [validated_feedback_expectations]
TRAINING_SELECTION = dg.AssetSelection.assets(*DATASETS, sft_model, *POLICIES, evaluation_report)

nightly_retraining = dg.ScheduleDefinition(
    name="nightly_retraining",
    cron_schedule="0 2 * * *",
    target=TRAINING_SELECTION,
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Retrain and re-evaluate every night on all accepted feedback. Off until turned on.",
)

retrain_on_new_data = dg.AutomationConditionSensorDefinition(
    "retrain_on_new_data",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Evaluates the assets' automation conditions: new validated data retrains what depends on it.",
)


def build_resources(data_root: str | Path | None = None, base_model: str | None = None,
                    launcher_mode: str = "subprocess") -> dict:
    storage = StorageResource(root=str(data_root or default_data_root()))
    return {
        "storage": storage,
        "mlflow": MlflowResource(storage=storage, tracking_uri=os.environ.get("MLFLOW_TRACKING_URI")),
        "base_model": BaseModelResource(storage=storage,
                                        model=base_model or os.environ.get(BASE_MODEL_ENV, DEFAULT_MODEL)),
        "launcher": TrainingLauncher(mode=launcher_mode),
    }


def build_definitions(**resource_options) -> dg.Definitions:
    return dg.Definitions(
        assets=ALL_ASSETS,
        asset_checks=ALL_CHECKS,
        sensors=[feedback_inbox_sensor, retrain_on_new_data],
        schedules=[nightly_retraining],
        resources=build_resources(**resource_options),
    )


defs = build_definitions()


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


# Step counts that train every method on SmolLM2 + the demo feedback in minutes on a laptop CPU.
DEMO_RUN_CONFIG = {"ops": {
    "sft_model": {"config": {"max_steps": 30}},
    "policy_dpo": {"config": {"max_steps": 20}},
    "policy_kto": {"config": {"max_steps": 16}},
    "policy_orpo": {"config": {"max_steps": 20}},
    "evaluation_report": {"config": {"max_prompts": 12, "max_new_tokens": 48}},
}}


def run_demo(base_model: str | None = None, data_root: str | Path | None = None,
             run_config: dict | None = None, instance: dg.DagsterInstance | None = None) -> dict:
    """Drop the demo feedback in the inbox, run the inbox sensor, materialize everything.

    Runs in the instance at DAGSTER_HOME, so `dagster dev` afterwards shows every asset
    materialized, with the same run history a scheduled deployment would have.
    """
    from alignment_pipelines.data.demo import demo_feedback_path

    resources = build_resources(data_root=data_root, base_model=base_model)
    layout = resources["storage"].layout
    shutil.copy2(demo_feedback_path(), layout.inbox / "demo_feedback.jsonl")  # keeps the old mtime: settled
    instance = instance or dg.DagsterInstance.get()

    batches = [request.partition_key for request in sense_inbox(instance, resources).run_requests or []]
    for key in batches:
        ingest_batch(instance, resources, key)
    result = dg.materialize(ALL_ASSETS, selection=TRAINING_SELECTION, instance=instance,
                            resources=resources, run_config=run_config or DEMO_RUN_CONFIG)
    if not result.success:
        raise RuntimeError(f"training run {result.run_id} failed")
    return {
        "batches": batches,
        "run_id": result.run_id,
        "policies": [result.output_for_node(policy.key.path[-1]).uri for policy in POLICIES],
        "evaluation": {k: v.value for k, v in
                       result.asset_materializations_for_node("evaluation_report")[0].metadata.items()
                       if k.endswith(("/win_rate", "/preference_accuracy")) or k == "promoted_to_champion"},
        "data_root": str(layout.root),
        "env": {DATA_ROOT_ENV: str(layout.root)},
    }
