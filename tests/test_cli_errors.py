"""A user's mistake at the command line: one line on stderr naming it, exit 1 (could not be done) or 2 (a command
line asking for the impossible), no traceback; `--debug` shows the traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from alignment_pipelines.cli import default_dagster_home, main
from alignment_pipelines.data.demo import demo_feedback_path


def one_line_error(capsys, command: str) -> str:
    """The single stderr line of a failed command, checked to be the CLI's and free of a traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"alignment-pipelines {command}: "), err
    return lines[0]


def test_validate_names_a_missing_file(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "missing.jsonl")]) == 1
    assert "missing.jsonl: no such file" in one_line_error(capsys, "validate")


def test_validate_refuses_a_binary_file(tmp_path, capsys):
    binary = tmp_path / "weights.jsonl"
    binary.write_bytes(bytes(range(256)) * 40)
    assert main(["validate", str(binary)]) == 1
    assert "binary data" in one_line_error(capsys, "validate")


def test_validate_refuses_a_gate_out_of_range(tmp_path, capsys):
    assert main(["validate", str(demo_feedback_path()), "--max-quarantine-fraction", "1.5"]) == 2
    assert "between 0 and 1" in one_line_error(capsys, "validate")


def test_train_refuses_an_unknown_model_before_loading_anything(tmp_path, capsys):
    status = main(["train", "sft", "--model", "no-such-model", "--data", str(demo_feedback_path()),
                   "--output", str(tmp_path / "out"), "--model-store", str(tmp_path / "store")])
    assert status == 2
    assert "no-such-model" in one_line_error(capsys, "train")
    assert not (tmp_path / "out").exists()


def test_export_without_a_champion(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["export", "--tracking-uri", uri, str(tmp_path / "exported")]) == 1
    assert "no aligned_policy@champion in the registry" in one_line_error(capsys, "export")


def test_promote_refuses_a_gate_value_out_of_range(tmp_path, capsys):
    assert main(["promote", "--min-win-rate-lower-bound", "2"]) == 2
    assert "--min-win-rate-lower-bound must be in [0, 1], got 2.0" in one_line_error(capsys, "promote")


def test_train_says_when_no_pair_fits_max_length(tmp_path, capsys, tiny_model_dir):
    status = main(["train", "reward", "--model", str(tiny_model_dir), "--data", str(demo_feedback_path()),
                   "--output", str(tmp_path / "rm"), "--max-length", "8", "--max-steps", "1"])
    assert status == 2
    line = one_line_error(capsys, "train")
    assert "max_length=8" in line and "raise --max-length" in line
    assert not (tmp_path / "rm").exists()


def test_demo_outside_make_defaults_dagster_home_as_the_makefile_does(tmp_path, monkeypatch, capsys):
    import dagster as dg

    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")

    home = default_dagster_home()
    assert home == tmp_path / ".dagster_home" and os.environ["DAGSTER_HOME"] == str(home)
    assert (home / "dagster.yaml").read_text() == "telemetry:\n  enabled: false\n"
    with dg.DagsterInstance.get() as instance:  # what `demo` opens, which failed without DAGSTER_HOME
        assert instance.root_directory == str(home)
    assert "DAGSTER_HOME is not set" in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path):
    completed = subprocess.run([sys.executable, "-m", "alignment_pipelines.cli", "validate", "--debug",
                                str(tmp_path / "missing.jsonl")], capture_output=True, text=True)
    assert completed.returncode == 1
    assert "Traceback" in completed.stderr and "FeedbackFileError" in completed.stderr


def test_usage_errors_exit_2_and_version_prints_the_version():
    bad = subprocess.run([sys.executable, "-m", "alignment_pipelines.cli", "validate"], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage: alignment-pipelines validate" in bad.stderr
    version = subprocess.run([sys.executable, "-m", "alignment_pipelines.cli", "--version"], capture_output=True,
                             text=True, check=True)
    from importlib.metadata import version as installed

    assert version.stdout.strip() == f"alignment-pipelines {installed('alignment-pipelines')}"


def test_a_defect_keeps_its_traceback():
    from alignment_pipelines.cli import UsageError, exit_status
    from alignment_pipelines.methods import ConfigError
    from alignment_pipelines.methods.training import TrainingDiverged

    assert exit_status(KeyError("y")) is None and exit_status(json.JSONDecodeError("x", "", 0)) is None
    assert exit_status(UsageError("z")) == 2 and exit_status(ConfigError("max_steps", 0, "must be >= 1")) == 2
    assert exit_status(TrainingDiverged("orpo: training left non-finite values in w")) == 1  # the data's or the rate's


def test_ctrl_c_ends_with_one_line_and_status_130(monkeypatch, capsys):
    import alignment_pipelines.cli as cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "default_data_root", interrupted)  # Ctrl-C while the command works
    assert main(["where", "root"]) == 130
    assert one_line_error(capsys, "where") == "alignment-pipelines where: interrupted"


def test_validate_writes_nothing_into_the_inbox(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ALIGNMENT_PIPELINES_HOME", str(tmp_path))
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "batch.jsonl").write_bytes(demo_feedback_path().read_bytes())
    assert main(["validate", str(inbox / "batch.jsonl")]) == 2
    assert "give --output-dir" in one_line_error(capsys, "validate")
    assert [p.name for p in inbox.iterdir()] == ["batch.jsonl"]  # the sensor would take any output as a batch
