"""Production on one host, end to end, with real processes on 127.0.0.1; and the compose file that deploys it.

A real Postgres server, `mlflow server` on it, and Dagster as deploy/docker-compose.yaml runs it (the code
location as its own gRPC server, the webserver, `dagster-daemon run`, deploy/dagster.postgres.yaml as the
instance). The test only drops files in the inbox and kills processes; the daemon's sensor and the automation
do the rest:

- good feedback lands → the inbox sensor ingests it → the automation builds the datasets and retrains
  (tiny model; the registry scoped to SFT and DPO with two steps each, see ``production_services``);
- mid-training the daemon is SIGKILLed (the run goes on: it lives in the code server), then the run's worker
  and its training process too; the code server marks the run failed, nothing is registered, and the
  `training` slot stays claimed until the daemon is back: the restarted daemon's run monitoring frees it and
  its run retries re-execute the run from the failed step → new versions in MLflow with ``candidate``;
- a file that fails its blocking check (dropped while the daemon was down) is quarantined, the datasets it
  triggers keep their data version, and nothing retrains;
- no model version is half registered.

No Docker engine runs here, so the compose file itself is checked by reading it.
"""

from __future__ import annotations

import json
import time

import pytest

from alignment_pipelines.assets.training import TRAINING_POOL
from production_services import (DEPLOY, MALFORMED, Stack, batch_key, demo_rows, drop, latest_materialization,
                                 production_stack_fixture, runs_of, verdict, wait_until)

production_stack = pytest.fixture(scope="session")(production_stack_fixture)
TRAINED = ("sft_model", "policy_dpo")
AUTOMATION_SENSOR = "retrain_on_new_data"


def prune_runs_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("prune_runs", DEPLOY / "prune_runs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def automation_ticks_after(instance, timestamp: float):
    """Finished ticks of the automation sensor that started after ``timestamp``."""
    from dagster._core.scheduler.instigation import TickStatus

    state = next(s for s in instance.all_instigator_state() if s.instigator_name == AUTOMATION_SENSOR)
    ticks = instance.get_ticks(state.instigator_origin_id, state.selector_id, after=timestamp,
                               statuses=[TickStatus.SKIPPED, TickStatus.SUCCESS])
    return [t for t in ticks if t.timestamp > timestamp]


@pytest.mark.integration
def test_feedback_retrains_through_the_daemon_and_survives_its_crash(production_stack: Stack):
    import dagster as dg

    stack = production_stack
    diagnostics = stack.log_tails
    good_rows = demo_rows(40)

    # 1. Good feedback lands; nothing else is done: the daemon's sensor and the automation take it from here.
    drop(stack.inbox, "feedback.jsonl", good_rows + MALFORMED)
    stack.wait_ready()
    instance = stack.instance()
    good = wait_until(lambda: verdict(instance, batch_key(instance, "feedback.jsonl-")) is not None and
                      batch_key(instance, "feedback.jsonl-"), 240, "the inbox sensor to ingest feedback.jsonl "
                      "and its blocking check to run", on_timeout=diagnostics)
    assert verdict(instance, good) is True
    quarantined = latest_materialization(instance, "quarantine", good).asset_materialization.metadata
    assert quarantined["dagster/row_count"].value == len(MALFORMED)

    # 2. The automation retrains. Kill the daemon while the training run is in progress.
    def training_step_started():
        for run in runs_of(instance, "sft_model"):
            if run.status == dg.DagsterRunStatus.STARTED and instance.all_logs(
                    run.run_id, of_type=dg.DagsterEventType.STEP_START):
                return run
        return None

    training = wait_until(training_step_started, 240, "the automation to launch the training run",
                          on_timeout=diagnostics)
    wait_until(lambda: (worker := stack.run_worker(training.run_id)) and worker.children(), 120,
               "the training run to start its training worker", interval=0.5, on_timeout=diagnostics)
    stack.services["daemon"].kill()
    # While the daemon is down a file that fails its blocking check lands (2 rows seen before, 10 not JSON).
    drop(stack.inbox, "junk.jsonl", good_rows[:2] + ["not json"] * 10)
    time.sleep(2)
    assert instance.get_run_by_id(training.run_id).status == dg.DagsterRunStatus.STARTED  # not the daemon's child

    # 3. The run's worker dies too, with the training it started. The code server marks the run failed;
    #    nothing is registered, and the dead run still holds the `training` slot (only the daemon frees it).
    stack.kill_run_worker(training.run_id)
    crashed = wait_until(lambda: (r := instance.get_run_by_id(training.run_id)).is_finished and r, 60,
                         "the code server to mark the crashed run failed", on_timeout=diagnostics)
    assert crashed.status == dg.DagsterRunStatus.FAILURE
    client = stack.mlflow_client()
    assert not client.search_registered_models(), "a model was registered by a run that never finished"
    assert training.run_id in instance.event_log_storage.get_concurrency_info(TRAINING_POOL).active_run_ids

    # 4. The restarted daemon frees the slot (run monitoring) and retries the run (run retries), which
    #    trains and registers every model as a new version with `candidate`.
    stack.start_daemon()
    retry = wait_until(lambda: next((r for r in instance.get_runs(filters=dg.RunsFilter(
        tags={"dagster/parent_run_id": training.run_id}))), None), 120, "the restarted daemon to retry the run",
        on_timeout=diagnostics)
    assert retry.tags["dagster/retry_number"] == "1"
    finished = wait_until(lambda: (r := instance.get_run_by_id(retry.run_id)).is_finished and r, 300,
                          "the retried training run to finish", on_timeout=diagnostics)
    assert finished.status == dg.DagsterRunStatus.SUCCESS, diagnostics()
    assert training.run_id not in instance.event_log_storage.get_concurrency_info(TRAINING_POOL).active_run_ids
    pairs = latest_materialization(instance, "preference_pairs").asset_materialization.metadata
    for name in TRAINED:
        version = client.get_model_version_by_alias(name, "candidate")
        assert version.tags["lineage.dagster_run_id"] == retry.run_id
        assert version.tags["lineage.batches"] == good
        assert version.tags["lineage.dataset_version"] == pairs["dataset_version"].value

    # 5. The restarted daemon ingested the junk; its check failed and its rows are in the quarantine.
    junk = wait_until(lambda: verdict(instance, batch_key(instance, "junk.jsonl-")) is not None and
                      batch_key(instance, "junk.jsonl-"), 180, "the restarted daemon to ingest junk.jsonl",
                      on_timeout=diagnostics)
    assert verdict(instance, junk) is False
    junk_quarantine = latest_materialization(instance, "quarantine", junk).asset_materialization.metadata
    assert junk_quarantine["dagster/row_count"].value == 12
    assert junk_quarantine["counts_by_reason"].value.get("invalid_json") == 10
    summary = json.loads((stack.data_root / "batches" / junk / "summary.json").read_text())
    assert summary["accepted"] == 0 and summary["quarantined"] == summary["rows"] == 12

    # 6. It retrains nothing: the datasets rebuilt for the junk batch keep their data version, and a later
    #    automation tick requests no training.
    rebuilt = wait_until(lambda: (m := latest_materialization(instance, "preference_pairs")) and
                         junk in m.asset_materialization.metadata["batches_blocked_by_checks"].value and m, 180,
                         "the automation to rebuild the datasets, now seeing the junk batch's verdict",
                         on_timeout=diagnostics)
    rebuilt_meta = rebuilt.asset_materialization.metadata
    assert rebuilt_meta["dataset_version"].value == pairs["dataset_version"].value
    in_flight = dg.RunsFilter(statuses=[dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED,
                                         dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED])
    wait_until(lambda: not instance.get_runs(filters=in_flight), 180, "the runs in flight to finish",
               on_timeout=diagnostics)
    settled = time.time()
    wait_until(lambda: automation_ticks_after(instance, settled), 90, "an automation tick after everything settled",
               on_timeout=diagnostics)
    assert not instance.get_runs(filters=in_flight), "a tick after the junk batch requested more work"
    for name in TRAINED:
        assert {r.run_id for r in runs_of(instance, name)} == {training.run_id, retry.run_id}

    # 7. Nothing is half registered: one READY version per model, from the retry, each with its finished
    #    MLflow run and its lineage; the retry's staging folders are gone.
    for name in TRAINED:
        versions = client.search_model_versions(f"name = '{name}'")
        assert [v.version for v in versions] == ["1"], versions
        version = client.get_model_version(name, "1")  # (search results leave the aliases out)
        assert version.status == "READY" and version.aliases == ["candidate"]
        assert client.get_run(version.run_id).info.status == "FINISHED"
        assert version.tags["lineage.method"] and version.tags["storage.format"]
        assert not (stack.data_root / "runs" / name / retry.run_id / "model").exists(), "staging left behind"

    # 8. Run retention (deploy/prune_runs.py, dry run) would keep every run that holds current state: both
    #    ingestions (the junk one holds its batch's failed verdict), the datasets rebuild, the retried
    #    training run; it may delete the crashed run and the first datasets build, which the rebuild superseded.
    retention = prune_runs_module().prune(instance, days=0, dry_run=True)
    holders = {r.run_id for r in instance.get_runs() if r.tags.get("dagster/partition")} | {retry.run_id}
    assert holders <= set(retention["kept"]), retention
    assert not holders & set(retention["deleted"])

    # Structured logs: the services log one JSON object per line.
    lines = [line for line in stack.services["daemon"].log_path.read_text().splitlines() if line.startswith("{")]
    assert lines and all(json.loads(line).get("event") for line in lines[:20])

    # The loop is done. The stack stays up for the browser test, which only looks: without the daemon it idles
    # instead of ticking through the tests in between.
    stack.services["daemon"].stop()


def test_compose_file_deploys_every_service_healthy_on_loopback_with_secrets_from_env():
    """There is no Docker engine here: read deploy/docker-compose.yaml as compose would and check its promises."""
    import re

    import yaml

    compose = yaml.safe_load((DEPLOY / "docker-compose.yaml").read_text())  # resolves the `<<: *app` merges
    services = compose["services"]
    assert set(services) == {"postgres", "mlflow", "dagster-init", "code", "webserver", "webserver-readonly", "proxy",
                             "daemon", "retention"}
    one_shot = {name for name, service in services.items() if service.get("restart") == "no"}
    assert one_shot == {"dagster-init"}  # the migration: others wait for it to complete, not to be healthy
    for name, service in services.items():
        assert name in one_shot or service["healthcheck"]["test"], f"{name} has no health check"
        for dependency, condition in service.get("depends_on", {}).items():
            expected = "service_completed_successfully" if dependency in one_shot else "service_healthy"
            assert condition == {"condition": expected}, (name, dependency)

    # Only the proxy (operators, viewers) and MLflow are published, on the host's loopback unless BIND_ADDRESS says
    # otherwise: the webservers are reached through the proxy alone (tests/test_ui_proxy.py runs its config).
    published = {name: service["ports"] for name, service in services.items() if service.get("ports")}
    assert published == {"mlflow": ["${BIND_ADDRESS:-127.0.0.1}:${MLFLOW_PORT:-5000}:5000"],
                         "proxy": ["${BIND_ADDRESS:-127.0.0.1}:${DAGSTER_PORT:-3000}:3000",
                                   "${BIND_ADDRESS:-127.0.0.1}:${DAGSTER_VIEWER_PORT:-3001}:3001"]}
    example = dict(line.split("=", 1) for line in (DEPLOY / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert example["BIND_ADDRESS"] == "127.0.0.1" and example["POSTGRES_PASSWORD"] == ""
    assert example["DAGSTER_UI_PASSWORD"] == example["MLFLOW_PIPELINE_PASSWORD"] == ""
    proxy = services["proxy"]
    assert proxy["command"] == ["sh", "/etc/alignment-proxy/start.sh"] and "./proxy:/etc/alignment-proxy:ro" in \
        proxy["volumes"]
    assert proxy["environment"]["UI_OPERATOR_UPSTREAM"] == "webserver:3000"
    assert proxy["environment"]["UI_VIEWER_UPSTREAM"] == "webserver-readonly:3000"
    assert "--read-only" in services["webserver-readonly"]["command"]
    assert "--read-only" not in services["webserver"]["command"]

    # MLflow: its basic-auth app, no artifact proxy, the registry's artifacts mounted read-only; every Dagster
    # service logs in with the pipeline's account.
    mlflow = services["mlflow"]
    assert mlflow["command"][:4] == ["mlflow", "server", "--app-name", "basic-auth"]
    assert "--no-serve-artifacts" in mlflow["command"] and "--serve-artifacts" not in mlflow["command"]
    assert "data:/opt/dagster/data:ro" in mlflow["volumes"]
    assert mlflow["environment"]["MLFLOW_AUTH_CONFIG_PATH"] == "/opt/dagster/app/deploy/mlflow-auth.ini"
    for name in ("code", "webserver", "daemon", "retention"):
        assert services[name]["environment"]["MLFLOW_TRACKING_USERNAME"] == "${MLFLOW_PIPELINE_USER:-pipeline}"

    # Hygiene: every service has a memory limit, every image is pinned by digest (required variables that
    # deploy/pin-images.sh fills in), torch is pinned, the build context leaves secrets, backups and inboxes out.
    assert all(service.get("mem_limit") for service in services.values()), "a service without a memory limit"
    for name, variable in (("postgres", "POSTGRES_IMAGE"), ("proxy", "CADDY_IMAGE")):
        assert services[name]["image"].startswith(f"${{{variable}:?"), name
        assert f'"{variable}=' in (DEPLOY / "pin-images.sh").read_text()
    assert services["code"]["build"]["args"]["PYTHON_IMAGE"].startswith("${PYTHON_IMAGE:?")
    dockerfile = (DEPLOY.parent / "Dockerfile").read_text()
    assert "FROM ${PYTHON_IMAGE}" in dockerfile and '"torch==${TORCH_VERSION}"' in dockerfile
    assert "-p 127.0.0.1:3000:3000" in dockerfile and "-p 3000:3000" not in dockerfile
    ignored = set((DEPLOY.parent / ".dockerignore").read_text().split())
    assert {"deploy/.env", "deploy/backups", "deploy/inbox"} <= ignored

    # Secrets come from the environment: no literal password, and none is optional.
    for name, service in services.items():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|KEY|TOKEN", key):
                assert re.fullmatch(r"\$\{[A-Z_]+(:[?-][^}]*)?\}", str(value)), (name, key, value)
                assert "PASSWORD" not in key or ":?" in value, (name, key, "a password must be required")
    assert re.search(r"://\$\{POSTGRES_USER[^}]*\}:\$\{POSTGRES_PASSWORD\}@postgres:5432/mlflow",
                     services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"])
    instance = yaml.safe_load((DEPLOY / "dagster.postgres.yaml").read_text())
    assert all(isinstance(value, dict) and set(value) == {"env"}
               for key, value in instance["storage"]["postgres"]["postgres_db"].items() if key != "scheme")
    assert {"run_monitoring", "run_retries", "retention", "python_logs"} <= set(instance)
    assert instance["run_monitoring"]["enabled"] and instance["run_retries"]["enabled"]

    # The code location is its own gRPC server, built from the project's Dockerfile and named by workspace.yaml;
    # the webserver and the daemon load it from there; every Dagster service runs on the Postgres instance.
    assert {k: services["code"]["build"][k] for k in ("context", "dockerfile")} == {"context": "..",
                                                                                "dockerfile": "Dockerfile"}
    assert services["code"]["command"][:3] == ["dagster", "code-server", "start"]
    workspace = yaml.safe_load((DEPLOY / "workspace.yaml").read_text())
    assert workspace["load_from"][0]["grpc_server"]["host"] == {"env": "DAGSTER_CODE_SERVER_HOST"}
    for name in ("code", "webserver", "daemon", "retention", "dagster-init"):
        env = services[name]["environment"]
        assert env["DAGSTER_HOME"] == "/opt/dagster/production" and env["DAGSTER_PG_HOST"] == "postgres", name
    for name in ("webserver", "daemon"):
        assert "/opt/dagster/app/deploy/workspace.yaml" in services[name]["command"], name
    assert services["mlflow"]["command"][:2] == ["mlflow", "server"]
    assert set(compose["volumes"]) == {"pgdata", "data", "dagster-logs", "mlflow-auth"}
