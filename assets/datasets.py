"""Training datasets built from the accepted rows of every batch whose blocking check passed."""

import dagster as dg
import pandas as pd

from alignment_pipelines.assets.ingestion import ACCEPTED_FILE, gate_verdicts
from alignment_pipelines.data.records import read_records, write_records
from alignment_pipelines.data.schemas import kind_of
from alignment_pipelines.data.splits import (binary_from_pairs, dataset_version, deduplicate, kto_balance,
                                             prompts_from, split_by_prompt)
from alignment_pipelines.layout import DataRoot
from alignment_pipelines.refs import DatasetRef
from alignment_pipelines.resources.storage import StorageResource

# A new validated batch rebuilds the datasets; they take only batches whose blocking check passed,
# so their content hash (data version) is unchanged by a rejected batch.
ON_NEW_BATCH = dg.AutomationCondition.eager()
# Models retrain only when an input's data version changed: a rejected batch retrains nothing.
ON_NEW_DATA = dg.AutomationCondition.eager().replace(
    "any_deps_updated", dg.AutomationCondition.any_deps_match(dg.AutomationCondition.data_version_changed()))


class SplitConfig(dg.Config):
    eval_fraction: float = 0.1
    seed: int = 0


class AcceptedBatches:
    """The accepted rows of every batch whose blocking check passed (its verdict as recorded in the
    instance, see `gate_verdicts`), by kind, in registration order. Batches whose check failed are
    `gated`; batches without a verdict on their current rows yet are `pending`."""

    def __init__(self, instance: dg.DagsterInstance, layout: DataRoot):
        self.frames: dict[str, list[pd.DataFrame]] = {"pairwise": [], "binary": [], "prompts": []}
        self.used: dict[str, list[str]] = {"pairwise": [], "binary": [], "prompts": []}
        self.gated: list[str] = []
        self.pending: list[str] = []
        for key, passed in gate_verdicts(instance).items():
            if not passed:
                (self.pending if passed is None else self.gated).append(key)
                continue
            accepted = layout.batch_dir(key) / ACCEPTED_FILE
            if not accepted.exists():
                raise dg.Failure(f"batch {key} passed its check but its accepted rows are missing ({accepted}); "
                                 "materialize validated_feedback for it again")
            rows = read_records(accepted)
            kind = kind_of(rows)
            self.frames[kind].append(rows)
            self.used[kind].append(key)

    def rows(self, kind: str) -> pd.DataFrame | None:
        return pd.concat(self.frames[kind], ignore_index=True) if self.frames[kind] else None


def publish(name: str, kind: str, rows: pd.DataFrame | None, batches: list[str], accepted: AcceptedBatches,
            config: SplitConfig, layout: DataRoot, extra_metadata: dict | None = None,
            balance: dict | None = None) -> dg.Output[DatasetRef]:
    """Deduplicate, version by content hash, split by prompt, write train/eval Parquet."""
    gate = {"batches_blocked_by_checks": dg.MetadataValue.json(accepted.gated),
            "batches_awaiting_checks": dg.MetadataValue.json(accepted.pending)}
    if rows is None or rows.empty:
        raise dg.Failure(f"{name}: no accepted feedback of a usable kind yet; drop a file in the inbox "
                         f"({layout.inbox})", metadata=gate)
    unique = deduplicate(rows, kind)
    version = dataset_version(unique)
    train, evaluation = split_by_prompt(unique, eval_fraction=config.eval_fraction, seed=config.seed)
    target = layout.dataset_dir(name, version)
    write_records(train, target / "train.parquet")
    write_records(evaluation, target / "eval.parquet")
    ref = DatasetRef(name=name, version=version, train_path=str(target / "train.parquet"),
                     eval_path=str(target / "eval.parquet"), batches=tuple(batches),
                     train_rows=len(train), eval_rows=len(evaluation), balance=balance)
    return dg.Output(ref, data_version=dg.DataVersion(version), metadata={
        "dataset_version": version,
        "dagster/row_count": len(unique),
        "train_rows": len(train),
        "eval_rows": len(evaluation),
        "duplicates_removed": len(rows) - len(unique),
        "batches": dg.MetadataValue.json(list(batches)),
        **gate,
        "path": dg.MetadataValue.path(str(target)),
        **(extra_metadata or {}),
    })


@dg.asset(deps=["validated_feedback"], group_name="datasets", kinds={"parquet"},
          automation_condition=ON_NEW_BATCH)
def preference_pairs(context: dg.AssetExecutionContext, config: SplitConfig,
                     storage: StorageResource) -> dg.Output[DatasetRef]:
    """All accepted (prompt, chosen, rejected) pairs, deduplicated, split train/eval by prompt hash."""
    batches = AcceptedBatches(context.instance, storage.layout)
    return publish("preference_pairs", "pairwise", batches.rows("pairwise"), batches.used["pairwise"],
                   batches, config, storage.layout)


@dg.asset(deps=["validated_feedback"], group_name="datasets", kinds={"parquet"},
          automation_condition=ON_NEW_BATCH)
def binary_feedback(context: dg.AssetExecutionContext, config: SplitConfig,
                    storage: StorageResource) -> dg.Output[DatasetRef]:
    """Thumbs up/down (prompt, completion, label): binary batches plus every pair as one desirable
    and one undesirable row. Its metadata has the KTO balance report and class weights."""
    batches = AcceptedBatches(context.instance, storage.layout)
    parts = [frame for frame in (batches.rows("binary"),) if frame is not None]
    pairs = batches.rows("pairwise")
    if pairs is not None:
        parts.append(binary_from_pairs(pairs))
    rows = pd.concat(parts, ignore_index=True) if parts else None
    balance = kto_balance(deduplicate(rows, "binary")) if rows is not None else None
    report = None
    if balance:
        report = ("| desirable | undesirable | ratio | desirable_weight | undesirable_weight |\n|---|---|---|---|---|\n"
                  f"| {balance['desirable']} | {balance['undesirable']} | {balance['ratio']} | "
                  f"{balance['desirable_weight']:.3f} | {balance['undesirable_weight']:.3f} |")
    return publish("binary_feedback", "binary", rows, batches.used["binary"] + batches.used["pairwise"],
                   batches, config, storage.layout, balance=balance,
                   extra_metadata={"kto_balance": dg.MetadataValue.md(report or "no rows"),
                                   "class_weights": dg.MetadataValue.json(balance or {})})


@dg.asset(deps=["validated_feedback"], group_name="datasets", kinds={"parquet"},
          automation_condition=ON_NEW_BATCH)
def prompts(context: dg.AssetExecutionContext, config: SplitConfig,
            storage: StorageResource) -> dg.Output[DatasetRef]:
    """Every distinct prompt from prompt-only batches, pairs and binary feedback: what the online
    methods sample answers for."""
    batches = AcceptedBatches(context.instance, storage.layout)
    derived = prompts_from(batches.rows("pairwise"), batches.rows("binary"))
    parts = [frame for frame in (batches.rows("prompts"), derived) if frame is not None and not frame.empty]
    rows = pd.concat(parts, ignore_index=True) if parts else None
    return publish("prompts", "prompts", rows, sum(batches.used.values(), []), batches, config,
                   storage.layout)
