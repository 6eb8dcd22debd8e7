"""MLflow, used directly: runs, per-step metrics, model versions, aliases, lineage tags.

A model version is registered only after its run finished; if any step of registration
fails the version is deleted again, so the registry never holds a half-registered model.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

CANDIDATE_ALIAS = "candidate"
CHAMPION_ALIAS = "champion"
# A training worker started by the orchestrator streams its step metrics into this run.
WORKER_MLFLOW_URI_ENV = "ALIGNMENT_PIPELINES_MLFLOW_URI"
WORKER_MLFLOW_RUN_ENV = "ALIGNMENT_PIPELINES_MLFLOW_RUN_ID"


@dataclass(frozen=True)
class Lineage:
    """Where a model came from; stored as `lineage.*` tags on the run and the model version."""

    method: str
    base_model: str
    dataset_version: str
    batches: tuple[str, ...] = ()
    dagster_run_id: str | None = None
    parent_model: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def tags(self) -> dict[str, str]:
        tags = {
            "lineage.method": self.method,
            "lineage.base_model": self.base_model,
            "lineage.dataset_version": self.dataset_version,
            "lineage.batches": ",".join(self.batches),
            "lineage.batch_count": str(len(self.batches)),
        }
        if self.dagster_run_id:
            tags["lineage.dagster_run_id"] = self.dagster_run_id
        if self.parent_model:
            tags["lineage.parent_model"] = self.parent_model
        tags.update({f"lineage.{k}": str(v) for k, v in self.extra.items()})
        # MLflow caps tag values; a long batch list is still countable from batch_count.
        return {k: v[:5000] for k, v in tags.items()}


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    alias: str
    run_id: str
    source: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


class Tracker:
    """A thin wrapper over `MlflowClient` with the few operations the pipeline needs."""

    def __init__(self, tracking_uri: str, artifact_root: str | Path | None = None,
                 experiment: str = "alignment-pipelines"):
        from mlflow import MlflowClient

        os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        existing = self.client.get_experiment_by_name(experiment)
        if existing is not None:
            self.experiment_id = existing.experiment_id
        else:
            location = Path(artifact_root).resolve().as_uri() if artifact_root else None
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)

    def start_run(self, run_name: str, tags: dict[str, str] | None = None) -> str:
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags or {})
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start:start + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, Any], step: int | None = None) -> None:
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        items = [
            Metric(_metric_key(k), float(v), now, step or 0)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ]
        if items:
            self.client.log_batch(run_id, metrics=items)

    def end_run(self, run_id: str, succeeded: bool) -> None:
        self.client.set_terminated(run_id, status="FINISHED" if succeeded else "FAILED")

    def register_model(self, run_id: str, model_dir: str | Path, name: str, lineage: Lineage,
                       alias: str = CANDIDATE_ALIAS) -> RegisteredVersion:
        """Upload the model folder to the run, create a version with lineage tags, set `alias`."""
        from mlflow.exceptions import MlflowException

        self.client.log_artifacts(run_id, str(model_dir), "model")
        try:
            self.client.create_registered_model(name, description="Trained by alignment-pipelines.")
        except MlflowException as error:
            if "RESOURCE_ALREADY_EXISTS" not in str(error.error_code):
                raise
        source = f"runs:/{run_id}/model"
        version = self.client.create_model_version(name, source=source, run_id=run_id, tags=lineage.tags())
        try:
            self.client.set_registered_model_alias(name, alias, version.version)
        except Exception:
            self.client.delete_model_version(name, version.version)
            raise
        return RegisteredVersion(name=name, version=str(version.version), alias=alias, run_id=run_id, source=source)

    def set_alias(self, name: str, version: str, alias: str) -> None:
        self.client.set_registered_model_alias(name, alias, version)

    def version_by_alias(self, name: str, alias: str):
        return self.client.get_model_version_by_alias(name, alias)

    def metrics_callback(self, run_id: str):
        """A transformers `TrainerCallback` that sends every logged step to this run."""
        return step_callback(lambda step, logs: self.log_metrics(run_id, logs, step=step))


def step_callback(on_step: Callable[[int, dict], None]):
    """A transformers `TrainerCallback` calling `on_step(global_step, logs)` at each log event."""
    from transformers import TrainerCallback

    class _StepCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:
                on_step(state.global_step, logs)

    return _StepCallback()


def _metric_key(key: str) -> str:
    """MLflow accepts `/` in keys (TRL logs `rewards/margins`); drop anything else odd."""
    return "".join(ch if ch.isalnum() or ch in "_-./ " else "_" for ch in key)
