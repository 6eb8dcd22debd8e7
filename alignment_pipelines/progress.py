"""Progress bars on stderr for a person at a terminal; none in pipes, log files and CI, where they are noise."""

from __future__ import annotations

import os
import sys


def progress_wanted() -> bool:
    """Whether stderr is a terminal outside CI (the CI variable that GitHub, GitLab and most runners set)."""
    return sys.stderr.isatty() and not os.environ.get("CI")


def progress_bar(iterable=None, *, total: int | None = None, desc: str = "", unit: str = "it"):
    """A tqdm bar on stderr, silent unless `progress_wanted`."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, disable=not progress_wanted(),
                leave=False, dynamic_ncols=True)
