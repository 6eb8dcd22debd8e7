"""A tiny champion in an MLflow registry and `alignment_pipelines.serving` serving it on 127.0.0.1 (a real process),
for the serving and flywheel tests."""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

from production_services import BIN, Service, free_port, http_ok

from alignment_pipelines.promotion import ALIGNED_MODEL, SOURCE_URI_TAG
from alignment_pipelines.tracking import CHAMPION_ALIAS, Lineage, Tracker

EVALUATED_ACCURACY = "0.8"  # the champion's held-out preference accuracy, recorded as promotion records it


def talkative_copy(model_dir: Path, target: Path) -> Path:
    """A copy of the tiny random model that never generates a blank or undecodable token (EOS aside): the random
    model greedily repeats a newline, a blank answer that validation quarantines."""
    from alignment_pipelines.models.loading import load_causal_lm

    shutil.copytree(model_dir, target)
    model, tokenizer = load_causal_lm(target)
    model.generation_config.suppress_tokens = [
        token for token in range(len(tokenizer)) if token != tokenizer.eos_token_id
        and (not tokenizer.decode([token]).strip() or "\ufffd" in tokenizer.decode([token]))]
    model.generation_config.save_pretrained(target)
    return target


def register_champion(tracking_uri: str, model_dir: Path) -> str:
    """``model_dir`` registered as `sft_model` and seated as `aligned_policy@champion` (tagged as promotion tags
    it, without a start model, so the watch scores by log-probability alone); the aligned version."""
    tracker = Tracker(tracking_uri)
    run_id = tracker.start_run("champion")
    registered = tracker.register_model(run_id, model_dir, "sft_model",
                                        Lineage(method="sft", base_model="tiny", dataset_version="v1"))
    tracker.end_run(run_id, succeeded=True)
    client = tracker.client
    client.create_registered_model(ALIGNED_MODEL)
    source = client.get_model_version("sft_model", registered.version)
    version = client.create_model_version(ALIGNED_MODEL, source.source, run_id=run_id, tags={
        SOURCE_URI_TAG: f"models:/sft_model/{registered.version}", "eval.preference_accuracy": EVALUATED_ACCURACY})
    client.set_registered_model_alias(ALIGNED_MODEL, CHAMPION_ALIAS, version.version)
    return str(version.version)


class ServedChampion:
    """``python -m alignment_pipelines.serving`` on a free port of 127.0.0.1, logging under ``log_dir``."""

    def __init__(self, tracking_uri: str, log_dir: Path, api_key: str | None = None):
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if k != "ALIGNMENT_PIPELINES_SERVE_API_KEY"}
        env |= {"ALIGNMENT_PIPELINES_SERVE_API_KEY": api_key} if api_key else {}
        self.service = Service("serving", [str(BIN / "python"), "-m", "alignment_pipelines.serving",
                                           "--port", str(self.port), "--tracking-uri", tracking_uri], log_dir, env=env)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "ServedChampion":
        self.service.start().wait_ready(lambda: http_ok(f"{self.url}/health"), timeout=120)
        return self

    def __exit__(self, *exc) -> None:
        self.service.stop()

    def post(self, path: str, body: dict | bytes, headers: dict | None = None) -> tuple[int, dict]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url}{path}", data=data, method="POST",
                                         headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=60) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def chat(self, content: str, max_tokens: int = 8) -> dict:
        status, reply = self.post("/v1/chat/completions",
                                  {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens})
        assert status == 200, reply
        return reply
