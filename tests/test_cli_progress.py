"""Progress bars: on stderr for a person at a terminal; none in pipes, log files or CI."""

from __future__ import annotations

import os
import pty
import subprocess
import sys

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
