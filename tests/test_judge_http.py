"""The OpenAI-compatible judge against a real HTTP server on 127.0.0.1 whose faults each test scripts."""

from __future__ import annotations

import json
import math
import time

import pytest

from alignment_pipelines.judges import JudgeError, OpenAICompatibleJudge, agreement_stats
from alignment_pipelines.judges.endpoints import JUDGE_API_KEY_ENV
from tests.chat_completions import ChatCompletionsHandler, ChatCompletionsServer

TEA = [{"role": "user", "content": "How do I make green tea?"}]
SLOW_REPLY_S = 1.0  # how long a "timeout" fault stalls; the judges below time out well before
CLIENT_TIMEOUT_S = 0.3


class ScriptedServer(ChatCompletionsServer):
    """Speaks OpenAI chat completions. The judge is asked about answers; the server says "A" when
    Answer A contains GOOD, else "B". ``faults[marker]`` lists faults for the next requests whose
    prompt contains ``marker``: "timeout", "500", "401", "malformed", "not_json" or "disconnect"."""

    def __init__(self):
        super().__init__()
        self.faults: dict[str, list[str]] = {}
        self.logprobs = False
        self.delay_s = 0.0
        self.received: list[dict] = []
        self.in_flight = self.peak_in_flight = 0

    def next_fault(self, text: str) -> str | None:
        with self.lock:
            for marker, faults in self.faults.items():
                if marker in text and faults:
                    return faults.pop(0)
        return None

    def answer(self, handler: ChatCompletionsHandler, body: dict) -> None:
        text = body["messages"][0]["content"]
        with self.lock:
            self.received.append({"path": handler.path, "headers": dict(handler.headers), "body": body,
                                  "time": time.monotonic()})
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            time.sleep(self.delay_s)
            self.reply(handler, self.next_fault(text), text)
        finally:
            with self.lock:
                self.in_flight -= 1

    def reply(self, handler: ChatCompletionsHandler, fault: str | None, text: str) -> None:
        if fault == "disconnect":
            handler.close_connection = True
            return
        if fault == "timeout":
            time.sleep(SLOW_REPLY_S)
        if fault in ("500", "401"):
            return handler.send(int(fault), b'{"error": {"message": "scripted failure"}}')
        if fault == "not_json":
            return handler.send(200, b"<html>gateway hiccup</html>")
        content = "I cannot decide." if fault == "malformed" else None
        answer_a = text.split("[Answer A]")[1].split("[Answer B]")[0]
        letter = "A" if "GOOD" in answer_a else "B"
        choice = {"index": 0, "message": {"role": "assistant", "content": content or letter}, "finish_reason": "stop"}
        if self.logprobs and content is None:
            other = "B" if letter == "A" else "A"
            choice["logprobs"] = {"content": [{"token": letter, "logprob": math.log(0.8), "top_logprobs": [
                {"token": letter, "logprob": math.log(0.8)}, {"token": other, "logprob": math.log(0.15)}]}]}
        handler.send(200, json.dumps({"object": "chat.completion", "choices": [choice]}).encode())


@pytest.fixture
def server():
    with ScriptedServer() as srv:
        yield srv


def make_judge(server, **overrides) -> OpenAICompatibleJudge:
    params = dict(model="judge-model", instruction="helpful and very short", timeout_s=CLIENT_TIMEOUT_S,
                  max_retries=3, backoff_s=0.01, max_concurrency=4)
    return OpenAICompatibleJudge(server.base_url, **(params | overrides))


def test_end_to_end_with_bearer_key_from_env(server, monkeypatch):
    monkeypatch.setenv(JUDGE_API_KEY_ENV, "test-key")
    judge = make_judge(server)
    verdicts = judge.judge([TEA] * 3, ["GOOD: steep it", "bad", "bad"], ["bad", "GOOD: steep it", "also bad"])
    assert [v.preferred for v in verdicts] == ["a", "b", "tie"]  # the last pair: "B" in both orders
    assert verdicts[0].raw == ("A", "B") and verdicts[0].confidence == 1.0
    assert agreement_stats(verdicts)["position_bias_rate"] == pytest.approx(1 / 3)
    assert len(server.received) == 6
    for request in server.received:
        assert request["path"] == "/v1/chat/completions"
        assert request["headers"]["Authorization"] == "Bearer test-key"
        assert request["body"]["model"] == "judge-model"
        assert request["body"]["logprobs"] is True
        assert "helpful and very short" in request["body"]["messages"][0]["content"]
    assert "test-key" not in judge.id and "test-key" not in repr(vars(judge))


def test_no_key_in_env_sends_no_authorization(server, monkeypatch):
    monkeypatch.delenv(JUDGE_API_KEY_ENV, raising=False)
    make_judge(server, logprobs=False).judge([TEA], ["GOOD"], ["bad"])
    assert all("Authorization" not in r["headers"] for r in server.received)
    assert all("logprobs" not in r["body"] for r in server.received)


def test_logprobs_give_the_confidence(server):
    server.logprobs = True
    (verdict,) = make_judge(server).judge([TEA], ["GOOD"], ["bad"])
    assert verdict.preferred == "a"
    assert verdict.confidence == pytest.approx(0.8 / 0.95)


@pytest.mark.parametrize("faults", [["timeout"], ["500"], ["malformed"], ["not_json"], ["disconnect"],
                                    ["timeout", "500", "malformed"]], ids="+".join)
def test_transient_faults_are_retried_then_succeed(server, faults):
    server.faults = {"FLAKY": list(faults)}
    verdicts = make_judge(server).judge([TEA, TEA], ["GOOD", "FLAKY bad"], ["bad", "GOOD"])
    assert [v.preferred for v in verdicts] == ["a", "b"]
    assert server.faults == {"FLAKY": []}
    assert len(server.received) == 4 + len(faults)


@pytest.mark.parametrize("fault, reason", [("500", "HTTP 500"), ("timeout", "Timeout"),
                                           ("malformed", "malformed reply: no letter A or B")])
def test_persistent_failure_raises_naming_the_request(server, fault, reason):
    server.faults = {"BROKEN": [fault] * 50}
    judge = make_judge(server, max_retries=2, backoff_s=0.05, max_concurrency=1)
    with pytest.raises(JudgeError) as caught:
        judge.judge([TEA, TEA], ["GOOD", "BROKEN"], ["bad", "GOOD"])
    message = str(caught.value)
    assert "pair 1 in order (a, b)" in message
    assert f"{server.base_url}/chat/completions" in message and "3 attempts" in message and reason in message
    assert (caught.value.pair, caught.value.order, caught.value.request_index) == (1, "(a, b)", 1)
    # Request 0 once, request 1 three times, then the batch stops: the rest are never sent.
    assert len(server.received) == 4
    arrivals = [r["time"] for r in server.received[1:]]
    gaps = [later - earlier for earlier, later in zip(arrivals, arrivals[1:])]
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1  # exponential backoff


def test_client_errors_are_not_retried(server):
    server.faults = {"BROKEN": ["401"] * 50}
    with pytest.raises(JudgeError, match="refused: HTTP 401") as caught:
        make_judge(server, max_concurrency=1).judge([TEA], ["BROKEN"], ["GOOD"])
    assert caught.value.pair == 0 and len(server.received) == 1


def test_concurrency_is_bounded(server):
    server.delay_s = 0.05
    verdicts = make_judge(server, max_concurrency=2).judge([TEA] * 5, ["GOOD"] * 5, ["bad"] * 5)
    assert [v.preferred for v in verdicts] == ["a"] * 5
    assert len(server.received) == 10 and server.peak_in_flight == 2
