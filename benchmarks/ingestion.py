"""Ingestion + validation throughput and peak memory on a large generated feedback batch.

    python benchmarks/ingestion.py --rows 200000 --rows 1000000 [--chunk-rows 50000] \
        [--output benchmarks/results/ingestion.md]

For each size a JSONL batch (pairwise, HH-RLHF-like multi-turn prompts, ~1% bad rows: broken
JSON, identical pairs, empty answers, duplicates) is generated in a temp dir, then a fresh Python
process runs `validate_file_to_parquet` on it (so peak RSS is that run's alone) and reports
seconds, rows/s and peak RSS (resource.getrusage). The table is printed and, with --output,
written as markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = (
    "the a model answer question helpful honest harmless data train policy reward value user "
    "assistant good bad better worse because however please explain why how what when where"
).split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def generate(path: Path, rows: int, seed: int = 0, bad_fraction: float = 0.01) -> dict[str, int]:
    """Write `rows` JSONL lines; returns how many bad rows of each kind were planted."""
    rng = random.Random(seed)
    planted = {"invalid_json": 0, "identical_pair": 0, "empty_field": 0, "duplicate": 0}
    last = None
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(rows):
            prompt = [
                {"role": "user", "content": f"#{i} " + sentence(rng, rng.randint(5, 30))},
                {"role": "assistant", "content": sentence(rng, rng.randint(5, 40))},
                {"role": "user", "content": sentence(rng, rng.randint(3, 20))},
            ]
            rec = {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": sentence(rng, rng.randint(10, 60))}],
                "rejected": [{"role": "assistant", "content": sentence(rng, rng.randint(10, 60))}],
            }
            line = json.dumps(rec)
            if rng.random() < bad_fraction:
                kind = rng.choice(list(planted))
                if kind == "invalid_json":
                    line = line[: len(line) // 2]
                elif kind == "identical_pair":
                    rec["rejected"] = rec["chosen"]
                    line = json.dumps(rec)
                elif kind == "empty_field":
                    rec["chosen"] = [{"role": "assistant", "content": "  "}]
                    line = json.dumps(rec)
                elif last is not None:
                    line = last
                else:
                    kind = None
                if kind:
                    planted[kind] += 1
            fh.write(line + "\n")
            last = line
    return planted


def child(path: str, chunk_rows: int) -> None:
    """Run in a fresh process: validate one file and print a JSON result line."""
    from alignment_pipelines.data.validation import validate_file_to_parquet

    def rss_mib() -> float:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    out = Path(path).parent
    # warm up: GX import and context are one-off costs, not throughput
    tiny = out / "warmup.jsonl"
    tiny.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    validate_file_to_parquet(tiny, out / "w.a.parquet", out / "w.q.parquet")
    baseline = rss_mib()
    start = time.perf_counter()
    summary = validate_file_to_parquet(path, out / "accepted.parquet", out / "quarantine.parquet", chunk_rows=chunk_rows)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"seconds": seconds, "peak_mib": peak, "baseline_mib": baseline, "summary": summary}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, action="append", help="batch size (repeatable); default 20000")
    ap.add_argument("--chunk-rows", type=int, default=50_000)
    ap.add_argument("--output", type=Path, help="write the markdown table here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.chunk_rows)
        return

    sizes = args.rows or [20_000]
    results = []
    for rows in sizes:
        with tempfile.TemporaryDirectory(prefix="ingest-bench-") as tmp:
            path = Path(tmp) / "batch.jsonl"
            t0 = time.perf_counter()
            planted = generate(path, rows)
            gen_s = time.perf_counter() - t0
            mib = path.stat().st_size / 2**20
            print(f"[{rows:,} rows] generated {mib:.0f} MiB in {gen_s:.0f}s, planted {planted}", flush=True)
            proc = subprocess.run(
                [sys.executable, __file__, "--child", str(path), "--chunk-rows", str(args.chunk_rows)],
                capture_output=True, text=True, check=False,
            )
            if proc.returncode:
                sys.exit(f"benchmark child failed:\n{proc.stderr[-4000:]}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            s = res["summary"]
            assert s["accepted"] + s["quarantined"] == s["rows"] == rows
            res.update(rows=rows, file_mib=mib, planted=planted)
            results.append(res)
            print(f"[{rows:,} rows] {res['seconds']:.1f}s, {rows / res['seconds']:,.0f} rows/s, peak {res['peak_mib']:.0f} MiB, "
                  f"quarantined {s['quarantined']:,} {s['by_reason']}", flush=True)

    cpus = os.cpu_count()
    lines = [
        "# Ingestion benchmark",
        "",
        "`python benchmarks/ingestion.py " + " ".join(f"--rows {r}" for r in sizes)
        + f" --chunk-rows {args.chunk_rows}`: JSONL batch of conversational pairs (3-turn prompts) with ~1% bad rows,",
        "ingested + validated by `validate_file_to_parquet` (GX suite routing per chunk, chunk gate, duplicate",
        "detection across chunks, Parquet output). Fresh process per size; seconds exclude the one-off GX warm-up.",
        f"Machine: {cpus} CPU cores (shared with other work), Python {platform.python_version()}, {platform.machine()}.",
        "",
        "| rows | file MiB | chunk rows | seconds | rows/s | peak RSS MiB | RSS before run MiB | accepted | quarantined |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        s = r["summary"]
        lines.append(
            f"| {r['rows']:,} | {r['file_mib']:.0f} | {args.chunk_rows:,} | {r['seconds']:.1f} | {r['rows'] / r['seconds']:,.0f} "
            f"| {r['peak_mib']:.0f} | {r['baseline_mib']:.0f} | {s['accepted']:,} | {s['quarantined']:,} |"
        )
    lines += ["", "Quarantine by reason:", ""]
    for r in results:
        lines.append(f"- {r['rows']:,} rows: {r['summary']['by_reason']} (planted: {r['planted']})")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
