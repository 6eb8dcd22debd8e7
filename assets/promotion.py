"""Promotion: a separate step that reads the evaluation and moves MLflow aliases by a gate."""

import dagster as dg

from alignment_pipelines.refs import ModelRef
from alignment_pipelines.resources.mlflow import MlflowResource
from alignment_pipelines.tracking import CHAMPION_ALIAS


class PromotionConfig(dg.Config):
    min_win_rate: float = 0.5  # against the SFT model
    min_preference_accuracy: float = 0.5
    promote: bool = True  # false: record the gate's verdict, move no alias


@dg.asset(group_name="evaluation", kinds={"mlflow"}, automation_condition=dg.AutomationCondition.eager())
def model_promotion(context: dg.AssetExecutionContext, config: PromotionConfig, evaluation_report: dict,
                    mlflow: MlflowResource) -> dg.MaterializeResult:
    """Each evaluated policy version whose gate passes gets the `champion` alias; every verdict is a version tag."""
    tracker = mlflow.tracker()
    verdicts, promoted = {}, []
    for name, entry in evaluation_report["policies"].items():
        ref, metrics = ModelRef.from_dict(entry["model"]), entry["metrics"]
        passed = (metrics["win_rate"] >= config.min_win_rate
                  and metrics["preference_accuracy"] >= config.min_preference_accuracy)
        verdicts[name] = "passed" if passed else "failed"
        if ref.registered_name and ref.registered_version:
            tracker.client.set_model_version_tag(ref.registered_name, ref.registered_version, "evaluation.gate",
                                                 verdicts[name])
            if passed and config.promote:
                tracker.set_alias(ref.registered_name, ref.registered_version, CHAMPION_ALIAS)
                promoted.append(ref.uri)
    context.log.info(f"gate verdicts: {verdicts}; promoted: {promoted}")
    return dg.MaterializeResult(metadata={"verdicts": dg.MetadataValue.json(verdicts),
                                          "promoted_to_champion": dg.MetadataValue.json(promoted)})
