"""Promotion: after each evaluation, and on demand, the gate picks at most one champion for the project.

``model_promotion`` runs the gate on the evaluation's report and moves `champion` on `aligned_policy`.
The ``promote`` job re-runs it from the UI on the newest stored report; the ``rollback`` job gives
`champion` back to the version that held it before. Each move records who, why and the evidence.

All three are in the ``promotion`` pool (one step at a time: dagster.yaml's default pool limit is 1), and each
takes the registry's lock (``alignment_pipelines.promotion.registry_lock``) that the command line takes too, so
no two moves of `champion` interleave.
"""

from dataclasses import asdict, fields

import dagster as dg
import pydantic

from alignment_pipelines.evaluation.schema import EvaluationReport, ReportSchemaError
from alignment_pipelines.promotion import GateConfig, PromotionRefused, promote_from_report, rollback_champion
from alignment_pipelines.resources.mlflow import MlflowResource

PROMOTION_POOL = "promotion"  # one move of `champion` at a time (dagster.yaml: every pool's limit is 1)
ACTOR_HELP = "Who is promoting, recorded on the version (default: this Dagster run)."

PromotionConfig = pydantic.create_model(
    "PromotionConfig", __base__=dg.Config, __doc__=GateConfig.__doc__,
    actor=(str, pydantic.Field("", description=ACTOR_HELP)),
    readmit_rolled_back=(bool, pydantic.Field(False, description="Let the gate pick a model that was rolled back "
                                                                 "(refused otherwise, so a rollback sticks).")),
    seat_baseline=(bool, pydantic.Field(True, description="While there is no champion and no candidate beats the "
                                                          "baseline (SFT), seat the baseline as the incumbent champion "
                                                          "if it passes the absolute checks.")),
    **{f.name: (float, pydantic.Field(f.default, description=f.metadata["help"])) for f in fields(GateConfig)})


class RollbackConfig(dg.Config):
    actor: str = pydantic.Field("", description=ACTOR_HELP.replace("promoting", "rolling back"))
    reason: str = pydantic.Field("manual rollback", description="Why, recorded on the demoted version.")


def _actor(context, actor: str) -> str:
    return actor or f"dagster run {context.run_id}"


@dg.asset(group_name="evaluation", kinds={"mlflow"}, automation_condition=dg.AutomationCondition.eager(),
          pool=PROMOTION_POOL)
def model_promotion(context: dg.AssetExecutionContext, config: PromotionConfig, evaluation_report: dict,
                    mlflow: MlflowResource) -> dg.MaterializeResult:
    """The gate (challenger against champion) over every evaluated candidate: at most one becomes `champion` of
    `aligned_policy`; every candidate's version gets the verdict as tags. A failed evaluation never gets here; a
    report of another schema version, or one missing a field, fails before anything moves (not retried: the same
    report would fail again)."""
    gate = GateConfig(**{f.name: getattr(config, f.name) for f in fields(GateConfig)})
    # A report this code cannot read, one measured against another champion, or a move that raced another one: the
    # same run would fail the same way, so it is not retried (re-evaluate instead).
    try:
        report = EvaluationReport.from_dict(evaluation_report, source="evaluation_report")
        outcome = promote_from_report(mlflow.tracker().client, report, _actor(context, config.actor), gate,
                                      readmit_rolled_back=config.readmit_rolled_back, seat_baseline=config.seat_baseline)
    except (ReportSchemaError, PromotionRefused) as error:
        raise dg.Failure(str(error), allow_retries=False) from error
    context.log.info(outcome["action"])
    champion = outcome["champion"]
    return dg.MaterializeResult(metadata={
        "action": outcome["action"],
        "verdicts": dg.MetadataValue.json(outcome["verdicts"]),
        "champion": dg.MetadataValue.json(champion),
        "champion_source_uri": champion["source_uri"] if champion else "none",
        "gate": dg.MetadataValue.json(asdict(gate)),
        "evidence_mlflow_run_id": report.evidence.mlflow_run_id,
        "judge": report.judge.id,
        "judge_heuristic": report.judge.heuristic,
    })


promote_job = dg.define_asset_job(
    "promote", selection=dg.AssetSelection.assets(model_promotion),
    description="Run the promotion gate on the newest evaluation report; its config sets the gate and the actor.")


@dg.op(description="Give `champion` of aligned_policy back to the version that held it before the current one.",
       pool=PROMOTION_POOL)
def restore_previous_champion(context: dg.OpExecutionContext, config: RollbackConfig, mlflow: MlflowResource) -> dict:
    moved = rollback_champion(mlflow.tracker().client, _actor(context, config.actor), config.reason)
    context.log.info(f"champion: version {moved['demoted']['version']} -> {moved['restored']['version']}")
    return moved


@dg.job(name="rollback", description="Restore the previous champion (who and why are recorded on the demoted one).")
def rollback_job():
    restore_previous_champion()
