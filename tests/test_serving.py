"""The champion served with traces: every answer is an MLflow trace tagged with the served version, feedback on it
comes back through the server's endpoint, and the server refuses what it must (bad requests, unknown traces, a
missing key, an open address without a key)."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from alignment_pipelines.flywheel import MODEL_NAME_TAG, MODEL_SOURCE_TAG, MODEL_VERSION_TAG, SERVED_TAG
from alignment_pipelines.layout import DataRoot
from alignment_pipelines.serving import ChampionServer, RefusedBinding, ServedModel
from served_champion import ServedChampion, register_champion, talkative_copy

KEY = "test-serving-key"


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("serving")
    uri = DataRoot(root).ensure().local_tracking_uri
    return uri, register_champion(uri, talkative_copy(tiny_model_dir, root / "champion")), root


@pytest.fixture(scope="module")
def served(registry):
    uri, _, root = registry
    with ServedChampion(uri, root / "logs", api_key=KEY) as server:
        yield server


AUTH = {"Authorization": f"Bearer {KEY}"}


def test_each_answer_is_a_trace_of_the_served_version(served, registry):
    uri, version, _ = registry
    status, reply = served.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Tell me of tea."}],
                                                         "max_tokens": 6}, AUTH)
    assert status == 200 and reply["object"] == "chat.completion" and reply["model"] == f"aligned_policy/{version}"
    answer = reply["choices"][0]["message"]
    assert answer["role"] == "assistant" and isinstance(answer["content"], str)
    trace = MlflowClient(uri).get_trace(reply["trace_id"])
    assert trace.info.tags[SERVED_TAG] == "true" and trace.info.tags[MODEL_NAME_TAG] == "aligned_policy"
    assert trace.info.tags[MODEL_VERSION_TAG] == version and trace.info.tags[MODEL_SOURCE_TAG] == "models:/sft_model/1"
    assert trace.data.spans[0].inputs["messages"] == [{"role": "user", "content": "Tell me of tea."}]
    assert trace.data.spans[0].outputs["choices"][0]["message"] == answer
    assert trace.info.experiment_id == MlflowClient(uri).get_experiment_by_name("alignment-pipelines").experiment_id


def test_feedback_through_the_endpoint_lands_on_the_trace(served, registry):
    uri = registry[0]
    first = served.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Owls?"}]}, AUTH)[1]
    second = served.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Owls?"}],
                                                  "max_tokens": 3}, AUTH)[1]  # greedy: a shorter answer differs
    other = served.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Salt?"}]}, AUTH)[1]
    assert served.post("/v1/feedback", {"trace_id": first["trace_id"], "thumbs": "down", "user": "ana"}, AUTH)[0] == 200
    assert served.post("/v1/feedback", {"trace_id": first["trace_id"], "preferred": "Owls hunt at night."},
                       AUTH)[0] == 200
    assert served.post("/v1/feedback", {"trace_id": first["trace_id"], "preferred_trace_id": second["trace_id"]},
                       AUTH)[0] == 200
    feedback = {(a.name, str(a.value), a.source.source_id)
                for a in MlflowClient(uri).get_trace(first["trace_id"]).info.assessments}
    second_answer = second["choices"][0]["message"]["content"]
    assert feedback == {("thumbs", "False", "ana"), ("preferred_answer", "Owls hunt at night.", "serving-endpoint"),
                        ("preferred_answer", second_answer, "serving-endpoint")}
    status, reply = served.post("/v1/feedback",
                                {"trace_id": first["trace_id"], "preferred_trace_id": other["trace_id"]}, AUTH)
    assert status == 400 and "another conversation" in reply["error"]["message"]
    status, reply = served.post("/v1/feedback", {"trace_id": first["trace_id"],
                                                 "preferred": first["choices"][0]["message"]["content"]}, AUTH)
    assert status == 400 and "the served answer itself" in reply["error"]["message"]


@pytest.mark.parametrize("path, body, status, message", [
    ("/v1/chat/completions", {"messages": []}, 400, "non-empty list"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "hi"}]}, 400, "end with a user turn"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, 400, "max_tokens"),
    ("/v1/chat/completions", b"{not json", 400, "not JSON"),
    ("/v1/feedback", {"trace_id": "tr-0000", "thumbs": "up"}, 404, "no answer served here"),
    ("/v1/feedback", {"trace_id": "tr-0000"}, 404, "no answer served here"),
    ("/v1/completions", {}, 404, "no route"),
])
def test_bad_requests_are_refused_with_a_reason(served, path, body, status, message):
    answered, reply = served.post(path, body, AUTH)
    assert answered == status and message in reply["error"]["message"]


def test_a_request_without_the_key_is_refused(served):
    status, reply = served.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
    assert status == 401 and "ALIGNMENT_PIPELINES_SERVE_API_KEY" in reply["error"]["message"]
    assert served.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]},
                       {"Authorization": "Bearer wrong"})[0] == 401


def test_an_open_address_needs_a_key():
    model = ServedModel(name="aligned_policy", version="1", source_uri=None, backend=None)
    with pytest.raises(RefusedBinding, match="refusing to serve on 0.0.0.0 without ALIGNMENT_PIPELINES_SERVE_API_KEY"):
        ChampionServer(("0.0.0.0", 0), model, "sqlite:///unused.db", "0")


def test_the_command_refuses_an_open_address_before_loading_anything(monkeypatch):
    from alignment_pipelines.serving import main

    monkeypatch.delenv("ALIGNMENT_PIPELINES_SERVE_API_KEY", raising=False)
    with pytest.raises(SystemExit, match="alignment-pipelines serve: refusing to serve on 0.0.0.0 without"):
        main(["--host", "0.0.0.0", "--tracking-uri", "http://127.0.0.1:9"])  # nothing listens there: never asked
