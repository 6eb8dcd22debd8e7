"""A stream of feedback batches: does the cost of a new batch stay flat as history grows?

    python benchmarks/stream.py [--batches 200] [--rows 10000] [--tokenizer .data/models/smollm2-135m-instruct] \
        [--output benchmarks/results/stream.md] [--plot benchmarks/results/stream.png]
    python benchmarks/stream.py --replot benchmarks/results/stream.csv --plot benchmarks/results/stream.png

Each batch is a new JSONL file of `--rows` conversational pairs (~1% bad rows; ~1% of its rows repeat rows
of the previous batch, so duplicates across batches are found). Per batch, in one process, the same calls
`validate_feedback_batch` and the blocking check make: the key index of all earlier batches (their key
files), `validate_file_to_parquet` (rules, tokens, duplicates within the batch and against history, the
batch's key file) and `run_expectation_suite_on_file` (GX on the batch). The seconds of each step per
batch are written as CSV, plotted (PNG) and summarised (markdown). For contrast, the old way of finding
earlier keys (every earlier batch's accepted rows reread and hashed) is timed at a few points.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingestion import generate, load  # noqa: E402


def make_batch(path: Path, rows: int, seed: int, previous: list[str] | None) -> list[str]:
    """Write the batch; ~1% of its lines repeat lines of the previous batch. Returns its lines."""
    generate(path, rows, seed=seed)
    lines = path.read_text().splitlines()
    if previous:
        rng = random.Random(seed)
        for i in rng.sample(range(len(lines)), k=max(1, rows // 100)):
            lines[i] = rng.choice(previous)
        path.write_text("\n".join(lines) + "\n")
    return lines


def plot(records: list[dict], path: Path, rows: int) -> None:
    """Time per batch at its own scale (top), and against the old way of finding earlier keys (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["batch"] for r in records]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for ax in (top, bottom):
        ax.plot(xs, [r["total_s"] for r in records], label="new batch: validation + key-index lookup + GX gate", lw=1.2)
        ax.plot(xs, [r["validate_s"] for r in records], label="of which validation + key-index lookup", lw=0.8)
        ax.set_ylabel("seconds")
        ax.grid(alpha=0.3)
    old = [(r["batch"], r["old_earlier_keys_s"]) for r in records if r["old_earlier_keys_s"] not in (None, "")]
    if old:
        bottom.plot(*zip(*[(b, float(s)) for b, s in old]), "o--", color="tab:red",
                    label="old: rereading earlier batches' rows for their keys")
    top.set_ylim(bottom=0)
    bottom.set_ylim(bottom=0)
    top.set_title(f"Time per batch over a stream of {len(records)} batches")
    bottom.set_title("The same, beside the old way of finding earlier batches' keys")
    bottom.set_xlabel(f"batch ({rows:,} rows each)")
    top.legend(loc="upper left", fontsize=8)
    bottom.legend(loc="center right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--tokenizer", default=".data/models/smollm2-135m-instruct")
    ap.add_argument("--old-way-at", type=int, action="append", help="batch numbers to time the old key gathering at")
    ap.add_argument("--output", type=Path)
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--replot", type=Path, help="only draw --plot again from a CSV this script wrote")
    args = ap.parse_args()
    if args.replot:
        with open(args.replot, newline="") as fh:
            records = [{k: (float(v) if k.endswith("_s") and v else int(v) if v.isdigit() else v) for k, v in r.items()}
                       for r in csv.DictReader(fh)]
        plot(records, args.plot, args.rows)
        return

    from alignment_pipelines.data.datasets.key_index import KEYS_FILE, KeyIndex
    from alignment_pipelines.data.records import read_records
    from alignment_pipelines.data.validate.engine import row_keys, validate_file_to_parquet
    from alignment_pipelines.data.validate.gate import run_expectation_suite_on_file
    from alignment_pipelines.data.validate.rules import ValidationRules, defect_count

    rules = ValidationRules(tokenizer=str(Path(args.tokenizer).resolve()) if args.tokenizer else None)
    old_way_at = set(args.old_way_at or [1, 50, 100, 150, 200])
    work = Path(tempfile.mkdtemp(prefix="stream-bench-", dir="/tmp"))
    records = []
    start_load = load()
    try:
        # warm-up: imports, GX context, tokenizer
        warm = work / "warm.jsonl"
        generate(warm, 50, seed=99_999)
        validate_file_to_parquet(warm, work / "w.a.parquet", work / "w.q.parquet", rules)
        run_expectation_suite_on_file(work / "w.a.parquet", rules)
        previous = None
        key_files: list[Path] = []
        for b in range(1, args.batches + 1):
            batch_dir = work / "batches" / f"b{b:04d}"
            batch_dir.mkdir(parents=True)
            raw = batch_dir / "raw.jsonl"
            lines = make_batch(raw, args.rows, seed=b, previous=previous)
            t0 = time.perf_counter()
            index = KeyIndex(key_files)
            summary = validate_file_to_parquet(raw, batch_dir / "accepted.parquet", batch_dir / "quarantine.parquet",
                                               rules, known_index=index, keys_path=batch_dir / KEYS_FILE)
            index.close()
            t1 = time.perf_counter()
            report = run_expectation_suite_on_file(batch_dir / "accepted.parquet", rules,
                                                   defect_count(summary["by_reason"]), keys_path=batch_dir / KEYS_FILE)
            t2 = time.perf_counter()
            old = None
            if b in old_way_at:  # what earlier_accepted_keys cost before the key index
                o0 = time.perf_counter()
                keys: set[str] = set()
                for f in key_files:
                    keys |= row_keys(read_records(f.parent / "accepted.parquet"))
                old = time.perf_counter() - o0
            if report.success:
                key_files.append(batch_dir / KEYS_FILE)
            records.append({"batch": b, "validate_s": round(t1 - t0, 4), "gate_s": round(t2 - t1, 4),
                            "total_s": round(t2 - t0, 4), "history_rows": None,
                            "accepted": summary["accepted"], "across": summary["by_reason"].get("duplicate_across_batches", 0),
                            "old_earlier_keys_s": None if old is None else round(old, 3)})
            previous = lines
            if b % 10 == 0 or b == 1:
                print(f"batch {b}: validate {t1 - t0:.2f}s gate {t2 - t1:.2f}s "
                      f"across-batch duplicates {records[-1]['across']} old-way {old} load {load()}", flush=True)
            # keep only what later batches read (key files, accepted rows for the old-way timing)
            raw.unlink()
            (batch_dir / "quarantine.parquet").unlink()
    finally:
        end_load = load()
        shutil.rmtree(work, ignore_errors=True)

    history = 0
    for r in records:
        r["history_rows"] = history
        history += r["accepted"]
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        with open(args.output.with_suffix(".csv"), "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(records[0]))
            w.writeheader()
            w.writerows(records)
    if args.plot:
        plot(records, args.plot, args.rows)

    def stats(part):
        vals = sorted(r["total_s"] for r in part)
        return sum(vals) / len(vals), vals[len(vals) // 2]

    first, last = records[: max(1, len(records) // 10)], records[-max(1, len(records) // 10):]
    (m1, p1), (m2, p2) = stats(first), stats(last)
    lines = [
        "# Stream benchmark: time per batch as history grows",
        "",
        f"`python benchmarks/stream.py --batches {args.batches} --rows {args.rows}`: {len(records)} batches of "
        f"{args.rows:,} JSONL rows (conversational pairs, ~1% bad rows, ~1% repeats of the previous batch).",
        "Per batch: the key index of every earlier batch (`KeyIndex` over their key files), `validate_file_to_parquet`",
        "with token statistics, and the blocking check's GX suite on the batch (`run_expectation_suite_on_file`).",
        f"Machine: {os.cpu_count()} CPU cores shared with other work; load average at the start {start_load}, "
        f"at the end {end_load}; Python {platform.python_version()}.",
        "",
        f"![time per batch]({args.plot.name if args.plot else 'stream.png'})",
        "",
        "| batches | history rows at the first | mean s / batch | median s / batch |",
        "|---|---:|---:|---:|",
        f"| first {len(first)} | {first[0]['history_rows']:,} | {m1:.2f} | {p1:.2f} |",
        f"| last {len(last)} | {last[0]['history_rows']:,} | {m2:.2f} | {p2:.2f} |",
        "",
        f"Ratio last/first (median): {p2 / p1:.2f}. Duplicates across batches found: "
        f"{sum(r['across'] for r in records):,}.",
        "",
        "The old way of finding earlier keys (reread every earlier batch's accepted rows and hash them), timed at "
        "a few points:",
        "",
        "| batch | history rows | old earlier-keys seconds | new batch total seconds |",
        "|---:|---:|---:|---:|",
    ]
    for r in records:
        if r["old_earlier_keys_s"] is not None:
            lines.append(f"| {r['batch']} | {r['history_rows']:,} | {r['old_earlier_keys_s']:.2f} | {r['total_s']:.2f} |")
    lines += ["", f"Per-batch seconds: `{args.output.with_suffix('.csv').name if args.output else 'stream.csv'}`."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        args.output.write_text(text)


if __name__ == "__main__":
    main()
