"""Training assets, generated from the method registry: one asset per entry of ``METHODS``.

Each asset's launchpad config is generated from the method's config dataclass (same fields, same
defaults, same help text); the paths (start model, data, output, checkpoints, other models) are
wired in from the asset's inputs. Training runs out of process through the launcher resource (a local
subprocess or a Kubernetes pod, one process or several under ``accelerate launch``: docs/scale-out.md), then
the model is registered in MLflow, whose artifact store keeps the only copy: the run folder is staging, removed
once the model is registered. A failed run registers nothing; a model that trained but did not register (the
registry was down through every try of the backoff) stays in its run folder, and the retry registers it without
training again.
"""

import contextlib
import hashlib
import json
import logging
import shutil
from pathlib import Path

import dagster as dg
import pydantic

from alignment_pipelines.assets.datasets import ON_NEW_DATA
from alignment_pipelines.evaluation.plots import markdown_image
from alignment_pipelines.methods import METHODS, ConfigError, MethodSpec
from alignment_pipelines.refs import DatasetRef, ModelRef
from alignment_pipelines.resources.launcher import TrainingLauncher
from alignment_pipelines.resources.mlflow import MlflowResource
from alignment_pipelines.resources.models import BaseModelResource
from alignment_pipelines.resources.storage import StorageResource
from alignment_pipelines.methods.training import METRICS_FILE, TrainResult
from alignment_pipelines.tracking import CardFacts, Lineage, RegisteredVersion, Tracker, registry_unreachable, with_backoff

TRAINING_POOL = "training"  # dagster.yaml limits it to 1: two trainings never share a device
# A killed or crashed training is retried; it resumes from its last checkpoint, and a model that trained but did
# not register is registered as it is (see `train_and_register`).
TRAINING_RETRIES = dg.RetryPolicy(max_retries=2, delay=10)
TRAINED_IN = "mlflow_run.json"  # in the run folder: the MLflow run the model in it is trained in
DATASET_ASSETS = {"pairs": "preference_pairs", "binary": "binary_feedback", "prompts": "prompts"}
SFT_ASSET = "sft_model"


def launchpad_config(spec: MethodSpec) -> type[dg.Config]:
    """The method's tunable fields as a Dagster config class: same names, defaults and descriptions."""
    defaults = spec.config_cls.defaults()
    fields = {f.name: (hint, pydantic.Field(defaults[f.name], description=f.metadata.get("help")))
              for f, hint in spec.config_cls.tunable_fields()}
    name = "".join(part.title() for part in spec.name.split("_")) + "LaunchpadConfig"
    return pydantic.create_model(name, __base__=dg.Config, __doc__=spec.config_cls.__doc__, **fields)


def training_key(values: dict) -> str:
    """Stable across retries (which get a new run id): a hash of what the run trains on and how."""
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_and_register(context: dg.AssetExecutionContext, spec: MethodSpec, tunables: dict, dataset: DatasetRef,
                       start: ModelRef | None, others: dict[str, ModelRef], base_model: BaseModelResource,
                       storage: StorageResource, mlflow: MlflowResource,
                       launcher: TrainingLauncher) -> dg.Output[ModelRef]:
    """Wire the paths in, train through the launcher, then register the model; a failed run registers nothing.

    The run folder and the checkpoints are keyed by what the run trains on and how (``training_key``), not by the
    run: a retry resumes from the checkpoints, and a model that finished training but did not register (the
    registry was down) is registered by the retry as it is, without training again. Both are removed only once
    the model is registered.
    """
    asset_name = context.asset_key.to_user_string()
    start_path = start.path if start else base_model.resolve()
    base_description = start.base_model if start else base_model.describe()
    stores = {f.name: str(storage.layout.ai_feedback) for f, _ in spec.config_cls.field_specs()
              if f.metadata.get("kind") == "store"}  # shared across runs: no pair is judged twice
    values = tunables | stores | {"model": start_path, "data": dataset.train_path, "eval_data": dataset.eval_path,
                         **{name: ref.path for name, ref in others.items()}}
    key = training_key(values)
    run_dir = storage.layout.training_dir(asset_name, key)  # staging: removed once registered
    output_dir = run_dir / "model"
    checkpoint_dir = storage.layout.checkpoints_dir(asset_name) / key
    try:  # this machine's limits apply only where the worker runs here; a pod checks its own
        with _warnings_to(context):  # e.g. use_vllm falling back to HF generate on a machine without vLLM
            config = spec.config_cls.from_dict(values | {
                "output_dir": str(output_dir), "checkpoint_dir": str(checkpoint_dir),
            }).validate(machine=launcher.runs_here())
    except ConfigError as error:  # a retry would fail the same way
        raise dg.Failure(f"{asset_name}: invalid config: {error}", allow_retries=False) from error
    config.adapt_to_data(dataset.stats())
    context.log.info(f"{spec.name} config: {json.dumps(config.to_dict(), default=str)}")
    tracker = mlflow.tracker()
    lineage = Lineage(method=spec.name, base_model=base_description, dataset_version=dataset.version,
                      batches=dataset.batches, dagster_run_id=context.run_id,
                      parent_model=start.uri if start else None,
                      extra={"role": spec.produces, **{f"uses.{n}": ref.uri or ref.path for n, ref in others.items()},
                             **config.lineage_tags()})
    trained = trained_earlier(run_dir, tracker)
    run_id = trained[1] if trained else _new_training_run(tracker, run_dir, f"{asset_name}-{context.run_id[:8]}",
                                                          lineage)
    try:
        tracker.log_dataset(run_id, dataset)  # the run's dataset input: version, batches, row counts
        if trained:
            result = trained[0]
            context.log.info(f"{asset_name}: {output_dir} finished training in an earlier try (MLflow run {run_id}) "
                             "but was not registered; registering it without training again")
        else:
            tracker.log_params(run_id, config.to_dict() | {"method": spec.name})
            result = launcher.launch(context, spec.name, config, tracker, run_id, data_root=storage.layout.root)
        metadata = {  # built before registering: registration is the last step that can fail
            "mlflow_run_id": run_id,
            "dataset_version": dataset.version,
            "metrics": dg.MetadataValue.md(_metrics_table(result.metrics)),
            "training_curve": dg.MetadataValue.md(_history_table(result.history)),
            "memory": dg.MetadataValue.json({k: result.metrics.get(k) for k in ("memory_estimate_gb", "peak_memory_gb", "peak_rss_gb", "tokens_per_second")}),
            **{name: dg.MetadataValue.md(markdown_image((output_dir / file).read_bytes(), name))
               for name, file in result.artifacts.items() if file.endswith(".png")},
            **{f"train/{k}": float(v) for k, v in result.metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)},
        }

        card_facts = CardFacts(rows={"train": dataset.train_rows, "eval": dataset.eval_rows},
                               config=config.to_dict())

        def register() -> tuple[RegisteredVersion, int]:  # safe to repeat: a version an earlier try made is finished
            registered = tracker.register_model(run_id, output_dir, asset_name, lineage,
                                                start_uri=start.uri if start else None, card_facts=card_facts)
            tracker.end_run(run_id, succeeded=True)
            return registered, tracker.registered_bytes(asset_name)

        registered, asset_bytes = with_backoff(register, f"registering {asset_name}", context.log.warning)
    except BaseException:
        _give_up(context, tracker, run_id, run_dir)
        raise
    shutil.rmtree(run_dir, ignore_errors=True)  # registered: the registry holds the only copy now
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    metadata |= {"model_path": dg.MetadataValue.path(registered.path), "storage/format": registered.format,
                 "storage/version_bytes": dg.MetadataValue.int(registered.bytes),
                 "storage/asset_bytes": dg.MetadataValue.int(asset_bytes)}
    ref = ModelRef(path=registered.path, method=spec.name, role=spec.produces, base_model=base_description,
                   start_path=start_path, dataset_version=dataset.version, registered_name=registered.name,
                   registered_version=registered.version, mlflow_run_id=run_id, metrics=result.metrics)
    return dg.Output(ref, metadata={"model_uri": ref.uri, "registered_version": registered.version,
                                    "alias": registered.alias, "model_ref": dg.MetadataValue.json(ref.to_dict()),
                                    **metadata})


def trained_earlier(run_dir: Path, tracker: Tracker) -> tuple[TrainResult, str] | None:
    """The result and MLflow run of a model an earlier try finished training in ``run_dir``, or None. A model
    whose run this registry does not know (the tracking URI changed) gets a new run holding its final metrics."""
    finished = run_dir / "model" / METRICS_FILE  # written into the model before it is renamed into place
    if not finished.is_file():
        return None
    result = TrainResult.from_json(finished.read_text())
    run_id = _recorded_run(run_dir, tracker)
    if run_id is None:
        run_id = tracker.start_run(f"{run_dir.parent.name}-{run_dir.name}")
        tracker.log_metrics(run_id, result.metrics)
    return result, run_id


def _recorded_run(run_dir: Path, tracker: Tracker) -> str | None:
    """The MLflow run recorded in ``run_dir``, if this registry has it."""
    record = run_dir / TRAINED_IN
    if not record.is_file():
        return None
    run_id = json.loads(record.read_text())["mlflow_run_id"]
    try:
        tracker.client.get_run(run_id)
    except Exception as error:
        if registry_unreachable(error):
            raise
        return None
    return run_id


def _new_training_run(tracker: Tracker, run_dir: Path, name: str, lineage: Lineage) -> str:
    """A fresh run folder (whatever a killed try left in it is unfinished) recording a new MLflow run."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_id = tracker.start_run(name, tags=lineage.tags())
    run_dir.mkdir(parents=True)
    (run_dir / TRAINED_IN).write_text(json.dumps({"mlflow_run_id": run_id}))
    return run_id


def _give_up(context: dg.AssetExecutionContext, tracker: Tracker, run_id: str, run_dir: Path) -> None:
    """After a failure: mark the MLflow run failed (if the registry answers) and keep the run folder only when it
    holds a finished model, for the retry to register."""
    if (run_dir / "model" / METRICS_FILE).is_file():
        context.log.warning(f"keeping {run_dir / 'model'}: it finished training; a retry registers it as it is")
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
    try:
        tracker.end_run(run_id, succeeded=False)
    except Exception as error:
        context.log.warning(f"could not mark MLflow run {run_id} failed: {error}")


@contextlib.contextmanager
def _warnings_to(context: dg.AssetExecutionContext):
    """Warnings of the ``alignment_pipelines`` loggers, in the run's log while the block runs."""

    class ToRunLog(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            context.log.warning(self.format(record))

    handler, logger = ToRunLog(level=logging.WARNING), logging.getLogger("alignment_pipelines")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def build_training_asset(spec: MethodSpec) -> dg.AssetsDefinition:
    """The asset for one registry entry: inputs from what it trains on, starts from and needs."""
    ins = {"dataset": dg.AssetIn(DATASET_ASSETS[spec.data])}
    if spec.starts_from == "sft":
        ins["start_model"] = dg.AssetIn(SFT_ASSET)
    ins.update({need: dg.AssetIn(need) for need in spec.needs})
    config_class = launchpad_config(spec)

    @dg.asset(name=spec.asset, ins=ins, description=spec.description, group_name="training",
              kinds={"pytorch", "mlflow"}, pool=TRAINING_POOL, retry_policy=TRAINING_RETRIES,
              automation_condition=ON_NEW_DATA, tags={"method": spec.name, "role": spec.produces})
    def training_asset(context: dg.AssetExecutionContext, config: config_class, base_model: BaseModelResource,
                       storage: StorageResource, mlflow: MlflowResource, launcher: TrainingLauncher,
                       **inputs) -> dg.Output[ModelRef]:
        dataset, start = inputs.pop("dataset"), inputs.pop("start_model", None)
        return train_and_register(context, spec, config.model_dump(), dataset, start, inputs, base_model, storage,
                                  mlflow, launcher)

    return training_asset


def build_training_assets() -> list[dg.AssetsDefinition]:
    """One asset per method registered now."""
    return [build_training_asset(spec) for spec in METHODS.values()]


def policy_asset_names() -> list[str]:
    """The aligned policies the evaluation compares (the SFT model is its baseline, the reward model a tool)."""
    return [spec.asset for spec in METHODS.values() if spec.produces == "policy" and spec.asset != SFT_ASSET]


def _metrics_table(metrics: dict) -> str:
    rows = "".join(f"| {k} | {v:.4g} |\n" for k, v in sorted(metrics.items()) if isinstance(v, (int, float)))
    return "| metric | value |\n|---|---|\n" + rows


def _history_table(history: list[dict], limit: int = 20) -> str:
    """Every n-th logged step, so a long run still fits on the asset page."""
    steps = [h for h in history if "loss" in h]
    if not steps:
        return "No training steps logged."
    stride = max(1, len(steps) // limit)
    keys = [k for k in ("loss", "rewards/margins", "rewards/accuracies", "reward", "kl", "objective/scores",
                        "objective/kl", "accuracy", "margin", "learning_rate")
            if any(k in h for h in steps)]  # KTO leaves a reward out on a step whose batch lacks a label
    lines = ["| step | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for h in steps[::stride]:
        cells = (f"{h[k]:.4g}" if isinstance(h.get(k), (int, float)) else "" for k in keys)
        lines.append(f"| {h.get('step')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
