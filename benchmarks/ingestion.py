"""Ingestion + validation throughput and peak memory on a large generated feedback batch.

    python benchmarks/ingestion.py --rows 1000000 --rows 5000000 [--chunk-rows 50000] [--text hh] [--repeat 3] \
        [--tokenizer .data/models/smollm2-135m-instruct] [--output benchmarks/results/ingestion.md]

For each size a JSONL batch (conversational pairs, ~1% bad rows: broken JSON, identical pairs, empty
answers, duplicates) is generated in a temp dir, its text random words in HH-like 3-turn prompts or, with
`--text hh`, the real Anthropic HH pairs of ../shared/data taken in turn; then a fresh Python
process runs `validate_file_to_parquet` on it (so peak RSS is that run's alone), with token-length
statistics by the base model's tokenizer and the batch's key file written, and reports seconds,
rows/s and peak RSS (resource.getrusage). The blocking check's GX suite on the accepted rows
(`run_expectation_suite_on_file`) is timed separately. The machine's load (`uptime`) is recorded
before and after each run. With `--repeat N` each batch is validated N times, one fresh process after the
other: the table shows the median run, and every run's rows/s beside it, as this shared machine's speed moves
from one minute to the next. The table is printed and, with --output, written as markdown.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HH_FILE = Path(__file__).resolve().parents[2] / "shared/data/hh-rlhf-harmless-base.jsonl.gz"

WORDS = (
    "the a model answer question helpful honest harmless data train policy reward value user "
    "assistant good bad better worse because however please explain why how what when where"
).split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def generated_record(i: int, rng: random.Random) -> dict:
    """A conversational pair of random words, with a 3-turn prompt whose first turn starts "#<i> "."""
    prompt = [
        {"role": "user", "content": f"#{i} " + sentence(rng, rng.randint(5, 30))},
        {"role": "assistant", "content": sentence(rng, rng.randint(5, 40))},
        {"role": "user", "content": sentence(rng, rng.randint(3, 20))},
    ]
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": sentence(rng, rng.randint(10, 60))}],
        "rejected": [{"role": "assistant", "content": sentence(rng, rng.randint(10, 60))}],
    }


def hh_records() -> Callable[[int, random.Random], dict]:
    """Real Anthropic HH transcripts from ../shared/data as conversational pairs, taken in turn, each
    first turn starting "#<i> " so that every row is new."""
    from alignment_pipelines.data.ingest.layouts import split_hh
    from alignment_pipelines.data.schemas import RowError

    pairs = []
    with gzip.open(HH_FILE, "rt", encoding="utf-8") as fh:
        for line in fh:
            obj = json.loads(line)
            try:
                (prompt, chosen), (other, rejected) = split_hh(obj["chosen"], "chosen"), split_hh(obj["rejected"], "rejected")
            except RowError:
                continue
            if prompt == other and prompt[0]["role"] == "user":
                pairs.append((prompt, chosen, rejected))

    def record(i: int, rng: random.Random) -> dict:
        prompt, chosen, rejected = pairs[i % len(pairs)]
        prompt = [{**prompt[0], "content": f"#{i} " + prompt[0]["content"]}, *prompt[1:]]
        return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}]}

    return record


def generate(path: Path, rows: int, seed: int = 0, bad_fraction: float = 0.01,
             record: Callable[[int, random.Random], dict] = generated_record) -> dict[str, int]:
    """Write `rows` JSONL lines of `record`s; returns how many bad rows of each kind were planted."""
    rng = random.Random(seed)
    planted = {"invalid_json": 0, "identical_pair": 0, "empty_field": 0, "duplicate": 0}
    last = None
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(rows):
            rec = record(i, rng)
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


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip().split("load average:")[-1].strip()


BASE_ROWS = 250_000


def generate_large(path: Path, rows: int, seed: int = 0,
                   record: Callable[[int, random.Random], dict] = generated_record) -> dict[str, int]:
    """`generate` for big sizes in a fraction of the time: a base block of at most BASE_ROWS lines is
    generated once and written again with fresh prompt ids ("#<copy>.<i>"), so every copy has new rows
    (and its own planted bad rows) while the lines keep the same shapes and lengths."""
    if rows <= BASE_ROWS:
        return generate(path, rows, seed=seed, record=record)
    base = path.with_name(path.name + ".base")
    planted = generate(base, BASE_ROWS, seed=seed, record=record)
    lines = base.read_text(encoding="utf-8").splitlines()
    base.unlink()
    copies = -(-rows // BASE_ROWS)
    written = 0
    with open(path, "w", encoding="utf-8") as fh:
        for k in range(copies):
            n = min(BASE_ROWS, rows - written)
            block = lines[:n] if k == 0 else [line.replace('"#', f'"#{k}.', 1) for line in lines[:n]]
            fh.write("\n".join(block) + "\n")
            written += n
    return {key: value * rows // BASE_ROWS for key, value in planted.items()}


def cpu_seconds() -> float:
    """User + system time of this process and of its finished children (the validation's workers)."""
    return sum(u.ru_utime + u.ru_stime for u in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))


def child(path: str, chunk_rows: int, tokenizer: str | None, gate: bool = True) -> None:
    """Run in a fresh process: validate one file and print a JSON result line."""
    from alignment_pipelines.data.validate.engine import validate_file_to_parquet
    from alignment_pipelines.data.validate.gate import run_expectation_suite_on_file
    from alignment_pipelines.data.validate.rules import ValidationRules, defect_count

    def rss_mib() -> float:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    out = Path(path).parent
    rules = ValidationRules(tokenizer=tokenizer)
    # warm up: imports, the GX context and the tokenizer's loading are one-off costs, not throughput
    tiny = out / "warmup.jsonl"
    tiny.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    t0 = time.perf_counter()
    validate_file_to_parquet(tiny, out / "w.a.parquet", out / "w.q.parquet", rules)
    run_expectation_suite_on_file(out / "w.a.parquet", rules)
    warmup = time.perf_counter() - t0
    baseline = rss_mib()
    cpu0 = cpu_seconds()
    start = time.perf_counter()
    summary = validate_file_to_parquet(path, out / "accepted.parquet", out / "quarantine.parquet", rules,
                                       chunk_rows=chunk_rows, keys_path=out / "keys.parquet")
    seconds = time.perf_counter() - start
    cpu = cpu_seconds() - cpu0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    worker_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest worker's
    gate_seconds = gate_cpu = None
    success = None
    if gate:
        cpu0 = cpu_seconds()
        start = time.perf_counter()
        report = run_expectation_suite_on_file(out / "accepted.parquet", rules, defect_count(summary["by_reason"]),
                                               keys_path=out / "keys.parquet")
        gate_seconds, gate_cpu, success = time.perf_counter() - start, cpu_seconds() - cpu0, report.success
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "peak_mib": peak, "worker_peak_mib": worker_peak,
                      "baseline_mib": baseline,
                      "warmup_s": warmup, "gate_seconds": gate_seconds, "gate_cpu_seconds": gate_cpu,
                      "gate_success": success, "summary": summary}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, action="append", help="batch size (repeatable); default 20000")
    ap.add_argument("--chunk-rows", type=int, default=50_000)
    ap.add_argument("--output", type=Path, help="write the markdown table here")
    ap.add_argument("--gate-max-rows", type=int, default=1_000_000,
                    help="time the blocking check's GX suite only for batches up to this size")
    ap.add_argument("--tokenizer", default=".data/models/smollm2-135m-instruct",
                    help="token-length statistics with this tokenizer ('' for none)")
    ap.add_argument("--text", choices=["generated", "hh"], default="generated",
                    help="the rows' text: random words, or real Anthropic HH transcripts from ../shared/data")
    ap.add_argument("--repeat", type=int, default=1, help="validate each batch this many times; the median run is shown")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.chunk_rows, args.tokenizer or None, gate=args.gate_max_rows > 0)
        return

    sizes = args.rows or [20_000]
    results = []
    if args.tokenizer:
        args.tokenizer = str(Path(args.tokenizer).resolve())
    for rows in sizes:
        with tempfile.TemporaryDirectory(prefix="ingest-bench-", dir="/tmp") as tmp:
            path = Path(tmp) / "batch.jsonl"
            t0 = time.perf_counter()
            planted = generate_large(path, rows, record=hh_records() if args.text == "hh" else generated_record)
            gen_s = time.perf_counter() - t0
            mib = path.stat().st_size / 2**20
            print(f"[{rows:,} rows] generated {mib:.0f} MiB in {gen_s:.0f}s, planted {planted}", flush=True)
            runs = []
            for attempt in range(args.repeat):
                os.sync()  # the file and the last run's outputs are written back now, not during the run
                before = load()
                proc = subprocess.run(
                    [sys.executable, __file__, "--child", str(path), "--chunk-rows", str(args.chunk_rows),
                     "--tokenizer", args.tokenizer or "",
                     "--gate-max-rows", str(int(rows <= args.gate_max_rows and attempt == 0))],
                    capture_output=True, text=True, check=False,
                )
                after = load()
                if proc.returncode:
                    sys.exit(f"benchmark child failed:\n{proc.stderr[-4000:]}")
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                s = res["summary"]
                assert s["accepted"] + s["quarantined"] == s["rows"] == rows
                res.update(load_before=before, load_after=after)
                runs.append(res)
                print(f"[{rows:,} rows] {res['seconds']:.1f}s, {rows / res['seconds']:,.0f} rows/s, peak {res['peak_mib']:.0f} MiB, "
                      f"cpu {res['cpu_seconds']:.0f}s, gate {res['gate_seconds']}s, quarantined {s['quarantined']:,} {s['by_reason']}, load {before} -> {after}",
                      flush=True)
            by_speed = sorted(runs, key=lambda r: r["seconds"])
            res = {**by_speed[len(by_speed) // 2], "gate_seconds": runs[0]["gate_seconds"],
                   "gate_cpu_seconds": runs[0]["gate_cpu_seconds"]}
            res.update(rows=rows, file_mib=mib, planted=planted, each_run=[rows / r["seconds"] for r in runs])
            results.append(res)

    cpus = os.cpu_count()
    lines = [
        "# Ingestion benchmark",
        "",
        "`python benchmarks/ingestion.py " + " ".join(f"--rows {r}" for r in sizes)
        + f" --chunk-rows {args.chunk_rows}" + (" --text hh" if args.text == "hh" else "") + "`: "
        + ("JSONL batch of conversational pairs (3-turn prompts of random words)" if args.text == "generated" else
           "JSONL batch of the real Anthropic HH pairs in ../shared/data (1-7 turns, taken in turn, each first turn "
           "made unique)") + " with ~1% bad rows,",
        "ingested + validated by `validate_file_to_parquet`: plain lines' strings read from their quote positions, the",
        "rest row by row; the suite's rules as Arrow kernels; duplicates within the batch; token-length statistics with the",
        f"tokenizer `{Path(args.tokenizer).name if args.tokenizer else 'none'}` (exact counts); accepted rows, quarantine",
        "and the batch's key file written as Parquet. Fresh process per run, "
        + (f"{args.repeat} runs per size, one after the other: the row shows the median run (`rows/s of each run` "
           "in their order), the gate timed in the first; " if args.repeat > 1 else "")
        + "seconds exclude the one-off warm-up",
        "(imports, GX context, tokenizer load: `warm-up s`). `gate s` is the blocking check's Great Expectations suite",
        "on the accepted rows (`run_expectation_suite_on_file`), run after it in the same process (batches up to",
        f"{args.gate_max_rows:,} rows). `CPU s` is the process's user + system time (all its threads): on a machine",
        "shared with other work, `rows per CPU-second` is the figure that does not depend on what else runs.",
        "A file of 64 MiB or more is read and assessed by one process per CPU, the main one and spawned workers",
        "(`validate.engine.PARALLEL_MIN_BYTES`): `CPU s` includes the workers', and `peak RSS MiB` is the main process's +",
        "the largest worker's.",
        f"Machine: {cpus} CPU cores, shared with other work (load average before -> after each run in the table),",
        f"Python {platform.python_version()}, {platform.machine()}.",
        "",
        "| rows | file MiB | chunk rows | seconds | rows/s | rows/s of each run | CPU s | rows per CPU-second "
        "| peak RSS MiB | RSS before run MiB | warm-up s | gate s (CPU s) | accepted | quarantined | load before -> after |",
        "|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        s = r["summary"]
        lines.append(
            f"| {r['rows']:,} | {r['file_mib']:.0f} | {args.chunk_rows:,} | {r['seconds']:.1f} | {r['rows'] / r['seconds']:,.0f} "
            f"| {', '.join(f'{x:,.0f}' for x in r['each_run'])} | {r['cpu_seconds']:.0f} | {r['rows'] / r['cpu_seconds']:,.0f} "
            f"| {r['peak_mib']:.0f} + {r['worker_peak_mib']:.0f} | {r['baseline_mib']:.0f} | {r['warmup_s']:.1f} "
            f"| {'-' if r['gate_seconds'] is None else format(r['gate_seconds'], '.1f') + ' (' + format(r['gate_cpu_seconds'], '.0f') + ')'} "
            f"| {s['accepted']:,} | {s['quarantined']:,} | {r['load_before']} -> {r['load_after']} |"
        )
    lines += ["", "Quarantine by reason:", ""]
    for r in results:
        lines.append(f"- {r['rows']:,} rows: {r['summary']['by_reason']} (planted: {r['planted']})")
    lines += ["", "Token statistics:", ""]
    for r in results:
        t = r["summary"]["truncation"] or {}
        lines.append(f"- {r['rows']:,} rows: measured {t.get('measured_rows', 0):,} rows, prompt tokens mean "
                     f"{t.get('prompt_tokens_mean')} (max {t.get('prompt_tokens_max')}), completion tokens mean "
                     f"{t.get('completion_tokens_mean')} (max {t.get('completion_tokens_max')})")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
