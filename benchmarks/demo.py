"""How long `alignment-pipelines demo` takes, step by step, and what it ends with.

Runs the demo as a user does (a subprocess with its own DAGSTER_HOME and data root, on the embedded defaults), then
reads every step's duration from the Dagster instance it wrote and the gate's outcome from the demo's summary. With
``--instance DIR`` it only reads an instance a demo already wrote (``DIR`` holds ``dagster_home/`` and
``demo.json``), so a timed run made by hand is tabulated the same way.

    python benchmarks/demo.py --workdir /tmp/demo-bench          # run it, then write results/demo.md
    python benchmarks/demo.py --instance /tmp/demo-bench          # tabulate that run again
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve()
RESULTS = HERE.parent / "results" / "demo.md"
ORIGINAL_FOUR = ("validate_feedback_batch", "sft_model", "policy_dpo", "policy_kto", "policy_orpo")


def run_demo(workdir: Path) -> dict:
    """The demo in a subprocess; its wall time and peak RSS (the largest process of its tree)."""
    home, data = workdir / "dagster_home", workdir / "data"
    home.mkdir(parents=True, exist_ok=True)
    env = os.environ | {"DAGSTER_HOME": str(home), "ALIGNMENT_PIPELINES_HOME": str(data), "HF_HUB_OFFLINE": "1",
                        "MLFLOW_ENABLE_TELEMETRY": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    started = time.perf_counter()
    done = subprocess.run([str(Path(sys.executable).parent / "alignment-pipelines"), "demo"], env=env, check=True,
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    summary = json.loads(done.stdout[done.stdout.rindex('{\n  "batches"'):])
    summary["wall_seconds"] = wall
    summary["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9
    (workdir / "demo.json").write_text(json.dumps(summary, indent=2))
    return summary


def step_seconds(home: Path) -> dict[str, float]:
    """Each step's duration in the instance's runs, from its start and success events."""
    os.environ["DAGSTER_HOME"] = str(home)
    import dagster as dg

    instance = dg.DagsterInstance.get()
    started, seconds = {}, {}
    for run in instance.get_runs():
        for record in instance.all_logs(run.run_id):
            event = record.dagster_event
            if event is None or not record.step_key:
                continue
            if event.event_type_value == "STEP_START":
                started[record.step_key] = record.timestamp
            elif event.event_type_value == "STEP_SUCCESS":
                seconds[record.step_key] = record.timestamp - started[record.step_key]
    return seconds


def table(summary: dict, seconds: dict[str, float]) -> str:
    steps = sorted(seconds.items(), key=lambda item: -item[1])
    training = sum(v for k, v in seconds.items() if k in summary["models"])
    rows = [f"| `{name}` | {value / 60:.2f} |" for name, value in steps if value >= 1]
    four = sum(seconds.get(k, 0.0) for k in ORIGINAL_FOUR)
    wall = summary.get("wall_seconds")
    return "\n".join([
        "| step | minutes |", "|---|---|", *rows,
        f"| **the eight methods** | **{training / 60:.2f}** |",
        f"| validation + SFT, DPO, KTO, ORPO (the demo before the RL methods) | {four / 60:.2f} |",
        f"| **whole demo (wall)** | **{wall / 60:.2f}** |" if wall else "",
        "", f"Peak RSS: {summary['peak_rss_gb']:.1f} GB. Failed methods: {summary['failed_methods'] or 'none'}. "
            f"Gate: {summary['gate']}; champion: {(summary['champion'] or {}).get('source_uri')}.",
        "", "Win-rate against the SFT model on the held-out prompts (judged by the evaluation reward model, trained on the judge split; ties count half):", "",
        "| model | win-rate | 95% lower bound |", "|---|---|---|",
        *[f"| `{key.split('/')[0]}` | {value:.2f} | {summary['evaluation'][key + '_ci_low']:.2f} |"
          for key, value in summary["evaluation"].items() if key.endswith("/win_rate_vs_sft")],
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--workdir", type=Path, help="run the demo here (an empty folder)")
    group.add_argument("--instance", type=Path, help="only tabulate the demo already run in this folder")
    parser.add_argument("--note", default="", help="how the machine was shared, where the code came from")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    workdir = args.workdir or args.instance
    summary = run_demo(workdir) if args.workdir else json.loads((workdir / "demo.json").read_text())
    body = table(summary, step_seconds(workdir / "dagster_home"))
    header = (f"# The demo, step by step\n\n{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}),"
              f" Python {platform.python_version()}, {date.today()}. {args.note}\n\n"
              f"Command: `python benchmarks/demo.py {'--workdir' if args.workdir else '--instance'} {workdir}`\n\n")
    args.results.write_text(header + body + "\n")
    print(header + body)


if __name__ == "__main__":
    main()
