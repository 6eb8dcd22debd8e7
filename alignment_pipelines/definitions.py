"""The Dagster code location: it composes assets, checks, resources, sensors and the schedule; nothing else.

Resources are chosen per deployment by ``ALIGNMENT_PIPELINES_DEPLOYMENT`` (``local`` by default,
``production`` for a shared MLflow server and data root named by environment variables).
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from alignment_pipelines.assets.ai_feedback import ai_feedback
from alignment_pipelines.assets.datasets import binary_feedback, preference_pairs, prompts
from alignment_pipelines.assets.evaluation import build_evaluation_asset
from alignment_pipelines.assets.ingestion import (feedback_inbox_sensor, raw_feedback, validate_feedback_batch,
                                                  validated_feedback_expectations)
from alignment_pipelines.assets.promotion import model_promotion, promote_job, rollback_job
from alignment_pipelines.assets.storage import storage_retention, storage_retention_schedule
from alignment_pipelines.assets.training import build_training_assets, policy_asset_names
from alignment_pipelines.layout import DATA_ROOT_ENV, MLFLOW_URI_ENV, default_data_root
from alignment_pipelines.models.spec import DEFAULT_MODEL
from alignment_pipelines.resources.judge import JudgeResource
from alignment_pipelines.resources.launcher import TrainingLauncher
from alignment_pipelines.resources.mlflow import MlflowResource
from alignment_pipelines.resources.models import BaseModelResource
from alignment_pipelines.resources.storage import StorageResource

BASE_MODEL_ENV = "ALIGNMENT_PIPELINES_BASE_MODEL"
DEPLOYMENT_ENV = "ALIGNMENT_PIPELINES_DEPLOYMENT"

DATASETS = [preference_pairs, binary_feedback, prompts]
ALL_CHECKS = [validated_feedback_expectations]
TRAINING_SELECTION = dg.AssetSelection.groups("datasets", "training")
EVALUATION_SELECTION = dg.AssetSelection.groups("evaluation")


def build_assets() -> list[dg.AssetsDefinition]:
    """Every asset, the training ones and the evaluation's inputs generated from the methods registered now."""
    return [raw_feedback, validate_feedback_batch, *DATASETS, *build_training_assets(),
            build_evaluation_asset(policy_asset_names()), model_promotion, ai_feedback, storage_retention]


ALL_ASSETS = build_assets()

nightly_retraining = dg.ScheduleDefinition(
    name="nightly_retraining",
    cron_schedule="0 2 * * *",
    target=TRAINING_SELECTION | EVALUATION_SELECTION,
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
                    deployment: str | None = None) -> dict:
    """``local``: everything under one data root, MLflow in SQLite there (or ``MLFLOW_TRACKING_URI``).
    ``production``: the data root and the MLflow server come from environment variables, read at run time."""
    deployment = deployment or os.environ.get(DEPLOYMENT_ENV, "local")
    if deployment == "production":
        storage = StorageResource(root=dg.EnvVar(DATA_ROOT_ENV))
        mlflow = MlflowResource(storage=storage, tracking_uri=dg.EnvVar(MLFLOW_URI_ENV))
    elif deployment == "local":
        storage = StorageResource(root=str(data_root or default_data_root()))
        mlflow = MlflowResource(storage=storage, tracking_uri=os.environ.get(MLFLOW_URI_ENV))
    else:
        raise ValueError(f"{DEPLOYMENT_ENV}={deployment!r}: must be 'local' or 'production'")
    return {
        "storage": storage,
        "mlflow": mlflow,
        "base_model": BaseModelResource(storage=storage,
                                        model=base_model or os.environ.get(BASE_MODEL_ENV, DEFAULT_MODEL)),
        "launcher": TrainingLauncher(),
        "judge": JudgeResource(),
    }


def build_definitions(**resource_options) -> dg.Definitions:
    return dg.Definitions(
        assets=build_assets(),
        asset_checks=ALL_CHECKS,
        sensors=[feedback_inbox_sensor, retrain_on_new_data],
        schedules=[nightly_retraining, storage_retention_schedule],
        jobs=[promote_job, rollback_job],
        resources=build_resources(**resource_options),
    )


defs = build_definitions()
