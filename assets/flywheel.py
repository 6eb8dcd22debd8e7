"""The feedback flywheel in the graph: feedback on served answers flows back as batches, and the champion is scored
on every new batch before any retrain.

``traced_feedback_sensor`` turns new feedback on the serving endpoint's traces into feedback batch files dropped in
the inbox (``alignment_pipelines.flywheel``); the inbox sensor then ingests, validates and gates them as any file,
and retraining follows as it does for files. ``champion_watch`` scores the champion on each validated batch, with
a trend over batches; its check ``champion_watch_agreement`` fails (WARNING by default) when the champion
disagrees with a batch beyond the configured tolerance.
"""

import json
import math
from pathlib import Path

import dagster as dg
import pandas as pd
import pydantic

from alignment_pipelines.assets.ingestion import ACCEPTED_FILE, SUMMARY_FILE, feedback_batches
from alignment_pipelines.evaluation.plots import markdown_image
from alignment_pipelines.flywheel import (FEEDBACK_FILE_TAG, FeedbackCursor, WatchScore, collect_feedback, dropped,
                                          score_batch, trend_plot, write_feedback_batches)
from alignment_pipelines.resources.mlflow import MlflowResource
from alignment_pipelines.resources.storage import StorageResource

WATCH_FILE = "champion_watch.json"  # in the batch's folder: this batch's score, read back for the trend and check
NO_CHAMPION = "no champion yet: nothing to watch"


@dg.sensor(minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Turns new feedback on served answers (MLflow traces) into feedback batches in the inbox.")
def traced_feedback_sensor(context: dg.SensorEvaluationContext, storage: StorageResource,
                           mlflow: MlflowResource) -> dg.SensorResult:
    """Exactly once per assessment (its cursor: ``flywheel.FeedbackCursor``; edited feedback: see
    ``alignment_pipelines.flywheel``). The files are written, and each trace tagged with its file, before the
    cursor moves: a tick that dies in between writes the same file again at the next tick, and the inbox sensor
    ingests content it already has only once. A trace with feedback in several files names the newest."""
    cursor = FeedbackCursor.from_json(context.cursor)
    tracker = mlflow.tracker()
    rows, cursor = collect_feedback(tracker.client, tracker.experiment_id, cursor)
    if not rows:
        return dg.SensorResult(cursor=cursor.to_json(), skip_reason="no new feedback on served answers")
    files = write_feedback_batches(storage.layout.inbox, rows)
    for path, trace_ids in files.items():  # the trace links to its batch (the key is the file name + content hash)
        for trace_id in trace_ids:
            tracker.client.set_trace_tag(trace_id, FEEDBACK_FILE_TAG, path.name)
    context.log.info(f"{len(rows)} feedback rows on served answers -> {[path.name for path in files]}")
    return dg.SensorResult(cursor=cursor.to_json())


class WatchConfig(dg.Config):
    tolerance: float = pydantic.Field(0.1, description=(
        "How far below what the champion showed in evaluation (its held-out preference accuracy, else 0.5) the "
        "whole 95% interval of its agreement with a batch may lie before the check fails; for thumbs up, below the "
        "share over the earlier batches."))
    severity: str = pydantic.Field("WARN", description="The failed check's severity: WARN or ERROR.")
    max_pairs: int = pydantic.Field(512, description="Pairs of a batch scored at most (the first ones).")
    request_retrain: bool = pydantic.Field(False, description=(
        "On a drop, also request a retrain and re-evaluation (the sensor watch_drop_retrain), beside the automation "
        "that retrains when the data changes."))


@dg.asset(partitions_def=feedback_batches, deps=["validated_feedback"], group_name="flywheel", kinds={"mlflow"},
          automation_condition=dg.AutomationCondition.eager())
def champion_watch(context: dg.AssetExecutionContext, config: WatchConfig, storage: StorageResource,
                   mlflow: MlflowResource) -> dg.MaterializeResult:
    """The champion (`aligned_policy@champion`) on this batch's accepted rows: its agreement with the batch's
    preferences (implicit reward against the model it was trained from) on pairs, the share of thumbs up on
    binary rows, each with a 95% interval, and the trend over every batch scored so far."""
    from alignment_pipelines.models.registry import fetch_model
    from alignment_pipelines.promotion import ALIGNED_MODEL, current_champion

    if config.severity not in ("WARN", "ERROR"):
        raise dg.Failure(f"champion_watch: severity must be WARN or ERROR, got {config.severity!r}",
                         allow_retries=False)
    key = context.partition_key
    batch_dir = storage.layout.batch_dir(key)
    kind = json.loads((batch_dir / SUMMARY_FILE).read_text())["kind"]
    tracker = mlflow.tracker()
    champion = current_champion(tracker.client)
    record: dict = {"batch": key, "kind": kind, "tolerance": config.tolerance, "severity": config.severity,
                    "request_retrain": config.request_retrain}
    if champion is None:
        (batch_dir / WATCH_FILE).write_text(json.dumps(record | {"status": NO_CHAMPION}))
        return dg.MaterializeResult(metadata={"status": NO_CHAMPION, "kind": kind})
    columns = {"pairwise": ["prompt", "chosen", "rejected"], "binary": ["label"]}.get(kind)
    score = None
    if columns:
        accepted = pd.read_parquet(batch_dir / ACCEPTED_FILE, columns=columns)
        start = champion["start_path"]
        reference = start if start and Path(start).exists() else None  # the model it was trained from
        folder = fetch_model(f"models:/{ALIGNED_MODEL}/{champion['version']}", mlflow.resolved_uri())
        score = score_batch(kind, accepted, folder, reference, max_rows=config.max_pairs)
    history = _history(context.instance, storage, key)
    expected = _expected(tracker.client, champion["version"], score, history) if score else None
    record |= {"status": "scored" if score else f"nothing to score in a {kind} batch",
               "champion_version": champion["version"], "champion_source": champion["source_uri"],
               "expected": expected, "score": score.to_dict() if score else None,
               "dropped": bool(score and expected is not None and dropped(score, expected, config.tolerance))}
    (batch_dir / WATCH_FILE).write_text(json.dumps(record))
    trend = [*history, {"batch": key, **score.to_dict()}] if score else history
    metadata = {"status": record["status"], "kind": kind, "champion": f"{ALIGNED_MODEL}/{champion['version']}",
                "champion_source": champion["source_uri"] or "",
                "trend": dg.MetadataValue.md(markdown_image(trend_plot(trend), "the champion on each batch"))}
    if score:
        metadata |= {"measure": score.measure, "rate": _finite(score.rate), "ci_low": score.ci_low,
                     "ci_high": score.ci_high, "rows_scored": score.n, "reference": score.reference or "",
                     "expected": _finite(expected), "dropped": record["dropped"],
                     "retrain_requested": record["dropped"] and config.request_retrain}
    return dg.MaterializeResult(metadata=metadata)


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _history(instance: dg.DagsterInstance, storage: StorageResource, key: str) -> list[dict]:
    """The scores of the batches registered before ``key``, in order."""
    keys = instance.get_dynamic_partitions(feedback_batches.name)
    history = []
    for batch in keys[:keys.index(key)] if key in keys else keys:
        path = storage.layout.batch_dir(batch) / WATCH_FILE
        if path.is_file() and (recorded := json.loads(path.read_text())).get("score"):
            history.append({"batch": batch, **recorded["score"]})
    return history


def _expected(client, version: str, score: WatchScore, history: list[dict]) -> float | None:
    """What the champion should show on a batch: its evaluated preference accuracy for agreement (0.5, a coin,
    when it has none), the share of thumbs up over the earlier batches for thumbs (None before the first)."""
    from alignment_pipelines.promotion import ALIGNED_MODEL

    if score.measure == "agreement":
        evaluated = client.get_model_version(ALIGNED_MODEL, version).tags.get("eval.preference_accuracy")
        return float(evaluated) if evaluated not in (None, "nan") else 0.5
    earlier = [entry for entry in history if entry["measure"] == score.measure]
    total = sum(entry["n"] for entry in earlier)
    return sum(entry["successes"] for entry in earlier) / total if total else None


@dg.asset_check(asset=champion_watch, partitions_def=feedback_batches, blocking=False,
                description="The champion still agrees with the newest feedback (within the watch's tolerance).")
def champion_watch_agreement(context: dg.AssetCheckExecutionContext, storage: StorageResource) -> dg.AssetCheckResult:
    record = json.loads((storage.layout.batch_dir(context.partition_key) / WATCH_FILE).read_text())
    score = record.get("score")
    severity = dg.AssetCheckSeverity.ERROR if record["severity"] == "ERROR" else dg.AssetCheckSeverity.WARN
    metadata = {"status": record["status"], "tolerance": record["tolerance"]}
    if score:
        metadata |= {"measure": score["measure"], "rate": _finite(score["rate"]), "ci_low": score["ci_low"],
                     "ci_high": score["ci_high"], "expected": _finite(record["expected"]),
                     "champion_version": record["champion_version"]}
        if record["dropped"]:
            metadata["why"] = (f"the champion's {score['measure']} on this batch is {score['rate']:.2f} "
                               f"[{score['ci_low']:.2f}, {score['ci_high']:.2f}], more than {record['tolerance']} "
                               f"below the {record['expected']:.2f} it showed before")
    return dg.AssetCheckResult(passed=not record.get("dropped", False), severity=severity, metadata=metadata)


RETRAIN_SELECTION = dg.AssetSelection.groups("datasets", "training", "evaluation")


@dg.sensor(target=RETRAIN_SELECTION, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Retrains and re-evaluates when a champion_watch set to request_retrain saw a drop.")
def watch_drop_retrain(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    """One retrain per watched batch whose score dropped with ``request_retrain`` set (its materialization's
    ``retrain_requested``); the cursor is the last materialization read."""
    after = int(context.cursor) if context.cursor else None
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=champion_watch.key, after_storage_id=after), limit=100, ascending=True).records
    requests = []
    for record in records:
        metadata = record.asset_materialization.metadata
        if metadata.get("retrain_requested") and metadata["retrain_requested"].value:
            batch = record.partition_key
            requests.append(dg.RunRequest(run_key=f"watch-drop:{batch}:{record.storage_id}",
                                          tags={"alignment_pipelines/watch_drop": batch}))
    cursor = str(records[-1].storage_id) if records else context.cursor
    if not requests:
        return dg.SensorResult(cursor=cursor, skip_reason="no watched batch asked for a retrain")
    return dg.SensorResult(cursor=cursor, run_requests=requests)
