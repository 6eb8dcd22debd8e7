"""Secrets and infrastructure are bound by the deployment, not by a run's config: through real Dagster runs, a run
config that names another key variable, points the judge outside the allow-list, or redirects the data root, the
tracking URI or the training worker is refused, and no request reaches the other endpoint (a real HTTP server on
this machine records every request). The OpenAI-compatible judge is switched on by environment variables alone."""

from __future__ import annotations

import json
import socket

import dagster as dg
import pytest
import requests

from alignment_pipelines.definitions import build_resources
from alignment_pipelines.judges.endpoints import (JUDGE_ALLOWED_HOSTS_ENV, JUDGE_API_KEY_ENV, EndpointNotAllowed,
                                                  check_endpoint)
from alignment_pipelines.resources.judge import JudgeResource
from tests.chat_completions import ChatCompletionsHandler, ChatCompletionsServer

TEA = [{"role": "user", "content": "How do I make green tea?"}]
PG_PASSWORD = "pg-password-never-sent"
JUDGE_KEY = "judge-key-123"


class RecordingServer(ChatCompletionsServer):
    """Records every request (path, headers, body) and answers "A"."""

    def __init__(self, host: str = "127.0.0.1"):
        super().__init__(host)
        self.received: list[dict] = []

    def answer(self, handler: ChatCompletionsHandler, body: dict) -> None:
        with self.lock:
            self.received.append({"path": handler.path, "headers": dict(handler.headers), "body": body})
        choice = {"index": 0, "message": {"role": "assistant", "content": "A"}, "finish_reason": "stop"}
        handler.send(200, json.dumps({"object": "chat.completion", "choices": [choice]}).encode())


@pytest.fixture
def judge_env(monkeypatch, tmp_path):
    """A production-like environment: the Postgres password beside the judge's key, no allow-listed hosts."""
    for name in ("ALIGNMENT_PIPELINES_JUDGE", "ALIGNMENT_PIPELINES_JUDGE_BASE_URL", "ALIGNMENT_PIPELINES_JUDGE_MODEL",
                 "ALIGNMENT_PIPELINES_JUDGE_INSTRUCTION", JUDGE_ALLOWED_HOSTS_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", PG_PASSWORD)
    monkeypatch.setenv(JUDGE_API_KEY_ENV, JUDGE_KEY)
    return monkeypatch


@pytest.fixture(scope="module")
def instance():
    """One Dagster instance for the module's runs (each costs seconds to create)."""
    with dg.instance_for_test() as dagster_instance:
        yield dagster_instance


@pytest.fixture
def judge_server():
    with RecordingServer() as server:
        yield server


@pytest.fixture
def foreign_server():
    """A server reached by this machine's host name: not a loopback literal, so not allowed as a judge endpoint."""
    with RecordingServer(socket.gethostname()) as server:
        yield server


@dg.asset
def judged(judge: JudgeResource) -> str:
    """One pair judged by the deployment's judge."""
    (verdict,) = judge.build().judge([TEA], ["Steep it for two minutes."], ["Boil it for an hour."])
    return verdict.preferred


def judge_run(instance, judge: JudgeResource, run_config: dict | None = None) -> dg.ExecuteInProcessResult:
    return dg.materialize([judged], resources={"judge": judge}, run_config=run_config or {}, instance=instance,
                          raise_on_error=False)


def test_the_openai_judge_is_switched_on_by_environment_alone(instance, judge_env, judge_server, tmp_path):
    judge_env.setenv("ALIGNMENT_PIPELINES_JUDGE", "openai")
    judge_env.setenv("ALIGNMENT_PIPELINES_JUDGE_BASE_URL", judge_server.base_url)
    judge_env.setenv("ALIGNMENT_PIPELINES_JUDGE_MODEL", "judge-model")
    judge_env.setenv("ALIGNMENT_PIPELINES_JUDGE_INSTRUCTION", "helpful and very short")
    result = judge_run(instance, build_resources(data_root=tmp_path)["judge"])
    assert result.success and result.output_for_node("judged") == "tie"  # "A" in both orders: a position, no answer
    assert len(judge_server.received) == 2
    for request in judge_server.received:
        assert request["path"] == "/v1/chat/completions"
        assert request["headers"]["Authorization"] == f"Bearer {JUDGE_KEY}"
        assert request["body"]["model"] == "judge-model"
        assert "helpful and very short" in request["body"]["messages"][0]["content"]


def test_run_config_cannot_name_the_key_variable(instance, judge_env, judge_server):
    judge = JudgeResource(kind="openai", base_url=judge_server.base_url, model="judge-model")
    with pytest.raises(dg.DagsterInvalidConfigError, match='unexpected config entry "api_key_env"'):
        judge_run(instance, judge, {"resources": {"judge": {"config": {
            "kind": "openai", "base_url": judge_server.base_url, "model": "judge-model",
            "api_key_env": "DAGSTER_PG_PASSWORD"}}}})
    assert judge_server.received == []
    assert judge_run(instance, judge).success  # the same judge without the override: the key is the judge's own
    assert {r["headers"]["Authorization"] for r in judge_server.received} == {f"Bearer {JUDGE_KEY}"}
    assert PG_PASSWORD not in json.dumps(judge_server.received)


def test_run_config_cannot_point_the_judge_outside_the_allow_list(instance, judge_env, judge_server,
                                                                   foreign_server):
    judge = JudgeResource(kind="openai", base_url=judge_server.base_url, model="judge-model")
    requests.post(f"{foreign_server.base_url}/chat/completions", json={"messages": [{"content": "probe"}]}, timeout=5)
    assert len(foreign_server.received) == 1  # the foreign endpoint is reachable: only the refusal stops the judge
    for url in (foreign_server.base_url, f"https://{foreign_server.host}:{foreign_server.server_address[1]}/v1"):
        config = {"kind": "openai", "base_url": url, "model": "judge-model"}
        result = judge_run(instance, judge, {"resources": {"judge": {"config": config}}})
        assert not result.success
        failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
        error = failure.step_failure_data.error.to_string()
        assert "EndpointNotAllowed" in error and url in error
    assert len(foreign_server.received) == 1 and judge_server.received == []


BOUND_OVERRIDES = [("storage", {"root": "/tmp/elsewhere"}), ("mlflow", {"tracking_uri": "http://attacker.example/"}),
                   ("base_model", {"allow_hub": True}), ("launcher", {"image": "attacker/worker:latest"}),
                   ("launcher", {"env_from_secrets": ["postgres-credentials"]}), ("launcher", {"python": "/bin/sh"}),
                   ("launcher", {"env": {"LD_PRELOAD": "/data/inbox/evil.so"}})]


def test_run_config_cannot_redirect_infrastructure(instance, monkeypatch, tmp_path):
    monkeypatch.setenv("ALIGNMENT_PIPELINES_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("ALIGNMENT_PIPELINES_K8S_IMAGE", "registry.example.com/worker@sha256:" + "0" * 64)
    monkeypatch.setenv("ALIGNMENT_PIPELINES_K8S_ENV_FROM_SECRETS", "mlflow-credentials")
    resources = build_resources(deployment="k8s")

    @dg.asset(required_resource_keys={"storage", "mlflow", "base_model", "launcher"})
    def bound(context) -> dict:
        launcher = context.resources.launcher
        return {"root": context.resources.storage.root, "uri": context.resources.mlflow.tracking_uri,
                "image": launcher.image, "secrets": launcher.env_from_secrets}

    runs_before = instance.get_runs_count()
    for resource, override in BOUND_OVERRIDES:
        with pytest.raises(dg.DagsterInvalidConfigError, match=f'unexpected config entry "{next(iter(override))}"'):
            dg.materialize([bound], resources=resources, instance=instance,
                           run_config={"resources": {resource: {"config": override}}})
    assert instance.get_runs_count() == runs_before  # refused before any run was created
    result = dg.materialize([bound], resources=resources, instance=instance)
    assert result.output_for_node("bound") == {
        "root": str(tmp_path), "uri": "http://mlflow:5000",
        "image": "registry.example.com/worker@sha256:" + "0" * 64, "secrets": ["mlflow-credentials"]}


def test_the_endpoint_rules(monkeypatch):
    monkeypatch.setenv(JUDGE_ALLOWED_HOSTS_ENV, "api.judge.example, vllm.internal:8443")
    for allowed in ("http://127.0.0.1:8000/v1", "http://localhost:8000/v1", "http://[::1]:8000/v1",
                    "https://api.judge.example/v1", "https://vllm.internal:8443/v1"):
        assert check_endpoint(allowed) == allowed
    for refused, rule in (("http://api.judge.example/v1", "only loopback may be plain http"),
                          ("https://attacker.example/v1", "not in ALIGNMENT_PIPELINES_JUDGE_ALLOWED_HOSTS"),
                          ("https://vllm.internal:9000/v1", "'vllm.internal:9000' is not in"),
                          ("https://localhost.attacker.example/v1", "is not in"),
                          ("https://user:pw@api.judge.example/v1", "credentials in the URL"),
                          ("ftp://127.0.0.1/v1", "http(s) URL"), ("", "http(s) URL")):
        with pytest.raises(EndpointNotAllowed, match=rule.replace("(", r"\(").replace(")", r"\)")):
            check_endpoint(refused)


def test_a_judge_spec_cannot_name_another_key_variable(judge_server):
    """Online DPO's annotator is built from its config by build_judge: the same refusal applies there."""
    from alignment_pipelines.judges import build_judge

    spec = {"kind": "openai", "base_url": judge_server.base_url, "model": "annotator"}
    with pytest.raises(ValueError, match=f"cannot name the variable its key is read from.*{JUDGE_API_KEY_ENV}"):
        build_judge(spec | {"api_key_env": "DAGSTER_PG_PASSWORD"})
    with pytest.raises(EndpointNotAllowed, match="only loopback may be plain http"):
        build_judge(spec | {"base_url": "http://attacker.example/v1"})
    assert judge_server.received == []
