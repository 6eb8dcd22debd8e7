"""The loop closed on a real MLflow server: the champion served on 127.0.0.1 answers 40 chat requests, feedback on
them is logged through MLflow's client (thumbs and preferred answers), the flywheel sensor makes batches of it, the
inbox sensor ingests them and the gate admits them, the champion is scored on each with its interval, and a
retrain on the new pairs registers a model version whose lineage leads back to the batch and to the traces."""

from __future__ import annotations

import json
import os
import time

import dagster as dg
import mlflow
import pytest
from mlflow.entities import AssessmentSource

from alignment_pipelines.assets.flywheel import (WATCH_FILE, champion_watch, champion_watch_agreement,
                                                 traced_feedback_sensor)
from alignment_pipelines.definitions import ALL_ASSETS, build_resources
from alignment_pipelines.flywheel import FEEDBACK_FILE_TAG, PREFERRED_FEEDBACK, THUMBS_FEEDBACK
from alignment_pipelines.resources.mlflow import MlflowResource
from alignment_pipelines.runs import ingest_batch, sense_inbox
from mlflow_server import MlflowServer
from served_champion import ServedChampion, register_champion, talkative_copy

TOPICS = ["tea", "rain", "maps", "bread", "owls", "glass", "rivers", "chess", "salt", "kites", "moss", "bells",
          "boats", "clocks", "ferns", "lamps", "rope", "snow", "wool", "zinc"]
SFT = {"max_steps": 2, "max_length": 64, "gradient_checkpointing": False, "save_steps": 0, "logging_steps": 1}


@pytest.mark.timeout(420)
def test_served_answers_feedback_batch_watch_and_retrain_link_up(tmp_path, tiny_model_dir, monkeypatch):
    server = MlflowServer(tmp_path / "mlflow").start()
    try:
        root = tmp_path / "data"
        resources = build_resources(data_root=root, base_model=str(tiny_model_dir))
        resources["mlflow"] = MlflowResource(storage=resources["storage"], tracking_uri=server.uri)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)  # MLflow's client API (and its artifact proxy) uses it
        champion_version = register_champion(server.uri, talkative_copy(tiny_model_dir, tmp_path / "champion"))
        person = AssessmentSource(source_type="HUMAN", source_id="reviewer@example.org")
        with ServedChampion(server.uri, tmp_path / "logs") as served:
            thumbs = [served.chat(f"What do you know about {topic}?") for topic in TOPICS]
            corrected = [served.chat(f"Describe {topic} in one line.") for topic in TOPICS]
        for index, reply in enumerate(thumbs):
            mlflow.log_feedback(trace_id=reply["trace_id"], name=THUMBS_FEEDBACK, value=index % 4 != 0, source=person)
        for topic, reply in zip(TOPICS, corrected):
            mlflow.log_feedback(trace_id=reply["trace_id"], name=PREFERRED_FEEDBACK, source=person,
                                value=f"{topic.title()} is worth a careful, friendly sentence.")

        with dg.instance_for_test() as instance:
            with dg.build_sensor_context(instance=instance, resources=resources) as context:
                traced_feedback_sensor(context)
            inbox = resources["storage"].layout.inbox
            stamp = time.time() - 60  # settled, as a file left alone for a minute
            for path in inbox.glob("*.jsonl"):
                os.utime(path, (stamp, stamp))
            requests = sense_inbox(instance, resources).run_requests
            assert sorted(r.partition_key.split("-")[1] for r in requests) == ["binary", "pairwise"]
            scores = {}
            for request in requests:
                key = request.partition_key
                gate = ingest_batch(instance, resources, key).get_asset_check_evaluations()
                assert [check.passed for check in gate] == [True]
                watched = dg.materialize([champion_watch, champion_watch_agreement], partition_key=key,
                                         instance=instance, resources=resources)
                [check] = watched.get_asset_check_evaluations()
                record = json.loads((resources["storage"].layout.batch_dir(key) / WATCH_FILE).read_text())
                assert record["champion_version"] == champion_version and record["score"]["n"] == len(TOPICS)
                scores[record["kind"]] = (record["score"], check, key)

            thumbs_score, thumbs_check, _ = scores["binary"]
            assert thumbs_score["rate"] == 0.75 and thumbs_score["ci_low"] < 0.75 < thumbs_score["ci_high"]
            assert thumbs_check.passed
            pairs_score, _, pairs_batch = scores["pairwise"]
            assert pairs_score["measure"] == "agreement" and 0 <= pairs_score["ci_low"] <= pairs_score["ci_high"] <= 1

            retrain = dg.materialize(ALL_ASSETS, selection=dg.AssetSelection.assets("preference_pairs", "sft_model"),
                                     instance=instance, resources=resources,
                                     run_config={"ops": {"sft_model": {"config": SFT}}})

        model = retrain.output_for_node("sft_model")
        client = resources["mlflow"].tracker().client
        version = client.get_model_version("sft_model", model.registered_version)
        assert pairs_batch in version.tags["lineage.batches"].split(",")  # the new version -> the batch
        assert pairs_batch in version.description
        [dataset_input] = client.get_run(model.mlflow_run_id).inputs.dataset_inputs
        assert dataset_input.dataset.digest == model.dataset_version
        raw = next((root / "batches" / pairs_batch).glob("raw.*")).read_text().splitlines()
        trace_ids = {json.loads(line)["trace_id"] for line in raw}  # the batch -> the traces
        assert trace_ids == {reply["trace_id"] for reply in corrected}
        trace = client.get_trace(corrected[0]["trace_id"])  # the trace -> the batch and the model that answered
        assert pairs_batch.startswith(trace.info.tags[FEEDBACK_FILE_TAG])
        assert trace.info.tags["alignment_pipelines.model_version"] == champion_version
    finally:
        server.stop()
