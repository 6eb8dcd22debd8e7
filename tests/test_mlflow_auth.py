"""The MLflow server as compose runs it: its basic-auth app (deploy/mlflow-auth.ini), no artifact proxy. A real
`mlflow server --app-name basic-auth` on 127.0.0.1: anonymous requests and wrong passwords are refused, a user
without a grant cannot move the champion's alias, the pipeline's account works through the ordinary client."""

from __future__ import annotations

import importlib.util
import os

import pytest
import requests

from tests.production_services import BIN, DEPLOY, Service, free_port, http_ok, require

PIPELINE = ("pipeline", "pipeline-password-1")
SEARCH = "/api/2.0/mlflow/experiments/search"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require(importlib.util.find_spec("flask_wtf") is not None, "MLflow's basic-auth app needs Flask-WTF (mlflow[auth])")
    work = tmp_path_factory.mktemp("mlflow_auth")
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")} | {
        "MLFLOW_AUTH_CONFIG_PATH": str(DEPLOY / "mlflow-auth.ini"),
        "MLFLOW_AUTH_ADMIN_USERNAME": PIPELINE[0], "MLFLOW_AUTH_ADMIN_PASSWORD": PIPELINE[1],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret-key", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    service = Service("mlflow", [str(BIN / "mlflow"), "server", "--app-name", "basic-auth",
                                 "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}",
                                 "--default-artifact-root", str(work / "artifacts"), "--no-serve-artifacts",
                                 "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                      work / "logs", env, cwd=work)
    uri = f"http://127.0.0.1:{port}"
    try:
        service.start().wait_ready(lambda: http_ok(f"{uri}/health"), timeout=180)
        yield uri
    finally:
        service.stop()


def test_anonymous_and_wrong_passwords_are_refused(server):
    assert requests.get(f"{server}{SEARCH}", params={"max_results": 1}, timeout=30).status_code == 401
    assert requests.get(f"{server}{SEARCH}", params={"max_results": 1}, auth=(PIPELINE[0], "wrong"),
                        timeout=30).status_code == 401
    assert requests.get(f"{server}/", timeout=30).status_code == 401  # the UI too


def test_the_pipeline_account_works_and_others_cannot_move_the_alias(server, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", PIPELINE[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PIPELINE[1])
    client = MlflowClient(tracking_uri=server, registry_uri=server)
    experiment = client.create_experiment("alignment-pipelines")
    run = client.create_run(experiment)
    client.create_registered_model("policy")
    for _ in range(2):
        client.create_model_version("policy", source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    client.set_registered_model_alias("policy", "champion", "1")

    # Someone with an account but no grant: default_permission is NO_PERMISSIONS.
    reply = requests.post(f"{server}/api/2.0/mlflow/users/create", auth=PIPELINE, timeout=30,
                          json={"username": "reader", "password": "reader-password-3"})
    assert reply.status_code == 200, reply.text
    alias = {"name": "policy", "alias": "champion", "version": "2"}
    for auth in (None, ("reader", "reader-password-3")):
        moved = requests.post(f"{server}/api/2.0/mlflow/registered-models/alias", json=alias, auth=auth, timeout=30)
        assert moved.status_code in (401, 403), (auth, moved.status_code)
    assert client.get_model_version_by_alias("policy", "champion").version == "1"
    assert requests.get(f"{server}{SEARCH}", params={"max_results": 10}, auth=("reader", "reader-password-3"),
                        timeout=30).json().get("experiments", []) == []  # no grant: not even a name
