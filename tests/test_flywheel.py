"""The flywheel: feedback on served answers becomes feedback batches exactly once (an edit is new feedback), the
inbox sensor ingests and validates them as any file, and the champion is scored on each batch: a batch that agrees
with it passes the watch, one that contradicts it (its own answers rejected) fails the check with WARNING severity."""

from __future__ import annotations

import json
import os
import time

import dagster as dg
import mlflow
import pytest
from mlflow.entities import AssessmentSource

from alignment_pipelines.assets.flywheel import (WATCH_FILE, champion_watch, champion_watch_agreement,
                                                 traced_feedback_sensor, watch_drop_retrain)
from alignment_pipelines.definitions import build_resources
from alignment_pipelines.flywheel import (BATCH_PREFIX, FEEDBACK_FILE_TAG, PREFERRED_FEEDBACK, THUMBS_FEEDBACK,
                                          FeedbackCursor, collect_feedback, write_feedback_batches)
from alignment_pipelines.runs import ingest_batch, sense_inbox
from served_champion import ServedChampion, register_champion, talkative_copy

TOPICS = ["tea", "rain", "maps", "bread", "owls", "glass", "rivers", "chess"]
# Longer than any served answer (8 tokens at most) and unlike them: the champion finds it far less likely.
UNLIKELY = "Seventeen purple elephants negotiated the quarterly tax returns of a lighthouse beside the glacier."


@pytest.fixture(scope="module")
def flywheel(tmp_path_factory, tiny_model_dir):
    """A data root whose registry holds a tiny champion, served on 127.0.0.1; the project's resources over it."""
    root = tmp_path_factory.mktemp("flywheel")
    resources = build_resources(data_root=root, base_model=str(tiny_model_dir))
    uri = resources["mlflow"].resolved_uri()
    register_champion(uri, talkative_copy(tiny_model_dir, root / "champion"))
    with ServedChampion(uri, root / "logs") as served:
        yield served, resources, uri


@pytest.fixture
def tracking(flywheel, monkeypatch):
    """MLflow's own client API (mlflow.log_feedback) aimed at the flywheel's registry, as an application's would be."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", flywheel[2])
    yield


def _settle(inbox):
    """The inbox sensor takes a file unchanged for a few seconds; these were written just now."""
    stamp = time.time() - 60
    for path in inbox.glob("*.jsonl"):
        os.utime(path, (stamp, stamp))


def test_feedback_is_collected_once_and_an_edit_is_new_feedback(flywheel, tracking, tmp_path):
    served, resources, uri = flywheel
    tracker = resources["mlflow"].tracker()
    replies = [served.chat(f"What about {topic} in the evening?") for topic in TOPICS[:3]]
    cursor = collect_feedback(tracker.client, tracker.experiment_id, FeedbackCursor())[1]  # start after the earlier
    up = mlflow.log_feedback(trace_id=replies[0]["trace_id"], name=THUMBS_FEEDBACK, value=True,
                             source=AssessmentSource(source_type="HUMAN", source_id="ana"))
    mlflow.log_feedback(trace_id=replies[1]["trace_id"], name=PREFERRED_FEEDBACK, value="A better answer.")
    mlflow.log_feedback(trace_id=replies[2]["trace_id"], name="relevance", value=0.3)  # not feedback the loop reads

    rows, cursor = collect_feedback(tracker.client, tracker.experiment_id, cursor)
    assert [(row.kind, row.record["trace_id"]) for row in rows] == [("binary", replies[0]["trace_id"]),
                                                                   ("pairwise", replies[1]["trace_id"])]
    binary, pair = (row.record for row in rows)
    assert binary["label"] is True and binary["completion"] == replies[0]["choices"][0]["message"]["content"]
    assert binary["model_name"] == "aligned_policy" and binary["model_version"] == "1"
    assert binary["source"] == "HUMAN:ana" and binary["timestamp"].startswith("20")
    assert pair["chosen"] == "A better answer." and pair["rejected"] == replies[1]["choices"][0]["message"]["content"]
    assert pair["prompt"] == [{"role": "user", "content": "What about rain in the evening?"}]
    assert collect_feedback(tracker.client, tracker.experiment_id, FeedbackCursor.from_json(cursor.to_json()))[0] == []

    mlflow.override_feedback(trace_id=replies[0]["trace_id"], assessment_id=up.assessment_id, value=False)
    [edited], cursor = collect_feedback(tracker.client, tracker.experiment_id, cursor)
    assert edited.record["label"] is False and edited.record["supersedes"] == up.assessment_id
    assert collect_feedback(tracker.client, tracker.experiment_id, cursor)[0] == []

    files = write_feedback_batches(tmp_path, rows)
    assert sorted(path.name.split("-")[1] for path in files) == ["binary", "pairwise"]
    binary_file = next(path for path in files if "-binary-" in path.name)
    assert [json.loads(line)["trace_id"] for line in binary_file.read_text().splitlines()] == [replies[0]["trace_id"]]
    assert files[binary_file] == [replies[0]["trace_id"]] and not list(tmp_path.glob("*.part"))
    assert write_feedback_batches(tmp_path, rows) == files  # the same rows again: the same files


def _tick(resources, instance, cursor):
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources) as context:
        result = traced_feedback_sensor(context)
    return result


def _ingest_and_watch(instance, resources, watch_config: dict | None = None):
    """What the inbox sensor and the eager watch do for each new batch: (check, watch record, run) by (kind, from
    traces)."""
    inbox = resources["storage"].layout.inbox
    _settle(inbox)
    checks = {}
    for request in sense_inbox(instance, resources).run_requests or []:
        ingested = ingest_batch(instance, resources, request.partition_key, raise_on_error=False)
        [gate] = ingested.get_asset_check_evaluations()
        assert gate.passed, (request.partition_key, gate.metadata)  # the batch gate admits it, as any file
        watched = dg.materialize([champion_watch, champion_watch_agreement], partition_key=request.partition_key,
                                 instance=instance, resources=resources, raise_on_error=False,
                                 run_config={"ops": {"champion_watch": {"config": watch_config or {}}}})
        [check] = watched.get_asset_check_evaluations()
        record = json.loads((resources["storage"].layout.batch_dir(request.partition_key) / WATCH_FILE).read_text())
        checks[(record["kind"], request.partition_key.startswith(BATCH_PREFIX))] = (check, record, watched)
    return checks


def test_feedback_on_served_answers_becomes_batches_that_watch_the_champion(flywheel, tracking):
    served, resources, _ = flywheel
    inbox = resources["storage"].layout.inbox
    with dg.instance_for_test() as instance:
        tracker = resources["mlflow"].tracker()  # what came before this test is not this test's:
        cursor = collect_feedback(tracker.client, tracker.experiment_id, FeedbackCursor())[1].to_json()
        liked = [served.chat(f"Say something kind about {topic}.") for topic in TOPICS]
        corrected = [served.chat(f"Tell me plainly about {topic}.") for topic in TOPICS]
        for reply in liked:
            mlflow.log_feedback(trace_id=reply["trace_id"], name=THUMBS_FEEDBACK, value=True)
        for reply in corrected:  # the champion's own answers rejected in favour of unlikely text: contradicted
            mlflow.log_feedback(trace_id=reply["trace_id"], name=PREFERRED_FEEDBACK, value=UNLIKELY)
        # a file of pairs that prefer the champion's answers, dropped in the inbox beside the traced feedback
        (inbox / "agreeing.jsonl").write_text("".join(json.dumps({
            "prompt": [{"role": "user", "content": f"Tell me plainly about {topic}."}],
            "chosen": reply["choices"][0]["message"]["content"], "rejected": UNLIKELY}) + "\n"
            for topic, reply in zip(TOPICS, corrected)))

        first = _tick(resources, instance, cursor)
        assert not first.run_requests and not list(inbox.glob("*.part"))
        assert sorted(p.name.split("-")[1] for p in inbox.glob("traces-*.jsonl")) == ["binary", "pairwise"]
        [binary_file] = inbox.glob("traces-binary-*.jsonl")
        assert tracker.client.get_trace(liked[0]["trace_id"]).info.tags[FEEDBACK_FILE_TAG] == binary_file.name
        checks = _ingest_and_watch(instance, resources)
        contradicted, agreeing = checks[("pairwise", True)], checks[("pairwise", False)]
        assert contradicted[1]["score"]["measure"] == "agreement" and contradicted[1]["score"]["n"] == len(TOPICS)
        assert contradicted[1]["score"]["rate"] == 0.0 and not contradicted[0].passed
        assert contradicted[0].severity == dg.AssetCheckSeverity.WARN
        assert "below the 0.80 it showed before" in contradicted[0].metadata["why"].value
        assert agreeing[1]["score"]["rate"] == 1.0 and agreeing[0].passed
        thumbs_check, thumbs_record, thumbs_run = checks[("binary", True)]
        assert thumbs_record["score"] == {"measure": "thumbs_up", "rate": 1.0, "ci_low": pytest.approx(0.676, abs=1e-3),
                                          "ci_high": 1.0, "n": len(TOPICS), "successes": len(TOPICS),
                                          "reference": None}
        assert thumbs_check.passed and thumbs_record["expected"] is None  # no earlier thumbs to compare with
        [watched] = thumbs_run.asset_materializations_for_node("champion_watch")
        assert watched.metadata["trend"].value.startswith("![the champion on each batch](data:image/png;base64,")

        disliked = [served.chat(f"Anything about {topic}?") for topic in TOPICS]
        for reply in disliked:
            mlflow.log_feedback(trace_id=reply["trace_id"], name=THUMBS_FEEDBACK, value=False)
        second = _tick(resources, instance, first.cursor)
        assert _tick(resources, instance, second.cursor).skip_reason  # exactly once: nothing new the next tick
        with dg.build_sensor_context(instance=instance) as context:
            cursor = watch_drop_retrain(context).cursor  # the drops so far did not ask for a retrain
        thumbs_check, thumbs_record, _ = _ingest_and_watch(instance, resources,
                                                           {"request_retrain": True})[("binary", True)]
        assert thumbs_record["score"]["rate"] == 0.0 and thumbs_record["expected"] == 1.0
        assert not thumbs_check.passed and thumbs_check.severity == dg.AssetCheckSeverity.WARN
        with dg.build_sensor_context(instance=instance, cursor=cursor) as context:
            [retrain] = watch_drop_retrain(context).run_requests  # this one did
        assert retrain.tags["alignment_pipelines/watch_drop"] == thumbs_record["batch"]
