"""Smoke test: `dagster dev` finds the code location with no flags and serves every asset."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from alignment_pipelines.methods import METHODS

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
EXPECTED = {"raw_feedback", "validated_feedback", "quarantine", "preference_pairs", "binary_feedback", "prompts",
            "evaluation_reward_model", "evaluation_report", "model_promotion", "ai_feedback", "storage_retention",
            "champion_watch"} | {
                spec.asset for spec in METHODS.values()}
QUERY = "{ assetNodes { assetKey { path } } }"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dagster_dev_serves_the_asset_graph(tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copyfile(ROOT / "dagster.yaml", home / "dagster.yaml")
    port = _free_port()
    env = os.environ | {"DAGSTER_HOME": str(home), "ALIGNMENT_PIPELINES_HOME": str(tmp_path / "data"),
                        "ALIGNMENT_PIPELINES_BASE_MODEL": "tiny-random"}
    dagster = Path(sys.executable).with_name("dagster")
    process = subprocess.Popen([str(dagster), "dev", "--host", "127.0.0.1", "--port", str(port)],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        names, deadline = set(), time.monotonic() + 240
        while time.monotonic() < deadline and names != EXPECTED:
            assert process.poll() is None, process.stdout.read().decode(errors="replace")[-3000:]
            try:
                reply = requests.post(f"http://127.0.0.1:{port}/graphql", json={"query": QUERY}, timeout=10)
                nodes = reply.json().get("data", {}).get("assetNodes") or []
                names = {"/".join(n["assetKey"]["path"]) for n in nodes}
            except (requests.ConnectionError, requests.Timeout, ValueError):
                pass
            time.sleep(2)
        assert names == EXPECTED
    finally:
        os.killpg(process.pid, 15)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
