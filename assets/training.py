"""Training assets: one per method, each a thin call into `alignment_pipelines.methods`."""


import hashlib
import json
from pathlib import Path

import dagster as dg

from alignment_pipelines.methods import config_from_dict
from alignment_pipelines.refs import DatasetRef, ModelRef
from alignment_pipelines.tracking import Lineage
from assets.datasets import ON_NEW_DATA
from resources.launcher import TrainingLauncher
from resources.mlflow import MlflowResource
from resources.models import BaseModelResource
from resources.storage import StorageResource

TRAINING_POOL = "training"  # dagster.yaml limits it to 1: two trainings never share a device
# A killed or crashed training is retried; it resumes from its last checkpoint (see `checkpoint_dir_for`).
TRAINING_RETRIES = dg.RetryPolicy(max_retries=2, delay=10)


class TrainingAssetConfig(dg.Config):
    """Knobs a user can set from the launchpad; the rest of the method's config keeps its defaults."""

    max_steps: int = 30
    learning_rate: float = 2e-4
    per_device_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_length: int = 512
    lora: bool = True
    seed: int = 0
    save_steps: int = 10  # checkpoint interval; a retried run resumes from the last one


class KTOAssetConfig(TrainingAssetConfig):
    learning_rate: float = 5e-5
    beta: float = 0.1
    # None: the class weights from binary_feedback's balance report, which bring it to 50/50.
    desirable_weight: float | None = None
    undesirable_weight: float | None = None


class ORPOAssetConfig(TrainingAssetConfig):
    learning_rate: float = 1e-4
    beta: float = 0.1  # λ, the weight of the odds-ratio term


class DPOAssetConfig(TrainingAssetConfig):
    learning_rate: float = 5e-5
    beta: float = 0.1


def train_and_register(context: dg.AssetExecutionContext, *, method: str, asset_config: dg.Config,
                       start_from: str, start_description: str, dataset: DatasetRef,
                       storage: StorageResource, mlflow: MlflowResource, launcher: TrainingLauncher,
                       parent_uri: str | None = None, overrides: dict | None = None) -> dg.Output[ModelRef]:
    """Train through the launcher, then register the model; a failed run registers nothing."""
    asset_name = context.asset_key.to_user_string()
    output_dir = storage.layout.training_dir(asset_name, context.run_id) / "model"
    values = asset_config.model_dump() | (overrides or {}) | {
        "model": start_from, "data": dataset.train_path, "eval_data": dataset.eval_path}
    config = config_from_dict(method, values | {
        "output_dir": str(output_dir),
        "checkpoint_dir": str(checkpoint_dir_for(storage, asset_name, values)),
    })
    tracker = mlflow.tracker()
    lineage = Lineage(method=method, base_model=start_description, dataset_version=dataset.version,
                      batches=dataset.batches, dagster_run_id=context.run_id, parent_model=parent_uri)
    run_id = tracker.start_run(f"{asset_name}-{context.run_id[:8]}", tags=lineage.tags())
    try:
        tracker.log_params(run_id, config.to_dict() | {"method": method})
        result = launcher.launch(context, method, config, tracker, run_id)
        metadata = {  # built before registering: registration is the last step that can fail
            "mlflow_run_id": run_id,
            "dataset_version": dataset.version,
            "path": dg.MetadataValue.path(str(output_dir)),
            "metrics": dg.MetadataValue.md(_metrics_table(result.metrics)),
            "training_curve": dg.MetadataValue.md(_history_table(result.history)),
            **{f"train/{k}": float(v) for k, v in result.metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)},
        }
        registered = tracker.register_model(run_id, output_dir, asset_name, lineage)
    except BaseException:
        tracker.end_run(run_id, succeeded=False)
        raise
    tracker.end_run(run_id, succeeded=True)
    ref = ModelRef(path=str(output_dir), method=method, base_model=start_description, start_path=start_from,
                   dataset_version=dataset.version, registered_name=registered.name,
                   registered_version=registered.version, mlflow_run_id=run_id, metrics=result.metrics)
    return dg.Output(ref, metadata={"model_uri": ref.uri, "registered_version": registered.version,
                                    "alias": registered.alias, **metadata})


@dg.asset(group_name="training", kinds={"pytorch", "mlflow"}, pool=TRAINING_POOL,
          retry_policy=TRAINING_RETRIES, automation_condition=ON_NEW_DATA)
def sft_model(context: dg.AssetExecutionContext, config: TrainingAssetConfig,
              preference_pairs: DatasetRef, base_model: BaseModelResource, storage: StorageResource,
              mlflow: MlflowResource, launcher: TrainingLauncher) -> dg.Output[ModelRef]:
    """Supervised fine-tuning of the base model on the chosen answers (TRL SFTTrainer)."""
    return train_and_register(context, method="sft", asset_config=config, start_from=base_model.resolve(),
                              start_description=base_model.describe(), dataset=preference_pairs,
                              storage=storage, mlflow=mlflow, launcher=launcher)


@dg.asset(group_name="training", kinds={"pytorch", "mlflow"}, pool=TRAINING_POOL,
          retry_policy=TRAINING_RETRIES, automation_condition=ON_NEW_DATA)
def policy_dpo(context: dg.AssetExecutionContext, config: DPOAssetConfig, sft_model: ModelRef,
               preference_pairs: DatasetRef, storage: StorageResource, mlflow: MlflowResource,
               launcher: TrainingLauncher) -> dg.Output[ModelRef]:
    """Direct Preference Optimization from the SFT model on the offline pairs (TRL DPOTrainer)."""
    return train_and_register(context, method="dpo", asset_config=config, start_from=sft_model.path,
                              start_description=sft_model.base_model, dataset=preference_pairs,
                              storage=storage, mlflow=mlflow, launcher=launcher, parent_uri=sft_model.uri)


@dg.asset(group_name="training", kinds={"pytorch", "mlflow"}, pool=TRAINING_POOL,
          retry_policy=TRAINING_RETRIES, automation_condition=ON_NEW_DATA)
def policy_kto(context: dg.AssetExecutionContext, config: KTOAssetConfig, sft_model: ModelRef,
               binary_feedback: DatasetRef, storage: StorageResource, mlflow: MlflowResource,
               launcher: TrainingLauncher) -> dg.Output[ModelRef]:
    """Kahneman-Tversky Optimization from the SFT model on thumbs up/down feedback (TRL KTOTrainer),
    with class weights that balance desirable and undesirable examples."""
    balance = binary_feedback.balance or {}
    weights = {
        "desirable_weight": config.desirable_weight or balance.get("desirable_weight", 1.0),
        "undesirable_weight": config.undesirable_weight or balance.get("undesirable_weight", 1.0),
    }
    context.log.info(f"KTO class weights {weights} for balance {balance}")
    return train_and_register(context, method="kto", asset_config=config, start_from=sft_model.path,
                              start_description=sft_model.base_model, dataset=binary_feedback,
                              storage=storage, mlflow=mlflow, launcher=launcher, parent_uri=sft_model.uri,
                              overrides=weights)


@dg.asset(group_name="training", kinds={"pytorch", "mlflow"}, pool=TRAINING_POOL,
          retry_policy=TRAINING_RETRIES, automation_condition=ON_NEW_DATA)
def policy_orpo(context: dg.AssetExecutionContext, config: ORPOAssetConfig, preference_pairs: DatasetRef,
                base_model: BaseModelResource, storage: StorageResource, mlflow: MlflowResource,
                launcher: TrainingLauncher) -> dg.Output[ModelRef]:
    """Odds-Ratio Preference Optimization straight from the base model: no SFT step, no reference."""
    return train_and_register(context, method="orpo", asset_config=config, start_from=base_model.resolve(),
                              start_description=base_model.describe(), dataset=preference_pairs,
                              storage=storage, mlflow=mlflow, launcher=launcher)


def checkpoint_dir_for(storage: StorageResource, asset_name: str, values: dict) -> Path:
    """Stable across retries (which get a new run id): keyed by what the run trains on and how."""
    digest = hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return storage.layout.root / "checkpoints" / asset_name / digest


def _metrics_table(metrics: dict) -> str:
    rows = "".join(f"| {k} | {v:.4g} |\n" for k, v in sorted(metrics.items()) if isinstance(v, (int, float)))
    return "| metric | value |\n|---|---|\n" + rows


def _history_table(history: list[dict], limit: int = 20) -> str:
    """Every n-th logged step, so a long run still fits on the asset page."""
    steps = [h for h in history if "loss" in h]
    if not steps:
        return "No training steps logged."
    stride = max(1, len(steps) // limit)
    keys = [k for k in ("loss", "rewards/margins", "rewards/accuracies", "learning_rate")
            if any(k in h for h in steps)]  # KTO leaves a reward out on a step whose batch lacks a label
    lines = ["| step | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for h in steps[::stride]:
        cells = (f"{h[k]:.4g}" if isinstance(h.get(k), (int, float)) else "" for k in keys)
        lines.append(f"| {h.get('step')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
