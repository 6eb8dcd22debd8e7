"""Evaluation of every model that exists, on the same held-out data; it measures, promotion decides."""

import json

import dagster as dg

from alignment_pipelines.assets.training import SFT_ASSET, TRAINING_POOL
from alignment_pipelines.data.records import head_records
from alignment_pipelines.evaluation.compare import CHAMPION, ModelUnderTest, evaluate_models
from alignment_pipelines.evaluation.report import REPORT_FILE, comparison_table, evaluation_plots, render_report
from alignment_pipelines.methods import METHODS
from alignment_pipelines.promotion import current_champion
from alignment_pipelines.refs import DatasetRef, ModelRef
from alignment_pipelines.resources.judge import JudgeResource
from alignment_pipelines.resources.mlflow import MlflowResource
from alignment_pipelines.resources.storage import StorageResource

# Re-evaluate when any model's data version changed, even while another method has never trained:
# one method that fails does not hold back the evaluation of the others.
ON_ANY_NEW_MODEL = dg.AutomationCondition.eager().without(~dg.AutomationCondition.any_deps_missing()).replace(
    "any_deps_updated", dg.AutomationCondition.any_deps_match(dg.AutomationCondition.data_version_changed()))
TRAINING_CURVE_METRIC = "loss"


class EvaluationConfig(dg.Config):
    max_pairs: int = 64  # held-out pairs scored for preference accuracy
    max_prompts: int = 64  # held-out prompts every model answers: fewer widen the intervals the gate reads
    max_new_tokens: int = 64
    beta: float = 0.1  # scale of the implicit reward
    batch_size: int = 8
    judge_by_reward_model: bool = False  # judge the win-rates by the reward model's scores, not the judge resource


def latest_model_refs(instance: dg.DagsterInstance, asset_names: list[str]) -> dict[str, ModelRef]:
    """The newest registered model of each training asset that has ever materialized."""
    refs = {}
    for name in asset_names:
        event = instance.get_latest_materialization_event(dg.AssetKey(name))
        entry = event.asset_materialization.metadata.get("model_ref") if event and event.asset_materialization else None
        if entry is not None:
            refs[name] = ModelRef.from_dict(entry.value)
    return refs


def reward_model_asset_names() -> list[str]:
    """The registry's reward models: when one exists, every answer also gets its score."""
    return [spec.asset for spec in METHODS.values() if spec.produces == "reward"]


def training_history(tracker, run_id: str | None) -> list[dict]:
    """The per-step training loss a model's MLflow run recorded, for the training-curve plot."""
    if not run_id:
        return []
    return [{"step": m.step, TRAINING_CURVE_METRIC: m.value}
            for m in tracker.client.get_metric_history(run_id, TRAINING_CURVE_METRIC)]


def build_evaluation_asset(policy_names: list[str], reward_names: list[str] | None = None) -> dg.AssetsDefinition:
    """The evaluation of the SFT model and ``policy_names`` (generated from the registry), with the reward
    models in ``reward_names`` (default: the registry's) as scorers."""
    reward_names = reward_model_asset_names() if reward_names is None else reward_names

    @dg.asset(name="evaluation_report", deps=[SFT_ASSET, *policy_names, *reward_names], group_name="evaluation",
              kinds={"mlflow"}, pool=TRAINING_POOL, automation_condition=ON_ANY_NEW_MODEL)
    def evaluation_report(context: dg.AssetExecutionContext, config: EvaluationConfig, preference_pairs: DatasetRef,
                          judge: JudgeResource, storage: StorageResource, mlflow: MlflowResource) -> dg.Output[dict]:
        """Every model present (and the champion) on the same held-out prompts and pairs: preference accuracy,
        win-rates against the SFT model and the champion with 95% intervals, reward, KL, lengths, broken answers,
        plots and samples. Logged to an MLflow evaluation run (the evidence promotion cites); no alias moves."""
        found = latest_model_refs(context.instance, [SFT_ASSET, *policy_names])
        if SFT_ASSET not in found:
            raise dg.Failure("evaluation_report needs a trained sft_model as its baseline; materialize it first")
        if len(found) == 1:
            raise dg.Failure(f"no policy has been trained yet; expected any of {policy_names}")
        missing = sorted(set(policy_names) - set(found))
        reward_models = latest_model_refs(context.instance, reward_names)
        reward_name = next(iter(reward_models), None)
        tracker = mlflow.tracker()
        champion = current_champion(tracker.client)
        models = [ModelUnderTest(name, ref.path, ref.start_path) for name, ref in found.items()]
        entries = {name: ref.to_dict() for name, ref in found.items()}
        champion_name = None
        if champion is not None:
            champion_name = next((name for name, ref in found.items() if ref.uri == champion["source_uri"]), CHAMPION)
            if champion_name == CHAMPION:  # a champion no method's newest model is: measured alongside them
                models.append(ModelUnderTest(CHAMPION, champion["path"], champion["start_path"]))
                entries[CHAMPION] = {"path": champion["path"], "start_path": champion["start_path"],
                                     "uri": champion["source_uri"]}

        if config.judge_by_reward_model and not reward_name:
            raise dg.Failure("judge_by_reward_model needs a trained reward model "
                             f"({reward_names or 'none is registered'})")
        # the eval split only, its first max_pairs rows only, and only the columns scored
        pairs = head_records(preference_pairs.eval_path, config.max_pairs, columns=["prompt", "chosen", "rejected"])
        the_judge = None if config.judge_by_reward_model else judge.build()
        evaluation = evaluate_models(
            models, SFT_ASSET, pairs, list(pairs["prompt"].head(config.max_prompts)), the_judge,
            champion=champion_name, reward_model_path=reward_models[reward_name].path if reward_name else None,
            max_new_tokens=config.max_new_tokens, beta=config.beta, batch_size=config.batch_size)

        histories = {name: training_history(tracker, ref.mlflow_run_id) for name, ref in found.items()}
        plots = evaluation_plots(evaluation, histories)
        notes = [f"Not evaluated (never trained): {', '.join(missing)}"] if missing else []
        if reward_name:
            notes.append(f"Reward model: `{reward_name}` ({reward_models[reward_name].uri})")
        if champion is not None:
            notes.append(f"Champion: {champion_name}, `aligned_policy` version {champion['version']} "
                         f"({champion['source_uri']})")
        markdown = render_report(evaluation, plots, notes=notes)
        report_dir = storage.layout.training_dir("evaluation_report", context.run_id)
        report_dir.mkdir(parents=True, exist_ok=True)
        for name, png in plots.items():
            (report_dir / f"{name}.png").write_bytes(png)
        (report_dir / "report.md").write_text(markdown)

        run_id = tracker.start_run(f"evaluation-{context.run_id[:8]}",
                                   tags={"dagster_run_id": context.run_id, "alignment.kind": "evaluation"})
        report = {
            "baseline": SFT_ASSET,
            "champion": None if champion is None else {"name": champion_name, "aligned_version": champion["version"],
                                                       "source_uri": champion["source_uri"]},
            "candidates": sorted(found),
            "models": {name: {"model": entries[name], "metrics": result.metrics}
                       for name, result in evaluation.results.items()},
            "reward_model": evaluation.reward_model,
            "judge": evaluation.judge,
            "evidence": {"mlflow_run_id": run_id, "dagster_run_id": context.run_id, "path": str(report_dir)},
            "not_evaluated": missing,
        }
        try:
            tracker.log_metrics(run_id, {f"{name}/{key}": value for name, result in evaluation.results.items()
                                         for key, value in result.metrics.items()})
            tracker.client.log_artifacts(run_id, str(report_dir), "evaluation")
            tracker.client.log_dict(run_id, report, f"evaluation/{REPORT_FILE}")
            for name, ref in found.items():
                if ref.mlflow_run_id:
                    tracker.log_metrics(ref.mlflow_run_id,
                                        {f"eval/{k}": v for k, v in evaluation.results[name].metrics.items()})
        except BaseException:
            tracker.end_run(run_id, succeeded=False)
            raise
        tracker.end_run(run_id, succeeded=True)
        (report_dir / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str))  # last: only on success
        return dg.Output(report, metadata={
            "report": dg.MetadataValue.md(markdown),
            "comparison": dg.MetadataValue.md(comparison_table(evaluation)),
            "champion": dg.MetadataValue.json(report["champion"]),
            "not_evaluated": dg.MetadataValue.json(missing),
            "mlflow_run_id": run_id,
            "path": dg.MetadataValue.path(str(report_dir)),
            **{f"{name}/{key}": float(value) for name, result in evaluation.results.items()
               for key, value in result.metrics.items() if isinstance(value, (int, float))},
        })

    return evaluation_report
