"""The loop closed with real processes: a real MLflow server, the champion served on 127.0.0.1, and the real
`dagster-daemon` on the test's instance. The test serves 40 chat requests and logs feedback on them through
MLflow's client (thumbs, and preferred answers: corrections that mark the champion's own answers rejected); then it
only watches: the daemon's flywheel sensor makes batches of the feedback, its inbox sensor ingests them and the gate
admits them, the automation scores the champion on each (with its interval) and retrains on the new pairs, and the
new model version's lineage leads back to the batch and to the traces. The champion contradicts the corrections
batch, so its watch check fails with a warning, which the Dagster UI shows (Selenium, headless Chromium; the
screenshot goes where tests/test_ui_browser.py puts its own)."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import mlflow
import pytest
from mlflow.entities import AssessmentSource

from alignment_pipelines.assets.flywheel import WATCH_FILE, champion_watch_agreement
from alignment_pipelines.flywheel import FEEDBACK_FILE_TAG, PREFERRED_FEEDBACK, THUMBS_FEEDBACK
from alignment_pipelines.tracking import Tracker
from mlflow_server import MlflowServer
from production_services import (BIN, CODE_LOCATION_MODULE, ROOT, Service, batch_key, free_port, http_ok,
                                 latest_materialization, scoped_methods_env, verdict, wait_until)
from served_champion import ServedChampion, register_champion, talkative_copy
from test_ui_browser import browser, screenshot, settle, wait_for_text  # noqa: F401 (a fixture)

pytestmark = pytest.mark.integration
TOPICS = ["tea", "rain", "maps", "bread", "owls", "glass", "rivers", "chess", "salt", "kites", "moss", "bells",
          "boats", "clocks", "ferns", "lamps", "rope", "snow", "wool", "zinc"]
KINDS = ("binary", "pairwise")


def watch_evaluation(instance: dg.DagsterInstance, key: str):
    """The latest evaluation of `champion_watch_agreement` on batch ``key`` (passed, severity), or None."""
    from dagster._core.event_api import PartitionKeyFilter
    from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus as Status

    history = instance.event_log_storage.get_asset_check_execution_history(
        champion_watch_agreement.check_key, limit=1, partition_filter=PartitionKeyFilter(key=key),
        status={Status.SUCCEEDED, Status.FAILED})  # evaluated, not only planned
    return history[0].event.dagster_event.event_specific_data if history else None


def dagster_env(home: Path, data_root: Path, tracking_uri: str, base_model: str) -> dict[str, str]:
    """The Dagster processes' environment: a SQLite instance at ``home`` (the project's dagster.yaml) and the
    production tests' code location, with the registry scoped to SFT (two steps)."""
    home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ROOT / "dagster.yaml", home / "dagster.yaml")
    return os.environ | {
        "DAGSTER_HOME": str(home), "ALIGNMENT_PIPELINES_HOME": str(data_root),
        "ALIGNMENT_PIPELINES_BASE_MODEL": base_model, "MLFLOW_TRACKING_URI": tracking_uri,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
        "MLFLOW_ENABLE_TELEMETRY": "false", "GX_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1",
        "ALIGNMENT_PIPELINES_TEST_AUTOMATION_INTERVAL": "5", **scoped_methods_env("sft")}


@dataclass
class Loop:
    """What the daemon did with the served answers' feedback, for the tests to look at."""

    tracking_uri: str
    root: Path
    env: dict
    log_dir: Path
    champion_version: str
    corrected: list[dict]
    batches: dict[str, str]       # kind -> batch key
    records: dict[str, dict]      # kind -> the watch's record (champion_watch.json)
    watched: dict                 # kind -> the check's evaluation
    retrain_run_id: str           # the automation's run that materialized sft_model


@pytest.fixture(scope="module")
def loop(tmp_path_factory, tiny_model_dir):
    workdir = tmp_path_factory.mktemp("flywheel")
    server = MlflowServer(workdir / "mlflow").start()
    daemon = None
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("MLFLOW_TRACKING_URI", server.uri)  # MLflow's client API (and its artifact proxy) uses it
            champion_version = register_champion(server.uri, talkative_copy(tiny_model_dir, workdir / "champion"))
            person = AssessmentSource(source_type="HUMAN", source_id="reviewer@example.org")
            with ServedChampion(server.uri, workdir / "logs") as served:
                thumbs = [served.chat(f"What do you know about {topic}?") for topic in TOPICS]
                corrected = [served.chat(f"Describe {topic} in one line.") for topic in TOPICS]
            for index, reply in enumerate(thumbs):
                mlflow.log_feedback(trace_id=reply["trace_id"], name=THUMBS_FEEDBACK, value=index % 4 != 0,
                                    source=person)
            for topic, reply in zip(TOPICS, corrected):  # a correction: the served answer becomes `rejected`
                mlflow.log_feedback(trace_id=reply["trace_id"], name=PREFERRED_FEEDBACK, source=person,
                                    value=f"{topic.title()} is worth a careful, friendly sentence.")

        # From here on the test only looks: the daemon's sensors and the automation do the work.
        root, home = workdir / "data", workdir / "dagster_home"
        env = dagster_env(home, root, server.uri, str(tiny_model_dir))
        # The instance's SQLite tables are made here, once: the daemon and its code server would race to make them.
        instance = dg.DagsterInstance.from_config(str(home))
        try:
            daemon = Service("daemon", [str(BIN / "dagster-daemon"), "run", "-m", CODE_LOCATION_MODULE],
                             workdir / "logs", env=env).start()
            diagnostics = daemon.log_tail
            batches = wait_until(lambda: all(verdict(instance, batch_key(instance, f"traces-{k}-")) for k in KINDS)
                                 and {kind: batch_key(instance, f"traces-{kind}-") for kind in KINDS},
                                 420, "the daemon to ingest and gate both feedback batches", on_timeout=diagnostics)
            watched = wait_until(lambda: all(watch_evaluation(instance, key) for key in batches.values()) and
                                 {kind: watch_evaluation(instance, key) for kind, key in batches.items()},
                                 300, "the automation to watch the champion on both batches", on_timeout=diagnostics)
            # (the same run's evaluation fails: the registry is scoped to SFT, there is no policy to evaluate)
            retrained = wait_until(lambda: latest_materialization(instance, "sft_model"), 420,
                                   "the automation to retrain sft_model on the new pairs", on_timeout=diagnostics)
        finally:
            instance.dispose()
        daemon.stop()  # the loop is done: the browser test only looks
        records = {kind: json.loads((root / "batches" / key / WATCH_FILE).read_text()) for kind, key in batches.items()}
        yield Loop(server.uri, root, env, workdir / "logs", champion_version, corrected, batches, records, watched,
                   retrained.run_id)
    finally:
        if daemon:
            daemon.stop()
        server.stop()


@pytest.mark.timeout(900)
def test_the_daemon_turns_served_feedback_into_watched_batches_and_a_linked_retrain(loop: Loop):
    for kind, record in loop.records.items():
        assert record["champion_version"] == loop.champion_version and record["score"]["n"] == len(TOPICS), kind
    thumbs = loop.records["binary"]["score"]
    assert thumbs["measure"] == "thumbs_up" and thumbs["rate"] == 0.75
    assert thumbs["ci_low"] < 0.75 < thumbs["ci_high"]
    assert loop.watched["binary"].passed  # no earlier thumbs to fall behind
    pairs = loop.records["pairwise"]["score"]
    assert pairs["measure"] == "agreement" and 0 <= pairs["ci_low"] <= pairs["ci_high"] <= 1

    pairs_batch = loop.batches["pairwise"]
    client = Tracker(loop.tracking_uri).client
    [version] = client.search_model_versions(
        f"name = 'sft_model' and tags.`lineage.dagster_run_id` = '{loop.retrain_run_id}'")
    assert pairs_batch in version.tags["lineage.batches"].split(",")  # the new version -> the batch
    assert pairs_batch in version.description
    [dataset_input] = client.get_run(version.run_id).inputs.dataset_inputs
    assert dataset_input.dataset.digest == version.tags["lineage.dataset_version"]
    raw = next((loop.root / "batches" / pairs_batch).glob("raw.*")).read_text().splitlines()
    trace_ids = {json.loads(line)["trace_id"] for line in raw}  # the batch -> the traces
    assert trace_ids == {reply["trace_id"] for reply in loop.corrected}
    trace = client.get_trace(loop.corrected[0]["trace_id"])  # the trace -> the batch and the model that answered
    assert pairs_batch.startswith(trace.info.tags[FEEDBACK_FILE_TAG])
    assert trace.info.tags["alignment_pipelines.model_version"] == loop.champion_version


@pytest.mark.timeout(300)
def test_a_batch_the_champion_contradicts_fails_the_watch_with_a_warning_in_the_ui(loop: Loop, browser):
    """The corrections batch marks the champion's own answers rejected: the champion prefers them, so its
    agreement falls far below the 0.8 it was promoted with, and the check fails with WARNING severity."""
    record, evaluation = loop.records["pairwise"], loop.watched["pairwise"]
    assert record["dropped"] and record["score"]["ci_high"] < record["expected"] - record["tolerance"], record
    assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.WARN

    port = free_port()
    webserver = Service("webserver", [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port),
                                      "-m", CODE_LOCATION_MODULE], loop.log_dir, env=loop.env).start()
    try:
        url = f"http://127.0.0.1:{port}"
        webserver.wait_ready(lambda: http_ok(f"{url}/server_info"), timeout=240)
        browser.get(f"{url}/assets/champion_watch?view=checks")
        wait_for_text(browser, "champion_watch_agreement", timeout=120)
        for skip in browser.find_elements("xpath", "//button[normalize-space(.)='Skip']"):
            skip.click()  # a new instance's "Join the Dagster community" dialog
        # The latest evaluation (the corrections batch): failed, its partition, and why; WARN draws a warning sign.
        body = wait_for_text(browser, "Latest execution", "Failed", loop.batches["pairwise"], "more than 0.1 below")
        assert "This is a non-blocking asset check." in body
        settle()
        screenshot(browser, "dagster-champion-watch-warning")
    finally:
        webserver.stop()
