"""MLflow, used directly: runs, per-step metrics, model versions, aliases, lineage tags.

A model version is registered only after its run finished; if any step of registration
fails the version and its artifacts are deleted again, so the registry never holds a
half-registered model. When the registry is unreachable even for that, the next try of the
same run finds the version and finishes it instead of registering a second one; the training
asset retries registration with a bounded backoff (``with_backoff``). A version's artifacts are
an MLflow model (``mlflow_models``) and the only copy of the trained weights; it records their
sha256, which fetching and loading check.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar

if TYPE_CHECKING:
    from alignment_pipelines.refs import DatasetRef

CANDIDATE_ALIAS = "candidate"
CHAMPION_ALIAS = "champion"
REGISTERED_ARTIFACT = "model"  # the MLflow model's folder in its run's artifacts
FORMAT_TAG = "storage.format"  # "adapter" or "full"
BYTES_TAG = "storage.bytes"  # what the version's artifacts hold
DEPENDS_ON_TAG = "storage.depends_on"  # the registered version holding the base an adapter loads onto
PRUNED_TAG = "storage.pruned"  # "true" once retention removed the artifacts; the lineage tags stay
PRUNED_AT_TAG = "storage.pruned_at"
WEIGHTS_SHA256_TAG = "storage.weights_sha256"  # the registered folder's safetensors, checked at fetch and load
# A training worker started by the orchestrator streams its step metrics into this run.
WORKER_MLFLOW_URI_ENV = "ALIGNMENT_PIPELINES_MLFLOW_URI"
WORKER_MLFLOW_RUN_ENV = "ALIGNMENT_PIPELINES_MLFLOW_RUN_ID"
# Error codes of a registry call that may succeed when repeated (the server or its database was unreachable).
TRANSIENT_ERROR_CODES = ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED")

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """Bounded retries: ``attempts`` tries in all, waiting ``first_delay`` seconds after the first failure and
    ``factor`` times longer after each next one."""

    attempts: int = 4
    first_delay: float = 5.0
    factor: float = 2.0


# 5 + 10 + 20 s between tries, on top of MLflow's own retries of each HTTP request (MLFLOW_HTTP_REQUEST_MAX_RETRIES)
REGISTRATION_BACKOFF = Backoff()


def registry_unreachable(error: BaseException) -> bool:
    """Whether a failed registry call may succeed when repeated: the server or its database could not be reached,
    not a request the registry refused."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import InterfaceError, OperationalError

    if isinstance(error, MlflowException):
        return error.error_code in TRANSIENT_ERROR_CODES
    return isinstance(error, (OSError, OperationalError, InterfaceError))


def with_backoff(action: Callable[[], T], what: str, warn: Callable[[str], None] = log.warning,
                 backoff: Backoff | None = None) -> T:
    """``action()``, repeated with ``backoff`` (default ``REGISTRATION_BACKOFF``) while the registry is unreachable;
    each failed try is reported through ``warn``; the last failure (or any other error) is raised."""
    backoff = backoff or REGISTRATION_BACKOFF
    delay = backoff.first_delay
    for attempt in range(1, backoff.attempts):
        try:
            return action()
        except Exception as error:
            if not registry_unreachable(error):
                raise
            warn(f"{what}: try {attempt} of {backoff.attempts} failed, the registry is unreachable ({error}); "
                 f"trying again in {delay:g}s")
            time.sleep(delay)
            delay *= backoff.factor
    return action()  # the last try: its failure is the caller's


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


def describe_version(lineage: Lineage, model_format: str) -> str:
    """The version's one-line description: method, base model, dataset version."""
    kind = "LoRA adapter" if model_format == "adapter" else "full weights"
    return f"{lineage.method} ({kind}) on {lineage.base_model}, dataset {lineage.dataset_version}"


CARD_LIMIT = 5000  # characters of a version's description kept (the registry's column width under Postgres)


@dataclass(frozen=True)
class CardFacts:
    """What a model card says beyond the lineage: the data's row counts and the training config."""

    rows: dict[str, int] = field(default_factory=dict)  # e.g. {"train": 120, "eval": 12}
    config: dict[str, Any] = field(default_factory=dict)


def model_card(lineage: Lineage, model_format: str, facts: CardFacts) -> str:
    """The version's description as a model card a reviewer reads in the registry: the one-line summary, then the
    data, the method and its config; the evaluation, gate verdict and judge follow once promotion decides
    (``card_with_verdict``)."""
    rows = ", ".join(f"{count} {split}" for split, count in facts.rows.items()) or "unknown"
    config = "".join(f"| {key} | {str(value).replace('|', '/')[:200]} |\n"
                     for key, value in sorted(facts.config.items()) if value not in (None, "", [], {}))
    return (f"{describe_version(lineage, model_format)}\n\n"
            f"## Data\n- dataset version: {lineage.dataset_version}\n- rows: {rows}\n"
            f"- batches ({len(lineage.batches)}): {', '.join(lineage.batches) or 'none'}\n\n"
            f"## Method\n- method: {lineage.method}\n- base model: {lineage.base_model}\n"
            f"- started from: {lineage.parent_model or lineage.base_model}\n"
            f"- Dagster run: {lineage.dagster_run_id or 'none'}\n\n"
            f"## Config\n| field | value |\n|---|---|\n{config}")[:CARD_LIMIT]


CARD_VERDICT_HEADING = "## Evaluation and gate"


def card_with_verdict(card: str, verdict: str, reason: str, judge: str, metrics: dict[str, float]) -> str:
    """``card`` with its evaluation section (the gate's verdict and reason, the judge, the metrics) put in, or
    replaced when a later evaluation decides again."""
    kept = card.split(CARD_VERDICT_HEADING)[0].rstrip()
    numbers = "".join(f"| {key} | {value:.4g} |\n" for key, value in sorted(metrics.items())
                      if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))
    section = (f"{CARD_VERDICT_HEADING}\n- gate verdict: {verdict}\n- reason: {reason}\n- judge: {judge}\n\n"
               f"| metric | value |\n|---|---|\n{numbers}")
    return f"{kept[:CARD_LIMIT - len(section) - 2]}\n\n{section}"[:CARD_LIMIT]


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    alias: str
    run_id: str
    source: str
    format: str = "full"
    bytes: int = 0
    path: str = ""  # the loadable folder (models.registry.fetch_model)

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

    def log_dataset(self, run_id: str, dataset: "DatasetRef", context: str = "training") -> None:
        """The training data as the run's dataset input (MLflow's dataset view): digest = the dataset version (its
        content hash), the train split's path as the source, row counts and the source batches as the profile and
        tags. Only metadata is logged; the Parquet files are never read."""
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag

        scheme = dataset.train_path.split("://")[0] if "://" in dataset.train_path else "local"
        profile = {"train_rows": dataset.train_rows, "eval_rows": dataset.eval_rows, "batches": len(dataset.batches)}
        entity = Dataset(name=dataset.name, digest=dataset.version, source_type=scheme,
                         source=json.dumps({"uri": dataset.train_path, "eval_uri": dataset.eval_path}),
                         profile=json.dumps(profile))
        tags = {"mlflow.data.context": context, "dataset.version": dataset.version,
                "dataset.batches": ",".join(dataset.batches), "dataset.train_rows": str(dataset.train_rows),
                "dataset.eval_rows": str(dataset.eval_rows)}
        self.client.log_inputs(run_id, datasets=[DatasetInput(entity, [InputTag(k, v[:5000])
                                                                       for k, v in tags.items()])])

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
                       alias: str = CANDIDATE_ALIAS, start_uri: str | None = None,
                       card_facts: CardFacts | None = None) -> RegisteredVersion:
        """Log ``model_dir`` as an MLflow model in the run, create a version with lineage tags, set ``alias``.

        The artifact store becomes the model's only home: a local store receives the MLflow model by a rename,
        a remote one by upload, and the caller may then delete ``model_dir``. An adapter is logged alone; the
        full model it loads onto is referenced by path and identified by content hash in the lineage, and
        ``start_uri`` (the version it was trained from) finds the registered version holding that base. The
        version records the sha256 of its weights (``storage.weights_sha256``), checked at fetch and load. Its
        description is the model card (``model_card``) when ``card_facts`` is given, else the one-line summary.

        Safe to call again for the same run: a version an earlier call created (its artifacts were complete
        before it was) is finished, not registered twice. A failure removes what this call created; when the
        registry is unreachable even for that, the next call finds and finishes it.
        """
        earlier = self.client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
        if earlier:
            self.client.set_registered_model_alias(name, alias, str(earlier[0].version))
            return self._registered(name, str(earlier[0].version), alias, run_id)
        from alignment_pipelines.layout import folder_bytes
        from alignment_pipelines.mlflow_models import base_of, save_mlflow_model
        from alignment_pipelines.models.loading import PARENT_SHA256_KEY, WEIGHTS_SHA256_KEY, read_model_card
        from alignment_pipelines.models.registry import project_folder

        base = base_of(model_dir)
        depends_on = self._version_holding(base, start_uri) if base else None
        staged = Path(model_dir).parent / f".{REGISTERED_ARTIFACT}.staging-{uuid.uuid4().hex[:8]}"
        try:
            model_format = save_mlflow_model(model_dir, staged, metadata={"lineage": lineage.tags()},
                                             parent_uri=depends_on)
            size = folder_bytes(staged)
            card = read_model_card(project_folder(staged))
            tags = lineage.tags() | {FORMAT_TAG: model_format, BYTES_TAG: str(size),
                                     WEIGHTS_SHA256_TAG: card[WEIGHTS_SHA256_KEY]}
            if base:
                tags |= {"lineage.base_model_path": str(base), "lineage.base_model_sha256": card[PARENT_SHA256_KEY]}
            if depends_on:
                tags[DEPENDS_ON_TAG] = depends_on
            self._store_artifacts(run_id, staged)
            self._ensure_registered_model(name)
            version = self.client.create_model_version(name, source=f"runs:/{run_id}/{REGISTERED_ARTIFACT}",
                                                       run_id=run_id, tags=tags,
                                                       description=model_card(lineage, model_format, card_facts)
                                                       if card_facts else describe_version(lineage, model_format))
            self.client.set_registered_model_alias(name, alias, version.version)
        except BaseException:
            self._undo_registration(name, run_id)
            raise
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        return self._registered(name, str(version.version), alias, run_id)

    def _registered(self, name: str, version: str, alias: str, run_id: str) -> RegisteredVersion:
        from alignment_pipelines.models.registry import fetch_model

        tags = self.client.get_model_version(name, version).tags
        return RegisteredVersion(name=name, version=version, alias=alias, run_id=run_id,
                                 source=f"runs:/{run_id}/{REGISTERED_ARTIFACT}", format=tags.get(FORMAT_TAG, "full"),
                                 bytes=int(tags.get(BYTES_TAG, 0)),
                                 path=str(fetch_model(f"models:/{name}/{version}", self.tracking_uri)))

    def _undo_registration(self, name: str, run_id: str) -> None:
        """Remove the version and the artifacts a failed registration created; when the registry is unreachable,
        say so and leave them to the next try (``register_model`` finishes a version it finds)."""
        try:  # the version first: while one exists, its artifacts are complete
            for created in self.client.search_model_versions(f"name='{name}' and run_id='{run_id}'"):
                self.client.delete_model_version(name, str(created.version))
            self.artifact_repository(run_id).delete_artifacts(REGISTERED_ARTIFACT)
        except Exception as error:
            log.warning("could not undo the failed registration of %s (run %s): %s; the next try finishes it",
                        name, run_id, error)

    def artifact_repository(self, run_id: str):
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        return get_artifact_repository(self.client.get_run(run_id).info.artifact_uri)

    def _store_artifacts(self, run_id: str, folder: Path) -> None:
        """Rename ``folder`` into a local artifact store (no second copy, even briefly); upload it to a remote one.
        What an interrupted earlier try left there is replaced."""
        from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

        repo = self.artifact_repository(run_id)
        if isinstance(repo, LocalArtifactRepository):
            target = Path(repo.artifact_dir) / REGISTERED_ARTIFACT
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(folder, target)
        else:
            repo.log_artifacts(str(folder), REGISTERED_ARTIFACT)

    def _ensure_registered_model(self, name: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name, description="Trained by alignment-pipelines.")
        except MlflowException as error:
            if "RESOURCE_ALREADY_EXISTS" not in str(error.error_code):
                raise

    def _version_holding(self, folder: Path, start_uri: str | None) -> str | None:
        """The registered version whose artifacts hold ``folder``: the start model, or one it depends on;
        None when ``folder`` lies outside the registry (a base model in the model store)."""
        from alignment_pipelines.models.registry import fetch_model, parse_models_uri

        uri = start_uri
        while uri:
            if fetch_model(uri, self.tracking_uri).resolve() == Path(folder).resolve():
                return uri
            name, version, _ = parse_models_uri(uri)
            uri = self.client.get_model_version(name, version).tags.get(DEPENDS_ON_TAG)
        return None

    def registered_bytes(self, name: str) -> int:
        """What the versions of ``name`` that still have artifacts hold, from their tags (works for any store)."""
        versions = self.client.search_model_versions(f"name='{name}'")
        return sum(int(v.tags.get(BYTES_TAG, 0)) for v in versions if v.tags.get(PRUNED_TAG) != "true")

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
