"""`alignment-pipelines validate` end to end beside the asset's engine, on a large pairwise JSONL file.

    python benchmarks/cli_validate.py [--rows 1200000] [--repeat 3] [--output benchmarks/results/cli_validate.md]

A JSONL file of flat pairs ({"prompt", "chosen", "rejected"} strings of random words, ~490 bytes a row, ~1% bad
rows planted as benchmarks/ingestion.py plants them) is generated once. Then, `--repeat` times each, one after
the other:

- `cli`: the command a user types, `alignment-pipelines validate FILE --output-dir DIR`, timed as a whole process
  (Python's start, imports and the GX context included) under `/usr/bin/time -v`;
- `asset engine`: a fresh Python process that runs what the `validate_feedback_batch` asset and its blocking check
  run: `validate_file_to_parquet` then `run_expectation_suite_on_file` on the accepted rows, timed the same way
  (and each of the two inside it).

Peak RSS is `/usr/bin/time`'s (the largest single process: the main one or a worker) and the peak of the whole
process tree's summed RSS, sampled every 50 ms. The accepted and quarantined counts of both must be equal.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingestion import generate_large, load, sentence  # noqa: E402  (the ingestion benchmark's generator)

REPO = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).with_name("alignment-pipelines")

ASSET_ENGINE = """
import json, sys, time
from pathlib import Path
from alignment_pipelines.data.validate.engine import validate_file_to_parquet
from alignment_pipelines.data.validate.gate import run_expectation_suite_on_file
from alignment_pipelines.data.validate.rules import ValidationRules, defect_count
source, out = Path(sys.argv[1]), Path(sys.argv[2])
rules = ValidationRules()
started = time.perf_counter()
summary = validate_file_to_parquet(source, out / "accepted.parquet", out / "quarantine.parquet", rules,
                                   keys_path=out / "keys.parquet")
validated = time.perf_counter()
report = run_expectation_suite_on_file(out / "accepted.parquet", rules, defect_count(summary["by_reason"]),
                                       keys_path=out / "keys.parquet")
print(json.dumps({"rows": summary["rows"], "accepted": summary["accepted"], "quarantined": summary["quarantined"],
                  "by_reason": summary["by_reason"], "gate": report.success, "validate_s": validated - started,
                  "gate_s": time.perf_counter() - validated}))
"""


def flat_pair(i: int, rng: random.Random) -> dict:
    """A flat pair of random words, ~490 bytes as JSON; the prompt starts "#<i> " so that every row is new."""
    return {"prompt": f"#{i} " + sentence(rng, rng.randint(8, 40)),
            "chosen": sentence(rng, rng.randint(8, 34)), "rejected": sentence(rng, rng.randint(8, 34))}


def tree_rss_mib(pid: int) -> float:
    """The summed RSS of a process and its descendants."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            with open(f"/proc/{current}/status") as fh:
                total += next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
            for task in Path(f"/proc/{current}/task").iterdir():  # children of every thread
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except (OSError, StopIteration):
            continue
    return total / 1024


def timed(command: list[str]) -> dict:
    """Run `command` under /usr/bin/time -v: wall seconds, its peak RSS, the peak of the tree's summed RSS."""
    process = subprocess.Popen(["/usr/bin/time", "-v", *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    peak_tree = 0.0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_tree
        while not done.wait(0.05):
            peak_tree = max(peak_tree, tree_rss_mib(process.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    start = time.perf_counter()
    sampler.start()
    out, err = process.communicate()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", err).group(1)) / 1024
    cpu = sum(float(re.search(rf"{name} time \(seconds\): ([\d.]+)", err).group(1)) for name in ("User", "System"))
    return {"seconds": seconds, "peak_mib": peak, "tree_peak_mib": peak_tree, "cpu_seconds": cpu, "stdout": out,
            "returncode": process.returncode, "stderr": err}


def run_cli(source: Path, out: Path) -> dict:
    result = timed([str(CLI), "validate", str(source), "--output-dir", str(out)])
    if result["returncode"] not in (0, 3):
        raise RuntimeError(result["stderr"][-3000:])
    summary = json.loads(result["stdout"])
    return result | {"counts": (summary["accepted"], summary["quarantined"]), "by_reason": summary["by_reason"],
                     "gate": summary["gate"]["passed"], "rows": summary["rows"]}


def run_asset_engine(source: Path, out: Path) -> dict:
    result = timed([sys.executable, "-c", ASSET_ENGINE, str(source), str(out)])
    if result["returncode"]:
        raise RuntimeError(result["stderr"][-3000:])
    summary = json.loads(result["stdout"])
    return result | {"counts": (summary["accepted"], summary["quarantined"]), "by_reason": summary["by_reason"],
                     "gate": summary["gate"], "rows": summary["rows"],
                     "split": (summary["validate_s"], summary["gate_s"])}


def commit() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    return head.stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_200_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--output", type=Path, help="write the markdown table here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="cli-validate-") as tmp:
        tmp = Path(tmp)
        source = tmp / "pairs.jsonl"
        planted = generate_large(source, args.rows, record=flat_pair)
        size = source.stat().st_size
        runs: dict[str, list[dict]] = {"cli": [], "asset engine": []}
        for i in range(args.repeat):
            for name, runner in (("cli", run_cli), ("asset engine", run_asset_engine)):
                out = tmp / f"{name.replace(' ', '-')}-{i}"
                out.mkdir()
                before = load()
                result = runner(source, out)
                result["load"] = f"{before} -> {load()}"
                runs[name].append(result)
                shutil.rmtree(out)
                print(name, i, f"{result['seconds']:.1f} s", f"{args.rows / result['seconds']:,.0f} rows/s",
                      f"peak {result['peak_mib']:.0f} MiB, tree {result['tree_peak_mib']:.0f} MiB", result["counts"],
                      result["load"], file=sys.stderr, flush=True)

    counts = {name: {r["counts"] for r in rs} for name, rs in runs.items()}
    same = len(counts["cli"] | counts["asset engine"]) == 1
    lines = [
        "# `alignment-pipelines validate` beside the asset's engine",
        "",
        f"`python benchmarks/cli_validate.py --rows {args.rows} --repeat {args.repeat}`: one generated JSONL file of "
        f"flat pairs, {args.rows:,} rows, {size / 2**20:,.0f} MiB ({size / args.rows:.0f} bytes a row), ~1% bad "
        f"rows planted ({planted}). Each run is a fresh process, timed whole (start, imports, GX context "
        "included); both validate and then run the blocking check's GX suite on the accepted rows. The rows show "
        "the median run by seconds; `rows/s of each run` in their order.",
        f"Machine: {os.cpu_count()} CPU cores shared with other work (load average before -> after each run), "
        f"Python {platform.python_version()}, {platform.machine()}; commit {commit()}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "| path | seconds | rows/s | rows/s of each run | CPU s | peak RSS MiB (largest process) | "
        "peak RSS MiB (process tree) | accepted | quarantined | gate passed | load before -> after |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for name, rs in runs.items():
        median = sorted(rs, key=lambda r: r["seconds"])[len(rs) // 2]
        each = ", ".join(f"{args.rows / r['seconds']:,.0f}" for r in rs)
        lines.append(
            f"| {name} | {median['seconds']:.1f} | {args.rows / median['seconds']:,.0f} | {each} | "
            f"{median['cpu_seconds']:.0f} | {median['peak_mib']:,.0f} | {median['tree_peak_mib']:,.0f} | "
            f"{median['counts'][0]:,} | {median['counts'][1]:,} | {median['gate']} | {median['load']} |")
    splits = ", ".join(f"{v:.1f} + {g:.1f}" for v, g in (r["split"] for r in runs["asset engine"]))
    lines += ["", f"Inside the asset engine's process, seconds validating + seconds in the GX gate, each run: {splits} "
                  "(the rest of its wall time is Python's start and the imports)."]
    lines += ["", f"Quarantine by reason (cli): {runs['cli'][0]['by_reason']}; asset engine: "
                  f"{runs['asset engine'][0]['by_reason']}. Same accepted/quarantined counts in every run: {same}.",
              f"Median of each: {statistics.median(r['seconds'] for r in runs['cli']):.1f} s (cli), "
              f"{statistics.median(r['seconds'] for r in runs['asset engine']):.1f} s (asset engine)."]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.output:
        args.output.write_text(table)
    if not same:
        sys.exit(f"accepted/quarantined counts differ: {counts}")


if __name__ == "__main__":
    main()
