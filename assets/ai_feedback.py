"""The ``ai_feedback`` asset: every judgement the online annotator made, published as a dataset.

Online DPO writes its judgements into the store under the data root while it trains (``ai_feedback/``);
this asset reads the store after each run and publishes it, versioned by content, as the full table of
judgements and, from the verdicts whose two orders agreed, as preference pairs in the pairs format.
Nothing trains on it automatically: no training asset depends on it, and it is kept apart from the human
feedback; an offline method trains on it only when a run is pointed at its pairs.
"""


import dagster as dg

from alignment_pipelines.ai_feedback import AIFeedbackStore, preference_pairs, summary
from alignment_pipelines.data.records import write_records
from alignment_pipelines.data.datasets.splits import dataset_version, split_by_prompt
from alignment_pipelines.refs import DatasetRef
from alignment_pipelines.resources.storage import StorageResource

ONLINE_POLICY_ASSET = "policy_online_dpo"


@dg.asset(deps=[ONLINE_POLICY_ASSET], group_name="ai_feedback", kinds={"parquet"},
          automation_condition=dg.AutomationCondition.eager())
def ai_feedback(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.Output[DatasetRef]:
    """Every annotator judgement (prompt, both answers, both orders' verdicts, judge, instruction, policy
    version), and the agreed ones as preference pairs, for an offline method configured to use them."""
    layout = storage.layout
    judgements = AIFeedbackStore(layout.ai_feedback).read()
    if judgements.empty:
        raise dg.Failure(f"no AI feedback yet in {layout.ai_feedback}: materialize {ONLINE_POLICY_ASSET}")
    version = dataset_version(judgements[["key"]])
    target = layout.dataset_dir("ai_feedback", version)
    target.mkdir(parents=True, exist_ok=True)
    judgements.to_parquet(target / "judgements.parquet", index=False)
    pairs = preference_pairs(judgements)
    train, evaluation = split_by_prompt(pairs[["prompt", "chosen", "rejected"]], eval_fraction=0.1)
    write_records(train, target / "train.parquet")
    write_records(evaluation, target / "eval.parquet")
    stats = summary(judgements)
    context.log.info(f"ai_feedback {version}: {stats}")
    ref = DatasetRef(name="ai_feedback", version=version, train_path=str(target / "train.parquet"),
                     eval_path=str(target / "eval.parquet"), batches=(), train_rows=len(train),
                     eval_rows=len(evaluation))
    return dg.Output(ref, data_version=dg.DataVersion(version), metadata={
        "dataset_version": version,
        "dagster/row_count": stats["judgements"],
        "preference_pairs": len(pairs),
        "ties": stats["ties"],
        "agreement_rate": stats["agreement_rate"],
        "position_bias_rate": stats["position_bias_rate"],
        "instructions": dg.MetadataValue.json(stats["instructions"]),
        "policy_versions": stats["policy_versions"],
        "judgements": dg.MetadataValue.path(str(target / "judgements.parquet")),
    })
