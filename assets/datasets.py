"""Training datasets built from every accepted batch whose validation gate passed."""


import json

import dagster as dg
import pandas as pd

from alignment_pipelines.data.splits import (deduplicate_pairs, read_records, split_by_prompt,
                                             write_records, dataset_version)
from alignment_pipelines.refs import DatasetRef
from assets.ingestion import ACCEPTED_FILE, SUMMARY_FILE, feedback_batches
from resources.storage import StorageResource

# A new validated batch rebuilds the dataset; the dataset itself leaves out any batch whose
# blocking check failed, so its content hash (data version) is unchanged by a rejected batch.
ON_NEW_BATCH = dg.AutomationCondition.eager()
# Models retrain only when an input's data version changed: a rejected batch retrains nothing.
ON_NEW_DATA = dg.AutomationCondition.eager().replace(
    "any_deps_updated", dg.AutomationCondition.any_deps_match(dg.AutomationCondition.data_version_changed()))


class SplitConfig(dg.Config):
    eval_fraction: float = 0.1
    seed: int = 0


@dg.asset(deps=["validated_feedback"], group_name="datasets", kinds={"parquet"},
          automation_condition=ON_NEW_BATCH)
def preference_pairs(context: dg.AssetExecutionContext, config: SplitConfig,
                     storage: StorageResource) -> dg.Output[DatasetRef]:
    """All accepted pairs, deduplicated, split train/eval by prompt hash (no prompt on both sides)."""
    layout = storage.layout
    frames, used, gated = [], [], []
    for key in sorted(context.instance.get_dynamic_partitions(feedback_batches.name)):
        batch_dir = layout.batch_dir(key)
        if not (batch_dir / SUMMARY_FILE).exists():
            continue  # registered but not validated yet
        if not json.loads((batch_dir / SUMMARY_FILE).read_text()).get("suite_success"):
            gated.append(key)  # its blocking check failed: none of its rows may reach a trainer
            continue
        frames.append(read_records(batch_dir / ACCEPTED_FILE))
        used.append(key)
    if not frames:
        raise dg.Failure("no validated feedback batch yet: drop a file in the inbox "
                         f"({layout.inbox}) and let the sensor ingest it",
                         metadata={"batches_blocked_by_checks": gated})
    combined = pd.concat(frames, ignore_index=True)
    pairs = deduplicate_pairs(combined)
    version = dataset_version(pairs)
    train, evaluation = split_by_prompt(pairs, eval_fraction=config.eval_fraction, seed=config.seed)
    target = layout.dataset_dir("preference_pairs", version)
    write_records(train, target / "train.parquet")
    write_records(evaluation, target / "eval.parquet")
    ref = DatasetRef(name="preference_pairs", version=version, train_path=str(target / "train.parquet"),
                     eval_path=str(target / "eval.parquet"), batches=tuple(used),
                     train_rows=len(train), eval_rows=len(evaluation))
    return dg.Output(ref, data_version=dg.DataVersion(version), metadata={
        "dataset_version": version,
        "dagster/row_count": len(pairs),
        "train_rows": len(train),
        "eval_rows": len(evaluation),
        "duplicates_removed": len(combined) - len(pairs),
        "batches": dg.MetadataValue.json(used),
        "batches_blocked_by_checks": dg.MetadataValue.json(gated),
        "path": dg.MetadataValue.path(str(target)),
    })
