"""The Dagster code location: it composes assets, checks, resources, sensors and the schedule; nothing else.

Resources are chosen per deployment by ``ALIGNMENT_PIPELINES_DEPLOYMENT`` (``local`` by default,
``production`` for a shared MLflow server and data root named by environment variables, ``k8s`` for that plus
training in Kubernetes pods); ``ALIGNMENT_PIPELINES_LAUNCHER`` (``subprocess`` or ``k8s``) overrides the launcher,
``ALIGNMENT_PIPELINES_JUDGE`` and its ``_BASE_URL``, ``_MODEL``... choose the judge. The data root, the tracking URI
and the launcher are bound here, when the code location loads (resources/__init__.py): a run config cannot change
them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import dagster as dg

from alignment_pipelines.assets.ai_feedback import ai_feedback
from alignment_pipelines.assets.datasets import binary_feedback, preference_pairs, prompts
from alignment_pipelines.assets.evaluation import build_evaluation_asset, build_evaluation_judge_assets
from alignment_pipelines.assets.flywheel import (champion_watch, champion_watch_agreement, traced_feedback_sensor,
                                                 watch_drop_retrain)
from alignment_pipelines.assets.ingestion import (feedback_inbox_sensor, raw_feedback, validate_feedback_batch,
                                                  validated_feedback_expectations)
from alignment_pipelines.assets.promotion import model_promotion, promote_job, rollback_job
from alignment_pipelines.assets.storage import storage_retention, storage_retention_schedule
from alignment_pipelines.assets.training import build_training_assets, policy_asset_names
from alignment_pipelines.layout import DATA_ROOT_ENV, MLFLOW_URI_ENV, default_data_root
from alignment_pipelines.models.spec import DEFAULT_MODEL
from alignment_pipelines.resources.judge import JudgeResource
from alignment_pipelines.resources.launcher import K8sLauncher, TrainingLauncher
from alignment_pipelines.resources.mlflow import MlflowResource
from alignment_pipelines.resources.models import BaseModelResource
from alignment_pipelines.resources.storage import StorageResource

BASE_MODEL_ENV = "ALIGNMENT_PIPELINES_BASE_MODEL"
DEPLOYMENT_ENV = "ALIGNMENT_PIPELINES_DEPLOYMENT"
LAUNCHER_ENV = "ALIGNMENT_PIPELINES_LAUNCHER"
K8S_ENV_PREFIX = "ALIGNMENT_PIPELINES_K8S_"

DATASETS = [preference_pairs, binary_feedback, prompts]
ALL_CHECKS = [validated_feedback_expectations]
TRAINING_SELECTION = dg.AssetSelection.groups("datasets", "training")
EVALUATION_SELECTION = dg.AssetSelection.groups("evaluation")


def build_assets() -> list[dg.AssetsDefinition]:
    """Every asset, the training ones and the evaluation's inputs generated from the methods registered now."""
    return [raw_feedback, validate_feedback_batch, *DATASETS, *build_training_assets(),
            *build_evaluation_judge_assets(), build_evaluation_asset(policy_asset_names()), model_promotion,
            ai_feedback, storage_retention, champion_watch]


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
                    deployment: str | None = None, launcher_mode: str | None = None) -> dict:
    """``local``: everything under one data root, MLflow in SQLite there (or ``MLFLOW_TRACKING_URI``).
    ``production``: the data root and the MLflow server come from environment variables, read at run time.
    ``k8s``: as production, and training runs in Kubernetes pods.

    The training launcher (``launcher_mode``, else ``ALIGNMENT_PIPELINES_LAUNCHER``, else the deployment's):
    ``subprocess`` (local and production) or ``k8s`` (see :func:`build_launcher`). The judge:
    ``ALIGNMENT_PIPELINES_JUDGE`` and its options (:meth:`JudgeResource.from_environment`)."""
    deployment = deployment or os.environ.get(DEPLOYMENT_ENV, "local")
    if deployment in ("production", "k8s"):
        storage = StorageResource(root=deployment_env(DATA_ROOT_ENV))
        mlflow = MlflowResource(storage=storage, tracking_uri=deployment_env(MLFLOW_URI_ENV))
    elif deployment == "local":
        storage = StorageResource(root=str(data_root or default_data_root()))
        mlflow = MlflowResource(storage=storage, tracking_uri=os.environ.get(MLFLOW_URI_ENV))
    else:
        raise ValueError(f"{DEPLOYMENT_ENV}={deployment!r}: must be 'local', 'production' or 'k8s'")
    mode = launcher_mode or os.environ.get(LAUNCHER_ENV) or ("k8s" if deployment == "k8s" else "subprocess")
    return {
        "storage": storage,
        "mlflow": mlflow,
        "base_model": BaseModelResource(storage=storage,
                                        model=base_model or os.environ.get(BASE_MODEL_ENV, DEFAULT_MODEL)),
        "launcher": build_launcher(mode),
        "judge": JudgeResource.from_environment(),
    }


def deployment_env(name: str) -> str:
    """A variable the deployment must set, read when the code location loads."""
    value = os.environ.get(name)
    if not value:
        raise ValueError(f"{name} is not set: the {os.environ.get(DEPLOYMENT_ENV)!r} deployment binds it into its "
                         "resources when the code location loads (docs/production.md)")
    return value


def build_launcher(mode: str) -> TrainingLauncher:
    """``subprocess``: the worker runs on this machine. ``k8s``: in a pod, configured by environment variables read
    when the code location loads (``ALIGNMENT_PIPELINES_K8S_IMAGE`` required; ``_NAMESPACE``, ``_DATA_CLAIM``,
    ``_DATA_MOUNT``, ``_GPUS``, ``_NODE_SELECTOR`` and ``_TOLERATIONS`` as JSON, ``_SERVICE_ACCOUNT``,
    ``_ENV_FROM_SECRETS`` comma-separated, ``_MLFLOW_URI`` optional: docs/scale-out.md)."""
    if mode == "subprocess":
        return TrainingLauncher()
    if mode != "k8s":
        raise ValueError(f"{LAUNCHER_ENV}={mode!r}: must be 'subprocess' or 'k8s'")
    env = os.environ
    options: dict = {"image": deployment_env(f"{K8S_ENV_PREFIX}IMAGE")}
    for key, name in (("namespace", "NAMESPACE"), ("data_volume_claim", "DATA_CLAIM"),
                      ("data_mount_path", "DATA_MOUNT"), ("service_account_name", "SERVICE_ACCOUNT"),
                      ("mlflow_tracking_uri", "MLFLOW_URI"), ("memory", "MEMORY"), ("cpu", "CPU")):
        if env.get(K8S_ENV_PREFIX + name):
            options[key] = env[K8S_ENV_PREFIX + name]
    if env.get(f"{K8S_ENV_PREFIX}GPUS"):
        options["gpus"] = int(env[f"{K8S_ENV_PREFIX}GPUS"])
    for key, name in (("node_selector", "NODE_SELECTOR"), ("tolerations", "TOLERATIONS")):
        if env.get(K8S_ENV_PREFIX + name):
            options[key] = json.loads(env[K8S_ENV_PREFIX + name])
    if env.get(f"{K8S_ENV_PREFIX}ENV_FROM_SECRETS"):
        options["env_from_secrets"] = [s.strip() for s in env[f"{K8S_ENV_PREFIX}ENV_FROM_SECRETS"].split(",")
                                       if s.strip()]
    return K8sLauncher(**options)


def build_definitions(**resource_options) -> dg.Definitions:
    return dg.Definitions(
        assets=build_assets(),
        asset_checks=[*ALL_CHECKS, champion_watch_agreement],
        sensors=[feedback_inbox_sensor, traced_feedback_sensor, watch_drop_retrain, retrain_on_new_data],
        schedules=[nightly_retraining, storage_retention_schedule],
        jobs=[promote_job, rollback_job],
        resources=build_resources(**resource_options),
    )


defs = build_definitions()
