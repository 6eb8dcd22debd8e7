"""Dataset build time at 1M and 5M accepted rows: the SQL query over the batches' Parquet files.

    python benchmarks/datasets.py --rows 1000000 --rows 5000000 [--batch-rows 500000] \
        [--output benchmarks/results/datasets.md]

For each size, batches of `--batch-rows` generated pairs are validated into accepted.parquet + keys.parquet
(as ingestion writes them; no tokenizer, to save time), then, in a fresh process per dataset (so peak RSS is
the build's own), `datasets.sql.build_dataset` builds `preference_pairs`: deduplication by key, content-hash
version, split by prompt hash, train/eval Parquet. A second build with nothing changed shows the
unchanged-version path (nothing rewritten). `binary_feedback` (two rows per pair, keys computed once) is
built too. The load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingestion import generate_large, load  # noqa: E402


def child(root: str, dataset: str) -> None:
    from alignment_pipelines.data.datasets.sql import BatchFiles, build_dataset

    batches = [BatchFiles(p.name, "pairwise", p) for p in sorted((Path(root) / "batches").iterdir())]
    out = {}
    for attempt in ("build", "unchanged"):
        t0 = time.perf_counter()
        build = build_dataset(dataset, dataset, batches, Path(root) / "datasets" / dataset, memory_limit="4GB")
        out[attempt] = {"seconds": time.perf_counter() - t0, "rows": build.rows, "input_rows": build.input_rows,
                        "train_rows": build.train_rows, "eval_rows": build.eval_rows, "rewritten": build.rewritten,
                        "timings": build.timings, "version": build.version}
    out["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["bytes"] = sum(f.stat().st_size for f in (Path(root) / "datasets" / dataset).rglob("*.parquet"))
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, action="append")
    ap.add_argument("--batch-rows", type=int, default=500_000)
    ap.add_argument("--datasets", default="pairwise,binary")
    ap.add_argument("--output", type=Path)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    from alignment_pipelines.data.datasets.key_index import KEYS_FILE
    from alignment_pipelines.data.validate.engine import validate_file_to_parquet

    results = []
    for rows in args.rows or [100_000]:
        root = Path(tempfile.mkdtemp(prefix="dataset-bench-", dir="/tmp"))
        try:
            t0 = time.perf_counter()
            accepted = 0
            for i in range(0, rows, args.batch_rows):
                n = min(args.batch_rows, rows - i)
                batch_dir = root / "batches" / f"b{i // args.batch_rows:04d}"
                batch_dir.mkdir(parents=True)
                raw = root / "raw.jsonl"
                generate_large(raw, n, seed=1000 + i // args.batch_rows)
                s = validate_file_to_parquet(raw, batch_dir / "accepted.parquet", batch_dir / "quarantine.parquet",
                                             keys_path=batch_dir / KEYS_FILE)
                accepted += s["accepted"]
                raw.unlink()
            prep = time.perf_counter() - t0
            print(f"[{rows:,}] prepared {accepted:,} accepted rows in {prep:.0f}s", flush=True)
            for dataset in args.datasets.split(","):
                before = load()
                proc = subprocess.run([sys.executable, __file__, "--child", str(root), dataset],
                                      capture_output=True, text=True)
                if proc.returncode:
                    sys.exit(proc.stderr[-4000:])
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                res.update(rows=rows, accepted=accepted, dataset=dataset, load_before=before, load_after=load())
                results.append(res)
                print(f"[{rows:,}] {dataset}: {res['build']['seconds']:.1f}s ({res['build']['timings']}), unchanged "
                      f"{res['unchanged']['seconds']:.1f}s, peak {res['peak_mib']:.0f} MiB", flush=True)
        finally:
            shutil.rmtree(root, ignore_errors=True)

    names = {"pairwise": "preference_pairs", "binary": "binary_feedback", "prompts": "prompts"}
    lines = [
        "# Dataset build benchmark",
        "",
        "`python benchmarks/datasets.py " + " ".join(f"--rows {r}" for r in args.rows or [100_000])
        + f" --batch-rows {args.batch_rows}`: accepted batches of generated pairs (as ingestion writes them:",
        "accepted.parquet + keys.parquet), then each dataset built by `datasets.sql.build_dataset` (DuckDB, memory",
        "limit 4 GB, spilling under it) in a fresh process: deduplication, content-hash version, split by prompt hash,",
        "train/eval Parquet (zstd). `unchanged` is a second build with no new batch: the version is computed from the",
        "key files and the existing dataset is not rewritten.",
        f"Machine: {os.cpu_count()} CPU cores shared with other work, Python {platform.python_version()}.",
        "",
        "| dataset | accepted rows | batches | output rows | build s | of which keys / dedup+version / split / write s "
        "| unchanged s | peak RSS MiB | output MiB | load before -> after |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for r in results:
        b, t = r["build"], r["build"]["timings"]
        parts = " / ".join(f"{t.get(k, 0):.1f}" for k in ("keys_s", "dedup_version_s", "split_s", "write_s"))
        lines.append(
            f"| {names[r['dataset']]} | {r['accepted']:,} | {-(-r['rows'] // args.batch_rows)} | {b['rows']:,} "
            f"| {b['seconds']:.1f} | {parts} | {r['unchanged']['seconds']:.1f} | {r['peak_mib']:.0f} "
            f"| {r['bytes'] / 2**20:.0f} | {r['load_before']} -> {r['load_after']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)


if __name__ == "__main__":
    main()
