"""Training datasets built from the accepted rows of every batch whose blocking check passed.

Each dataset is one SQL query over the batches' Parquet files (`data/datasets/sql.py`, DuckDB): the
deduplication by content key, the split by prompt hash and the content-hash version happen in the engine,
in bounded memory; a version that already exists is not written again.

The split is three-way by prompt hash: train (what the training assets learn from), judge (what only
`evaluation_reward_model` learns from, beside train as judge.parquet) and eval (what every model is measured on).
All three datasets split with the same settings, so a prompt is on the same side in each."""

import json

import dagster as dg

from alignment_pipelines.assets.ingestion import ACCEPTED_FILE, SUMMARY_FILE, gate_verdicts
from alignment_pipelines.data.datasets.sql import BatchFiles, build_dataset
from alignment_pipelines.data.datasets.splits import DEFAULT_JUDGE_FRACTION
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
    eval_fraction: float = 0.1  # held out: every model is measured on these prompts
    judge_fraction: float = DEFAULT_JUDGE_FRACTION  # carved out of train: only the evaluation's reward model sees it
    seed: int = 0


class AcceptedBatches:
    """The batches whose blocking check passed (its verdict as recorded in the instance, see
    `gate_verdicts`), by kind, in registration order. Batches whose check failed are `gated`; batches
    without a verdict on their current rows yet are `pending`. No row is read here: the kind comes from
    the batch's summary, the rows are read by the dataset query."""

    def __init__(self, instance: dg.DagsterInstance, layout: DataRoot):
        self.files: list[BatchFiles] = []
        self.used: dict[str, list[str]] = {"pairwise": [], "binary": [], "prompts": []}
        self.gated: list[str] = []
        self.pending: list[str] = []
        for key, passed in gate_verdicts(instance).items():
            if not passed:
                (self.pending if passed is None else self.gated).append(key)
                continue
            batch_dir = layout.batch_dir(key)
            accepted = batch_dir / ACCEPTED_FILE
            if not accepted.exists():
                raise dg.Failure(f"batch {key} passed its check but its accepted rows are missing ({accepted}); "
                                 "materialize validated_feedback for it again")
            kind = json.loads((batch_dir / SUMMARY_FILE).read_text())["kind"]
            self.files.append(BatchFiles(key, kind, batch_dir))
            self.used[kind].append(key)


def publish(name: str, dataset: str, batches: list[str], accepted: AcceptedBatches, config: SplitConfig,
            layout: DataRoot, extra_metadata=None) -> dg.Output[DatasetRef]:
    """Deduplicate, version by content hash, split by prompt, write train/eval Parquet: one SQL query over
    the batches' Parquet files (`datasets.sql.build_dataset`); an unchanged version is not rewritten."""
    gate = {"batches_blocked_by_checks": dg.MetadataValue.json(accepted.gated),
            "batches_awaiting_checks": dg.MetadataValue.json(accepted.pending)}
    build = build_dataset(name, dataset, accepted.files, layout.datasets / name,
                          eval_fraction=config.eval_fraction, judge_fraction=config.judge_fraction, seed=config.seed)
    if build is None:
        raise dg.Failure(f"{name}: no accepted feedback of a usable kind yet; drop a file in the inbox "
                         f"({layout.inbox})", metadata=gate)
    ref = DatasetRef(name=name, version=build.version, train_path=str(build.train_path),
                     eval_path=str(build.eval_path), batches=tuple(batches),
                     train_rows=build.train_rows, eval_rows=build.eval_rows, balance=build.balance)
    extra = extra_metadata(build) if extra_metadata else {}
    return dg.Output(ref, data_version=dg.DataVersion(build.version), metadata={
        "dataset_version": build.version,
        "dagster/row_count": build.rows,
        "train_rows": build.train_rows,
        "eval_rows": build.eval_rows,
        "judge_rows": build.judge_rows,
        "judge_path": dg.MetadataValue.path(str(build.judge_path)),
        "duplicates_removed": build.input_rows - build.rows,
        "rewritten": build.rewritten,
        "build_seconds": dg.MetadataValue.json({k: round(v, 3) for k, v in build.timings.items()}),
        "batches": dg.MetadataValue.json(list(batches)),
        **gate,
        "path": dg.MetadataValue.path(str(build.train_path.parent)),
        **extra,
    })


@dg.asset(deps=["validated_feedback"], group_name="datasets", kinds={"parquet"},
          automation_condition=ON_NEW_BATCH)
def preference_pairs(context: dg.AssetExecutionContext, config: SplitConfig,
                     storage: StorageResource) -> dg.Output[DatasetRef]:
    """All accepted (prompt, chosen, rejected) pairs, deduplicated, split train/judge/eval by prompt hash."""
    batches = AcceptedBatches(context.instance, storage.layout)
    return publish("preference_pairs", "pairwise", batches.used["pairwise"], batches, config, storage.layout)


@dg.asset(deps=["validated_feedback"], group_name="datasets", kinds={"parquet"},
          automation_condition=ON_NEW_BATCH)
def binary_feedback(context: dg.AssetExecutionContext, config: SplitConfig,
                    storage: StorageResource) -> dg.Output[DatasetRef]:
    """Thumbs up/down (prompt, completion, label): binary batches plus every pair as one desirable
    and one undesirable row. Its metadata has the KTO balance report and class weights."""
    batches = AcceptedBatches(context.instance, storage.layout)

    def kto_metadata(build) -> dict:
        balance = build.balance
        report = ("| desirable | undesirable | ratio | desirable_weight | undesirable_weight |\n|---|---|---|---|---|\n"
                  f"| {balance['desirable']} | {balance['undesirable']} | {balance['ratio']} | "
                  f"{balance['desirable_weight']:.3f} | {balance['undesirable_weight']:.3f} |") if balance else None
        return {"kto_balance": dg.MetadataValue.md(report or "no rows"),
                "class_weights": dg.MetadataValue.json(balance or {})}

    return publish("binary_feedback", "binary", batches.used["binary"] + batches.used["pairwise"], batches, config,
                   storage.layout, extra_metadata=kto_metadata)


@dg.asset(deps=["validated_feedback"], group_name="datasets", kinds={"parquet"},
          automation_condition=ON_NEW_BATCH)
def prompts(context: dg.AssetExecutionContext, config: SplitConfig,
            storage: StorageResource) -> dg.Output[DatasetRef]:
    """Every distinct prompt from prompt-only batches, pairs and binary feedback: what the online
    methods sample answers for."""
    batches = AcceptedBatches(context.instance, storage.layout)
    return publish("prompts", "prompts", sum(batches.used.values(), []), batches, config, storage.layout)
