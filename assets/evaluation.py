"""Evaluation of every aligned policy against the SFT model; promotion by MLflow alias."""

import dagster as dg

from alignment_pipelines.data.splits import read_records
from alignment_pipelines.evaluation.compare import PolicyUnderTest, comparison_table, evaluate_policies
from alignment_pipelines.judges.rule import RuleJudge
from alignment_pipelines.refs import DatasetRef, ModelRef
from alignment_pipelines.tracking import CHAMPION_ALIAS
from assets.datasets import ON_NEW_DATA
from assets.training import TRAINING_POOL
from resources.mlflow import MlflowResource
from resources.storage import StorageResource


class EvaluationConfig(dg.Config):
    max_pairs: int = 64  # held-out pairs scored for preference accuracy
    max_prompts: int = 16  # held-out prompts answered by every model for the win-rate
    max_new_tokens: int = 64
    beta: float = 0.1
    min_win_rate: float = 0.5  # gate for the `champion` alias
    min_preference_accuracy: float = 0.5
    promote: bool = True  # set `champion` on each policy version whose gate passes


@dg.asset(group_name="evaluation", kinds={"mlflow"}, pool=TRAINING_POOL, automation_condition=ON_NEW_DATA)
def evaluation_report(context: dg.AssetExecutionContext, config: EvaluationConfig, sft_model: ModelRef,
                      policy_dpo: ModelRef, policy_kto: ModelRef, policy_orpo: ModelRef,
                      preference_pairs: DatasetRef,
                      storage: StorageResource, mlflow: MlflowResource) -> dg.MaterializeResult:
    """Each policy's held-out preference accuracy and win-rate against the SFT model (rule judge,
    both orders); each policy version whose gate passes gets the `champion` alias."""
    policies = {ref.registered_name or ref.method: ref for ref in (policy_dpo, policy_kto, policy_orpo)}
    pairs = read_records(preference_pairs.eval_path).head(config.max_pairs)
    judge = RuleJudge()
    results = evaluate_policies(
        [PolicyUnderTest(name, ref.path, ref.start_path or sft_model.path) for name, ref in policies.items()],
        sft_model.path, pairs, judge, max_prompts=config.max_prompts, max_new_tokens=config.max_new_tokens,
        beta=config.beta)

    report_dir = storage.layout.training_dir("evaluation_report", context.run_id)
    report_dir.mkdir(parents=True, exist_ok=True)
    tracker = mlflow.tracker()
    gates, promoted = {}, []
    for result in results:
        ref = policies[result.name]
        gates[result.name] = result.passes(config.min_win_rate, config.min_preference_accuracy)
        (report_dir / f"{result.name}.md").write_text(result.report)
        if ref.mlflow_run_id:
            tracker.log_metrics(ref.mlflow_run_id, {f"eval/{k}": v for k, v in result.metrics.items()})
            tracker.client.log_artifact(ref.mlflow_run_id, str(report_dir / f"{result.name}.md"), "evaluation")
        if ref.registered_name and ref.registered_version:
            tracker.client.set_model_version_tag(ref.registered_name, ref.registered_version, "evaluation.gate",
                                                 "passed" if gates[result.name] else "failed")
            if gates[result.name] and config.promote:
                tracker.set_alias(ref.registered_name, ref.registered_version, CHAMPION_ALIAS)
                promoted.append(ref.uri)

    table = comparison_table(results, gates)
    summary = (f"{table}\n\nBaseline: `sft_model` ({sft_model.uri}); judge: `{judge.name}`, each pair judged in "
               f"both orders; {len(pairs)} held-out pairs, {min(config.max_prompts, len(pairs))} prompts.")
    return dg.MaterializeResult(metadata={
        "comparison": dg.MetadataValue.md(summary),
        **{f"report/{r.name}": dg.MetadataValue.md(r.report) for r in results},
        "promoted_to_champion": dg.MetadataValue.json(promoted),
        **{f"{r.name}/{k}": float(v) for r in results for k, v in r.metrics.items()
           if isinstance(v, (int, float))},
    })
