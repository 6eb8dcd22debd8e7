"""Evaluation of the aligned policy against the SFT model; promotion by MLflow alias."""


import dagster as dg

from alignment_pipelines.data.splits import read_records
from alignment_pipelines.evaluation.metrics import (generate_answers, length_stats, preference_accuracy,
                                                    win_rate)
from alignment_pipelines.evaluation.report import build_report
from alignment_pipelines.judges.rule import RuleJudge
from alignment_pipelines.refs import DatasetRef, ModelRef
from alignment_pipelines.tracking import CHAMPION_ALIAS
from assets.datasets import ON_NEW_DATA
from resources.mlflow import MlflowResource
from resources.storage import StorageResource


class EvaluationConfig(dg.Config):
    max_pairs: int = 64  # held-out pairs scored for preference accuracy
    max_prompts: int = 16  # held-out prompts answered by both models for the win-rate
    max_new_tokens: int = 64
    beta: float = 0.1
    min_win_rate: float = 0.5  # gate for the `champion` alias
    min_preference_accuracy: float = 0.5
    promote: bool = True  # set `champion` on the policy version when the gate passes


@dg.asset(group_name="evaluation", kinds={"mlflow"}, pool="training", automation_condition=ON_NEW_DATA)
def evaluation_report(context: dg.AssetExecutionContext, config: EvaluationConfig, policy_dpo: ModelRef,
                      sft_model: ModelRef, preference_pairs: DatasetRef, storage: StorageResource,
                      mlflow: MlflowResource) -> dg.MaterializeResult:
    """Held-out preference accuracy and win-rate (rule judge, both orders) of the policy vs. SFT."""
    pairs = read_records(preference_pairs.eval_path).head(config.max_pairs)
    accuracy = preference_accuracy(policy_dpo.path, sft_model.path, pairs, beta=config.beta)
    prompts = list(pairs["prompt"].head(config.max_prompts))
    policy_answers = generate_answers(policy_dpo.path, prompts, max_new_tokens=config.max_new_tokens)
    sft_answers = generate_answers(sft_model.path, prompts, max_new_tokens=config.max_new_tokens)
    judge = RuleJudge()
    wins = win_rate(policy_answers, sft_answers, prompts, judge)
    metrics = {
        **accuracy,
        **wins,
        **{f"policy_{k}": v for k, v in length_stats(policy_answers).items()},
        **{f"sft_{k}": v for k, v in length_stats(sft_answers).items()},
    }
    examples = [{"prompt": p[-1]["content"], "policy": a, "baseline": b}
                for p, a, b in zip(prompts[:3], policy_answers, sft_answers)]
    report = build_report(metrics, examples)
    passed = (wins["win_rate"] >= config.min_win_rate
              and accuracy["preference_accuracy"] >= config.min_preference_accuracy)

    report_dir = storage.layout.training_dir("evaluation_report", context.run_id)
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "report.md").write_text(report)
    tracker = mlflow.tracker()
    if policy_dpo.mlflow_run_id:
        tracker.log_metrics(policy_dpo.mlflow_run_id, {f"eval/{k}": v for k, v in metrics.items()})
        tracker.client.log_artifact(policy_dpo.mlflow_run_id, str(report_dir / "report.md"), "evaluation")
    promoted = False
    if policy_dpo.registered_name and policy_dpo.registered_version:
        tracker.client.set_model_version_tag(policy_dpo.registered_name, policy_dpo.registered_version,
                                             "evaluation.gate", "passed" if passed else "failed")
        if passed and config.promote:
            tracker.set_alias(policy_dpo.registered_name, policy_dpo.registered_version, CHAMPION_ALIAS)
            promoted = True
    return dg.MaterializeResult(metadata={
        "report": dg.MetadataValue.md(report),
        "gate_passed": passed,
        "promoted_to_champion": promoted,
        "judge": judge.name,
        "policy_model_uri": policy_dpo.uri,
        **{k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
    })
