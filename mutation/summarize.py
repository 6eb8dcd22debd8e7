"""Counts and survivors of cosmic-ray sessions, as the Markdown of benchmarks/results/mutation.md.

Usage: ``python mutation/summarize.py [--new-tests FILE] SESSION...`` prints, per session, the mutants
generated, skipped (by the operator or focus filters), killed (timeouts counted apart), survived, and a table
of every survivor with its line. With ``--new-tests``, the table also holds the mutants that a test of FILE
killed (the first pass's survivors, run again after FILE's tests were written), with the test that failed.
``--forget-survivors SESSION`` drops the survivors' results so that the next ``cosmic-ray exec`` runs them
again.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

from cosmic_ray.work_db import use_db
from cosmic_ray.work_item import TestOutcome, WorkerOutcome


def outcome(result) -> str:
    if result is None:
        return "pending"
    if result.worker_outcome == WorkerOutcome.SKIPPED:
        return "skipped"
    if result.test_outcome == TestOutcome.SURVIVED:
        return "survived"
    if result.output == "timeout":
        return "timeout"
    if result.test_outcome == TestOutcome.KILLED:
        return "killed"
    return f"{result.worker_outcome}/{result.test_outcome}"


def mutated_line(diff: str | None) -> str:
    """The ``+`` line of a mutant's diff: what the line became."""
    for line in (diff or "").splitlines():
        if line.startswith("+") and not line.startswith("+++"):
            return line[1:].strip()
    return ""


def failed_test(output: str | None) -> str:
    """The test that failed first (pytest runs with -x, so the only one), from a mutant's stored output."""
    found = re.search(r"FAILED (\S+?)(?: - |\s|$)", output or "")
    return found.group(1) if found else ""


def summarize(session: str, new_tests: str | None = None) -> str:
    with use_db(session) as db:
        results = dict(db.results)
        items = db.work_items
    counts = Counter(outcome(results.get(item.job_id)) for item in items)
    listed = []
    for item in items:
        result = results.get(item.job_id)
        if outcome(result) == "survived":
            listed.append((item.mutations[0], result, "survives"))
        elif new_tests and outcome(result) == "killed" and failed_test(result.output).startswith(new_tests):
            listed.append((item.mutations[0], result, f"killed by `{failed_test(result.output).split('::')[-1]}`"))
    listed.sort(key=lambda row: (row[0].start_pos, row[0].operator_name, row[0].occurrence))
    module = items[0].mutations[0].module_path if items else Path(session).stem
    run = counts["killed"] + counts["timeout"] + counts["survived"]
    lines = [
        f"### `{module}`",
        "",
        f"generated {len(items)}, skipped by the filters {counts['skipped']}, run {run}: "
        f"killed {counts['killed']}, timed out {counts['timeout']} (counted as killed), "
        f"survived {counts['survived']}"
        + "".join(f", {name} {n}" for name, n in counts.items()
                  if name not in {"killed", "timeout", "survived", "skipped"}),
        "",
    ]
    if listed:
        lines += ["| line | operator | mutated to | now |", "|---|---|---|---|"]
        for mutation, result, fate in listed:
            operator = mutation.operator_name.removeprefix("core/")
            mutated = mutated_line(result.diff).replace("|", "\\|")
            lines.append(f"| {mutation.module_path.name}:{mutation.start_pos[0]} | {operator} | `{mutated}` | {fate} |")
        lines.append("")
    return "\n".join(lines)


def forget_survivors(session: str) -> None:
    import sqlalchemy

    with use_db(session) as db:
        survived = [job_id for job_id, result in db.results if outcome(result) == "survived"]
        with db._session_maker.begin() as s:  # cosmic-ray has no public call to drop a result
            s.execute(sqlalchemy.text("DELETE FROM work_results WHERE job_id IN :ids")
                      .bindparams(sqlalchemy.bindparam("ids", expanding=True)), {"ids": survived})
    print(f"{session}: {len(survived)} survivors will run again")


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[0] == "--forget-survivors":
        for path in args[1:]:
            forget_survivors(path)
    else:
        new_tests = None
        if args[0] == "--new-tests":
            new_tests, args = args[1], args[2:]
        print("\n".join(summarize(path, new_tests) for path in args))
