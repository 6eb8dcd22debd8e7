"""Evaluation of every policy that exists against the SFT model; it measures, promotion decides."""

import json

import dagster as dg

from alignment_pipelines.assets.training import SFT_ASSET, TRAINING_POOL
from alignment_pipelines.data.records import read_records
from alignment_pipelines.evaluation.compare import PolicyUnderTest, comparison_table, evaluate_policies
from alignment_pipelines.refs import DatasetRef, ModelRef
from alignment_pipelines.resources.judge import JudgeResource
from alignment_pipelines.resources.mlflow import MlflowResource
from alignment_pipelines.resources.storage import StorageResource

# Re-evaluate when any model's data version changed, even while another method has never trained:
# one method that fails does not hold back the evaluation of the others.
ON_ANY_NEW_MODEL = dg.AutomationCondition.eager().without(~dg.AutomationCondition.any_deps_missing()).replace(
    "any_deps_updated", dg.AutomationCondition.any_deps_match(dg.AutomationCondition.data_version_changed()))


class EvaluationConfig(dg.Config):
    max_pairs: int = 64  # held-out pairs scored for preference accuracy
    max_prompts: int = 16  # held-out prompts answered by every model for the win-rate
    max_new_tokens: int = 64
    beta: float = 0.1  # scale of the implicit reward


def latest_model_refs(instance: dg.DagsterInstance, asset_names: list[str]) -> dict[str, ModelRef]:
    """The newest registered model of each training asset that has ever materialized."""
    refs = {}
    for name in asset_names:
        event = instance.get_latest_materialization_event(dg.AssetKey(name))
        entry = event.asset_materialization.metadata.get("model_ref") if event and event.asset_materialization else None
        if entry is not None:
            refs[name] = ModelRef.from_dict(entry.value)
    return refs


def build_evaluation_asset(policy_names: list[str]) -> dg.AssetsDefinition:
    """The evaluation of ``policy_names`` (generated from the registry) against the SFT model."""

    @dg.asset(name="evaluation_report", deps=[SFT_ASSET, *policy_names], group_name="evaluation", kinds={"mlflow"},
              pool=TRAINING_POOL, automation_condition=ON_ANY_NEW_MODEL)
    def evaluation_report(context: dg.AssetExecutionContext, config: EvaluationConfig, preference_pairs: DatasetRef,
                          judge: JudgeResource, storage: StorageResource, mlflow: MlflowResource) -> dg.Output[dict]:
        """Each policy's held-out preference accuracy and win-rate against the SFT model (the configured judge, both
        orders), for whichever policies exist. Logged to each policy's MLflow run; no alias moves here."""
        found = latest_model_refs(context.instance, [SFT_ASSET, *policy_names])
        if SFT_ASSET not in found:
            raise dg.Failure("evaluation_report needs a trained sft_model as its baseline; materialize it first")
        sft = found.pop(SFT_ASSET)
        if not found:
            raise dg.Failure(f"no policy has been trained yet; expected any of {policy_names}")
        missing = sorted(set(policy_names) - set(found))
        pairs = read_records(preference_pairs.eval_path).head(config.max_pairs)
        the_judge = judge.build()
        results = evaluate_policies(
            [PolicyUnderTest(name, ref.path, ref.start_path or sft.path) for name, ref in found.items()],
            sft.path, pairs, the_judge, max_prompts=config.max_prompts, max_new_tokens=config.max_new_tokens,
            beta=config.beta)

        report_dir = storage.layout.training_dir("evaluation_report", context.run_id)
        report_dir.mkdir(parents=True, exist_ok=True)
        tracker = mlflow.tracker()
        for result in results:
            ref = found[result.name]
            (report_dir / f"{result.name}.md").write_text(result.report)
            if ref.mlflow_run_id:
                tracker.log_metrics(ref.mlflow_run_id, {f"eval/{k}": v for k, v in result.metrics.items()})
                tracker.client.log_artifact(ref.mlflow_run_id, str(report_dir / f"{result.name}.md"), "evaluation")
        evaluated = {r.name: {"model": found[r.name].to_dict(), "metrics": r.metrics} for r in results}
        (report_dir / "evaluation.json").write_text(json.dumps({"baseline": sft.to_dict(), "policies": evaluated},
                                                               indent=2, default=str))
        summary = (f"{comparison_table(results)}\n\nBaseline: `{SFT_ASSET}` ({sft.uri}); judge: `{the_judge.name}`, "
                   f"each pair judged in both orders; {len(pairs)} held-out pairs, "
                   f"{min(config.max_prompts, len(pairs))} prompts."
                   + (f"\n\nNot evaluated (never trained): {', '.join(missing)}" if missing else ""))
        return dg.Output({"baseline": sft.to_dict(), "policies": evaluated, "path": str(report_dir)}, metadata={
            "comparison": dg.MetadataValue.md(summary),
            "not_evaluated": dg.MetadataValue.json(missing),
            "path": dg.MetadataValue.path(str(report_dir)),
            **{f"report/{r.name}": dg.MetadataValue.md(r.report) for r in results},
            **{f"{r.name}/{k}": float(v) for r in results for k, v in r.metrics.items()
               if isinstance(v, (int, float))},
        })

    return evaluation_report
