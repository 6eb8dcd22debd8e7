"""Evaluation of every model that exists, on the same held-out data; it measures, promotion decides.

The judge of the win-rates is ``evaluation_reward_model`` when it exists: the project's reward method (LoRA) trained
on the judge split of the pairs, which no policy and no training reward model sees, so PPO and RLOO are never judged
by the reward model they optimised. Without it (or with ``judge: resource``), the judge resource judges, and a
heuristic one says so on the report's first line. The report is an
:class:`~alignment_pipelines.evaluation.schema.EvaluationReport` written as ``evaluation.json``.
"""

import dataclasses
from typing import Literal

import dagster as dg
import pydantic

from alignment_pipelines.assets.datasets import ON_NEW_DATA
from alignment_pipelines.assets.training import (SFT_ASSET, TRAINING_POOL, TRAINING_RETRIES, launchpad_config,
                                                 train_and_register)
from alignment_pipelines.data.datasets.sql import judge_path_beside
from alignment_pipelines.data.records import head_records
from alignment_pipelines.evaluation.compare import CHAMPION, ModelUnderTest, evaluate_models
from alignment_pipelines.evaluation.judge_choice import EVALUATION_REWARD_MODEL, evaluation_judge
from alignment_pipelines.evaluation.report import (REPORT_FILE, build_report, comparison_table, training_history,
                                                   write_report)
from alignment_pipelines.evaluation.schema import ChampionRef, Evidence, optimisation_targets
from alignment_pipelines.methods import METHODS
from alignment_pipelines.promotion import ALIGNED_MODEL, current_champion
from alignment_pipelines.refs import DatasetRef, ModelRef
from alignment_pipelines.resources.judge import JudgeResource
from alignment_pipelines.resources.launcher import TrainingLauncher
from alignment_pipelines.resources.mlflow import MlflowResource
from alignment_pipelines.resources.models import BaseModelResource
from alignment_pipelines.resources.storage import StorageResource

# Re-evaluate when any model's data version changed, even while another method has never trained:
# one method that fails does not hold back the evaluation of the others.
ON_ANY_NEW_MODEL = dg.AutomationCondition.eager().without(~dg.AutomationCondition.any_deps_missing()).replace(
    "any_deps_updated", dg.AutomationCondition.any_deps_match(dg.AutomationCondition.data_version_changed()))
JUDGE_TAG = "alignment.judge"  # "evaluation" on every version of evaluation_reward_model: a judge, never a reward


class EvaluationConfig(dg.Config):
    max_pairs: int = 64  # held-out pairs scored for preference accuracy
    max_prompts: int = 64  # held-out prompts every model answers: fewer widen the intervals the gate reads
    max_new_tokens: int = 64
    beta: float = 0.1  # scale of the implicit reward
    batch_size: int = 8
    judge: Literal["evaluation_reward_model", "resource"] = pydantic.Field(
        EVALUATION_REWARD_MODEL, description="Who judges the win-rates: the reward model trained on the judge split "
        "(the judge resource until one exists), or the judge resource.")


def build_evaluation_reward_model_asset(reward_method) -> dg.AssetsDefinition:
    """The evaluation's judge as an asset: ``reward_method`` (the registry's reward method) on the judge split. A
    registry without a reward method has no such asset, and the judge resource judges."""
    config_cls = pydantic.create_model(
        "EvaluationRewardModelConfig", __base__=launchpad_config(reward_method),
        __doc__="The reward method's settings for the evaluation's judge (LoRA by default).")

    @dg.asset(name=EVALUATION_REWARD_MODEL,
              ins={"preference_pairs": dg.AssetIn(), "sft_model": dg.AssetIn(SFT_ASSET)},
              group_name="training", kinds={"pytorch", "mlflow"}, pool=TRAINING_POOL, retry_policy=TRAINING_RETRIES,
              automation_condition=ON_NEW_DATA, tags={"method": reward_method.name, "role": "reward"})
    def evaluation_reward_model(context: dg.AssetExecutionContext, config: config_cls,
                                preference_pairs: DatasetRef, sft_model: ModelRef, base_model: BaseModelResource,
                                storage: StorageResource, mlflow: MlflowResource,
                                launcher: TrainingLauncher) -> dg.Output[ModelRef]:
        """The evaluation's judge: a Bradley-Terry reward model (the reward method, through the launcher like every
        training asset) trained on the judge split of the pairs, which no policy and no training reward model sees,
        and scored on the eval split after training (its eval_accuracy is the judge's own accuracy in the report).
        Registered with role reward and the tag alignment.judge=evaluation."""
        judge_split = judge_path_beside(preference_pairs.train_path)
        rows = _parquet_rows(judge_split)
        if not rows:
            raise dg.Failure(f"{EVALUATION_REWARD_MODEL}: preference_pairs version {preference_pairs.version} has no "
                             f"judge split ({judge_split}); build preference_pairs with judge_fraction > 0",
                             allow_retries=False)
        judge_pairs = dataclasses.replace(preference_pairs, train_path=str(judge_split), train_rows=rows)
        trained = train_and_register(context, reward_method, config.model_dump(), judge_pairs, sft_model, {},
                                     base_model, storage, mlflow, launcher)
        ref = trained.value
        client = mlflow.tracker().client
        for key, value in ((JUDGE_TAG, "evaluation"), ("lineage.split", "judge")):
            client.set_model_version_tag(ref.registered_name, ref.registered_version, key, value)
        return dg.Output(ref, metadata={**trained.metadata, "judge_pairs": rows})

    return evaluation_reward_model


def _parquet_rows(path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows if path.is_file() else 0


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


def build_evaluation_judge_assets() -> list[dg.AssetsDefinition]:
    """``evaluation_reward_model`` from the registry's reward method, or nothing when the registry has none."""
    reward_method = next((spec for spec in METHODS.values() if spec.produces == "reward"), None)
    return [build_evaluation_reward_model_asset(reward_method)] if reward_method else []


def version_tags(client, name: str | None, version: str | None) -> dict[str, str]:
    """A registered version's tags (lineage among them); none for a model that is not registered."""
    return dict(client.get_model_version(name, version).tags) if name and version else {}


def build_evaluation_asset(policy_names: list[str], reward_names: list[str] | None = None) -> dg.AssetsDefinition:
    """The evaluation of the SFT model and ``policy_names`` (generated from the registry), with the reward
    models in ``reward_names`` (default: the registry's) as scorers and ``evaluation_reward_model`` as the judge."""
    reward_names = reward_model_asset_names() if reward_names is None else reward_names
    judge_names = [EVALUATION_REWARD_MODEL] if reward_names else []  # the judge exists where a reward method does

    @dg.asset(name="evaluation_report", deps=[SFT_ASSET, *policy_names, *reward_names, *judge_names],
              group_name="evaluation", kinds={"mlflow"}, pool=TRAINING_POOL, automation_condition=ON_ANY_NEW_MODEL)
    def evaluation_report(context: dg.AssetExecutionContext, config: EvaluationConfig, preference_pairs: DatasetRef,
                          judge: JudgeResource, storage: StorageResource, mlflow: MlflowResource) -> dg.Output[dict]:
        """Every model present (and the champion) on the same held-out prompts and pairs: preference accuracy,
        win-rates against the SFT model and the champion with 95% intervals, reward, KL, lengths, broken answers,
        plots and samples. Judged by evaluation_reward_model (else the judge resource; never a reward model a
        policy optimised). Logged to an MLflow evaluation run (the evidence promotion cites); no alias moves. Its
        value is the EvaluationReport as a dict (evaluation.json)."""
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
        entries = {name: ref.to_dict() for name, ref in found.items()}
        targets = {name: optimisation_targets(ref.path, version_tags(tracker.client, ref.registered_name,
                                                                     ref.registered_version))
                   for name, ref in found.items()}
        starts = {name: ref.start_path for name, ref in found.items()}
        champion_name = None
        if champion is not None:
            champion_name = next((name for name, ref in found.items() if ref.uri == champion["source_uri"]), CHAMPION)
            if champion_name == CHAMPION:  # a champion no method's newest model is: measured alongside them
                entries[CHAMPION] = {"path": champion["path"], "start_path": champion["start_path"],
                                     "uri": champion["source_uri"]}
                starts[CHAMPION] = champion["start_path"]
                targets[CHAMPION] = optimisation_targets(champion["path"], version_tags(
                    tracker.client, ALIGNED_MODEL, champion["version"]))
        models = [ModelUnderTest(name, entry["path"], starts[name], targets[name]) for name, entry in entries.items()]

        judge_model = latest_model_refs(context.instance, [EVALUATION_REWARD_MODEL]).get(EVALUATION_REWARD_MODEL)
        the_judge, judge_identity, notes = evaluation_judge(config.judge, judge_model, judge.build, config.batch_size)
        # the eval split only, its first max_pairs rows only, and only the columns scored
        pairs = head_records(preference_pairs.eval_path, config.max_pairs, columns=["prompt", "chosen", "rejected"])
        evaluation = evaluate_models(
            models, SFT_ASSET, pairs, list(pairs["prompt"].head(config.max_prompts)), the_judge,
            champion=champion_name, reward_model_path=reward_models[reward_name].path if reward_name else None,
            max_new_tokens=config.max_new_tokens, beta=config.beta, batch_size=config.batch_size,
            judge_identity=judge_identity)

        histories = {name: training_history(tracker.client, ref.mlflow_run_id) for name, ref in found.items()}
        notes += [f"Not evaluated (never trained): {', '.join(missing)}"] if missing else []
        if reward_name:
            notes.append(f"Training reward model: `{reward_name}` ({reward_models[reward_name].uri})")
        if champion is not None:
            notes.append(f"Champion: {champion_name}, `{ALIGNED_MODEL}` version {champion['version']} "
                         f"({champion['source_uri']})")
        report_dir = storage.layout.training_dir("evaluation_report", context.run_id)
        markdown = write_report(report_dir, evaluation, histories, notes)

        run_id = tracker.start_run(f"evaluation-{context.run_id[:8]}",
                                   tags={"dagster_run_id": context.run_id, "alignment.kind": "evaluation",
                                         "evaluation.judge": judge_identity.id[:5000],
                                         "evaluation.judge_heuristic": str(judge_identity.heuristic).lower()})
        report = build_report(
            evaluation, models, entries, Evidence(mlflow_run_id=run_id, dagster_run_id=context.run_id,
                                                  path=str(report_dir)), candidates=sorted(found),
            champion=None if champion is None else ChampionRef(champion_name, champion["version"],
                                                               champion["source_uri"]),
            not_evaluated=missing, training_reward_model=None if reward_name is None else {
                "asset": reward_name, "uri": reward_models[reward_name].uri})
        try:
            tracker.log_metrics(run_id, {f"{name}/{key}": value for name, result in evaluation.results.items()
                                         for key, value in result.metrics.items()})
            tracker.client.log_artifacts(run_id, str(report_dir), "evaluation")
            tracker.client.log_dict(run_id, report.to_dict(), f"evaluation/{REPORT_FILE}")
            for name, ref in found.items():
                if ref.mlflow_run_id:
                    tracker.log_metrics(ref.mlflow_run_id,
                                        {f"eval/{k}": v for k, v in evaluation.results[name].metrics.items()})
        except BaseException:
            tracker.end_run(run_id, succeeded=False)
            raise
        tracker.end_run(run_id, succeeded=True)
        (report_dir / REPORT_FILE).write_text(report.to_json())  # last: only on success
        return dg.Output(report.to_dict(), metadata={
            "report": dg.MetadataValue.md(markdown),
            "comparison": dg.MetadataValue.md(comparison_table(evaluation)),
            "judge": dg.MetadataValue.json(report.to_dict()["judge"]),
            "champion": dg.MetadataValue.json(report.to_dict()["champion"]),
            "not_evaluated": dg.MetadataValue.json(missing),
            "mlflow_run_id": run_id,
            "path": dg.MetadataValue.path(str(report_dir)),
            **{f"{name}/{key}": float(value) for name, result in evaluation.results.items()
               for key, value in result.metrics.items() if isinstance(value, (int, float))},
        })

    return evaluation_report
