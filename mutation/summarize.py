"""Counts and survivors of cosmic-ray sessions, as the Markdown of benchmarks/results/mutation.md.

Usage: ``python mutation/summarize.py SESSION...`` prints, per session, the mutants generated, skipped
(by the operator or focus filters), killed (timeouts counted apart), survived, and a table of every
survivor with its line. ``--forget-survivors SESSION`` drops the survivors' results so that the next
``cosmic-ray exec`` runs them again (after new tests were added).
"""

from __future__ import annotations

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


def summarize(session: str) -> str:
    with use_db(session) as db:
        results = dict(db.results)
        items = db.work_items
    counts = Counter(outcome(results.get(item.job_id)) for item in items)
    survivors = sorted(
        ((item.mutations[0], results[item.job_id]) for item in items
         if outcome(results.get(item.job_id)) == "survived"),
        key=lambda pair: (pair[0].start_pos, pair[0].operator_name, pair[0].occurrence),
    )
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
    if survivors:
        lines += ["| line | operator | mutated to |", "|---|---|---|"]
        for mutation, result in survivors:
            operator = mutation.operator_name.removeprefix("core/")
            mutated = mutated_line(result.diff).replace("|", "\\|")
            lines.append(f"| {mutation.module_path.name}:{mutation.start_pos[0]} | {operator} | `{mutated}` |")
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
    if sys.argv[1] == "--forget-survivors":
        for path in sys.argv[2:]:
            forget_survivors(path)
    else:
        print("\n".join(summarize(path) for path in sys.argv[1:]))
