"""The command line: the same code the assets run, callable by users and GPU workers."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from safetensors import safe_open

from alignment_pipelines.cli import BLOCKED, main
from alignment_pipelines.data.demo import demo_feedback_path


def _feedback_with_two_bad_rows(tmp_path):
    source = tmp_path / "feedback.jsonl"
    lines = demo_feedback_path().read_text().splitlines()[:10]
    source.write_text("\n".join(lines + ['{"prompt": "x", "chosen": "same", "rejected": "same"}', "{oops"]) + "\n")
    return source


def test_validate_streams_both_sides_to_parquet_with_the_gates_verdict(tmp_path, capsys):
    source = _feedback_with_two_bad_rows(tmp_path)

    assert main(["validate", str(source), "--output-dir", str(tmp_path / "out")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == 12 and summary["accepted"] == 10 and summary["quarantined"] == 2
    assert summary["by_reason"] == {"identical_pair": 1, "invalid_json": 1}
    assert summary["gate"]["passed"] and summary["gate"]["quarantine_fraction"] == round(2 / 12, 4)
    accepted = pq.read_table(tmp_path / "out" / "feedback.jsonl.accepted.parquet")
    quarantined = pq.read_table(tmp_path / "out" / "feedback.jsonl.quarantine.parquet")
    assert accepted.num_rows == 10 and sorted(quarantined.column("row").to_pylist()) == [11, 12]
    assert summary["outputs"]["accepted"].endswith("feedback.jsonl.accepted.parquet")


def test_validate_writes_json_lines_on_request(tmp_path, capsys):
    source = _feedback_with_two_bad_rows(tmp_path)

    assert main(["validate", str(source), "--format", "jsonl"]) == 0
    quarantined = [json.loads(l) for l in (tmp_path / "feedback.jsonl.quarantine.jsonl").read_text().splitlines()]
    assert sorted((q["row"], q["reason"]) for q in quarantined) == [(11, "identical_pair"), (12, "invalid_json")]
    accepted = [json.loads(l) for l in (tmp_path / "feedback.jsonl.accepted.jsonl").read_text().splitlines()]
    assert len(accepted) == 10 and accepted[0]["prompt"][0]["role"] == "user"
    assert not list(tmp_path.glob(".*")), "the Parquet scratch folder is removed"


def test_validate_exits_non_zero_on_a_batch_the_gate_blocks(tmp_path, capsys):
    source = _feedback_with_two_bad_rows(tmp_path)

    assert main(["validate", str(source), "--max-quarantine-fraction", "0.1"]) == BLOCKED
    captured = capsys.readouterr()
    assert json.loads(captured.out)["gate"]["passed"] is False
    assert "the gate blocks this batch" in captured.err and "expect_quarantine_fraction_to_be_at_most" in captured.err


def test_validate_takes_the_layout(tmp_path, capsys):
    source = tmp_path / "hh.jsonl"
    source.write_text(json.dumps({"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello!",
                                  "rejected": "\n\nHuman: Hi?\n\nAssistant: Go away."}) + "\n")

    assert main(["validate", str(source), "--layout", "hh-rlhf"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["layout"], summary["accepted"]) == ("hh-rlhf", 1)


@pytest.mark.parametrize("command", [[], ["validate"], ["evaluate"], ["submit"], ["train"], ["promote"], ["rollback"],
                                     ["export"], ["serve"], ["where"], ["demo"]])
def test_every_command_explains_itself(command):
    out = subprocess.run([sys.executable, "-m", "alignment_pipelines.cli", *command, "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "usage: alignment-pipelines" in out


def test_train_from_the_command_line_with_the_tiny_model(tmp_path):
    output = tmp_path / "sft"
    completed = subprocess.run(
        [sys.executable, "-m", "alignment_pipelines.cli", "train", "sft", "--model", "tiny-random",
         "--data", str(demo_feedback_path()), "--output", str(output), "--max-steps", "3",
         "--learning-rate", "1e-3", "--lora-output", "merged", "--model-store", str(tmp_path / "store")],
        capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr[-3000:]
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["method"] == "sft"
    saved = json.loads((output / "alignment_config.json").read_text())
    assert (saved["max_steps"], saved["learning_rate"], saved["lora_output"]) == (3, 1e-3, "merged")
    assert saved["disable_tqdm"] is True and "it/s]" not in completed.stderr  # no bars in a pipe
    with safe_open(str(output / "model.safetensors"), "pt") as weights:
        assert not any("lora" in k for k in weights.keys())  # merged: loads without PEFT


def test_unknown_method_fails_before_loading_anything(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "alignment_pipelines.cli", "train", "ppo-typo", "--model", "tiny-random",
         "--data", "x.jsonl", "--output", str(tmp_path / "o")], capture_output=True, text=True)
    assert completed.returncode != 0
    assert "ppo-typo" in completed.stderr and "sft" in completed.stderr


def test_submit_puts_a_whole_file_in_the_inbox(tmp_path, capsys):
    inbox = tmp_path / "inbox"
    assert main(["submit", str(demo_feedback_path()), "--inbox", str(inbox)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (inbox / "feedback.jsonl").read_bytes() == demo_feedback_path().read_bytes()
    assert out["batch_key"].startswith("feedback.jsonl-")
    assert not list(inbox.glob("*.part"))
