"""Progress bars on stderr for a person at a terminal; none in pipes, log files and CI, where they are noise."""

from __future__ import annotations

import os
import sys


def progress_wanted() -> bool:
    """Whether stderr is a terminal outside CI (the CI variable that GitHub, GitLab and most runners set)."""
    return sys.stderr.isatty() and not os.environ.get("CI")

