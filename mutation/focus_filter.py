"""Skip the mutants whose source line does not match the config's ``[cosmic-ray.filters.focus] line-pattern``.

Issue 24 asks about the lines that decide which way training goes (signs, temperature, masks, EOS). The
trainers are long and their tests train a model, so their sessions only run the mutants on such lines;
a skipped mutant is recorded as ``skipped`` with the reason, never as killed.

Usage: ``python mutation/focus_filter.py SESSION CONFIG`` (after ``cosmic-ray init``, before ``exec``).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from cosmic_ray.config import load_config
from cosmic_ray.work_db import use_db
from cosmic_ray.work_item import WorkerOutcome, WorkResult


def main(session: str, config_path: str) -> int:
    pattern = load_config(config_path).sub("filters", "focus").get("line-pattern", ".")
    focus = re.compile(pattern)
    lines_of: dict[Path, list[str]] = {}
    skipped = 0
    with use_db(session) as db:
        for item in db.pending_work_items:
            mutation = item.mutations[0]
            lines = lines_of.setdefault(mutation.module_path, mutation.module_path.read_text().splitlines())
            line = lines[mutation.start_pos[0] - 1]
            if not focus.search(line):
                db.set_result(item.job_id, WorkResult(output=f"outside focus /{pattern}/",
                                                      worker_outcome=WorkerOutcome.SKIPPED))
                skipped += 1
    print(f"focus filter /{pattern}/: skipped {skipped} mutants on other lines")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
