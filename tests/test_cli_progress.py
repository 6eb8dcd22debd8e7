"""Progress bars: on stderr for a person at a terminal; none in pipes, log files or CI."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios

import pytest


def progress_wanted_in_child(stderr_is_terminal: bool, ci: str | None) -> bool:
    env = {k: v for k, v in os.environ.items() if k != "CI"} | ({"CI": ci} if ci is not None else {})
    leader, follower = pty.openpty()
    try:
        completed = subprocess.run(
            [sys.executable, "-c", "from alignment_pipelines.progress import progress_wanted as w; print(w())"],
            stdout=subprocess.PIPE, stderr=follower if stderr_is_terminal else subprocess.PIPE, env=env, text=True,
            check=True)
    finally:
        os.close(leader)
        os.close(follower)
    return completed.stdout.strip() == "True"


@pytest.mark.parametrize(("terminal", "ci", "wanted"), [(True, None, True), (False, None, False),
                                                         (True, "true", False), (True, "", True)])
def test_bars_only_at_a_terminal_outside_ci(terminal, ci, wanted):
    assert progress_wanted_in_child(terminal, ci) is wanted


def validate_stderr(tmp_path, stderr_is_terminal: bool) -> str:
    """What `alignment-pipelines validate` writes on stderr, a terminal or a pipe, outside CI."""
    from alignment_pipelines.data.demo import demo_feedback_path

    env = {k: v for k, v in os.environ.items() if k != "CI"}
    command = [sys.executable, "-m", "alignment_pipelines.cli", "validate", str(demo_feedback_path()),
               "--output-dir", str(tmp_path / ("terminal" if stderr_is_terminal else "pipe"))]
    if not stderr_is_terminal:
        return subprocess.run(command, capture_output=True, env=env, text=True, check=True).stderr
    leader, follower = pty.openpty()
    try:
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # a new pty is 0 columns wide
        subprocess.run(command, stdout=subprocess.PIPE, stderr=follower, env=env, check=True)
        os.close(follower)
        written = b""
        while True:
            try:
                data = os.read(leader, 1 << 16)
            except OSError:  # the terminal is closed at both ends: all was read
                break
            if not data:
                break
            written += data
    finally:
        os.close(leader)
    return written.decode(errors="replace")


def test_validate_draws_its_rows_bar_at_a_terminal_and_nothing_in_a_pipe(tmp_path):
    terminal, pipe = validate_stderr(tmp_path, True), validate_stderr(tmp_path, False)
    assert "validating feedback.jsonl: " in terminal and "rows" in terminal
    assert pipe == ""  # the summary is on stdout; the batch passes, so stderr has nothing to say
