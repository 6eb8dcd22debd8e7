"""Bytes on disk per retraining round: does storage stay flat as the graph retrains?

Runs the training graph (every registered method, through Dagster, as the daemon would) for several rounds
on a fresh data root, each round on a new feedback batch, and measures the data root after each round,
folder by folder. Then runs retention once (``keep_last=1``) and measures what it freed.

The layouts before this change are computed from the same run, not re-run:
- "merged ×2" (what the storage issue measured): every method stored merged full weights in its run folder
  and again as its MLflow artifact: 2 × the size of a merged model (measured by exporting one version).
- "adapter ×2" (the method platform before one-copy storage): the LoRA run folder (adapter + tokenizer +
  card) kept in ``runs/`` and uploaded again to MLflow: 2 × (adapter + tokenizer files).

    python benchmarks/storage.py --model smollm2-135m-instruct --rounds 2 --steps 1 --methods sft,dpo,kto,orpo
"""

import argparse
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve()
RESULTS = HERE.parent / "results" / "storage.md"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "chat_template.jinja", "generation_config.json")


def mb(n: int) -> str:
    return f"{n / 1e6:,.1f}"


def _drop_batch(layout, round_index: int, rows: int) -> None:
    from alignment_pipelines.data.demo import demo_feedback_path

    lines = demo_feedback_path().read_text().splitlines()
    start = (round_index * rows) % max(1, len(lines) - rows)
    target = layout.inbox / f"round-{round_index}.jsonl"
    target.write_text("\n".join(lines[start:start + rows]) + "\n")
    settled = time.time() - 60
    os.utime(target, (settled, settled))


def _by_folder(root: Path) -> dict[str, int]:
    from alignment_pipelines.layout import folder_bytes

    return {folder.name: folder_bytes(folder) for folder in sorted(root.iterdir()) if folder.is_dir()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1, help="optimizer steps per method (sizes do not depend on it)")
    parser.add_argument("--rows", type=int, default=60, help="feedback rows per round")
    parser.add_argument("--methods", default="sft,dpo,kto,orpo", help="the methods retrained each round")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")

    import dagster as dg

    from alignment_pipelines.definitions import ALL_ASSETS, build_resources
    from alignment_pipelines.methods import METHODS
    from alignment_pipelines.models.registry import export_model
    from alignment_pipelines.retention import RetentionPolicy, apply_retention
    from alignment_pipelines.runs import ingest_batch, sense_inbox

    work = Path(tempfile.mkdtemp(prefix="storage-bench-"))
    resources = build_resources(data_root=work / "data", base_model=args.model)
    layout = resources["storage"].layout
    base = Path(resources["base_model"].resolve())
    specs = [METHODS[name] for name in args.methods.split(",")]
    selection = dg.AssetSelection.groups("datasets") | dg.AssetSelection.assets(*(spec.asset for spec in specs))
    run_config = {"ops": {spec.asset: {"config": {"max_steps": args.steps, "max_length": 128}} for spec in specs}}
    rows, trained = [], []
    started = time.perf_counter()
    with dg.instance_for_test() as instance:
        for round_index in range(args.rounds):
            _drop_batch(layout, round_index, args.rows)
            for request in sense_inbox(instance, resources).run_requests or []:
                ingest_batch(instance, resources, request.partition_key)
            result = dg.materialize(ALL_ASSETS, selection=selection, instance=instance,
                                    resources=resources, run_config=run_config, raise_on_error=False)
            trained = [spec.asset for spec in specs if result.asset_materializations_for_node(spec.asset)]
            rows.append((f"after round {round_index + 1} ({len(trained)} methods trained)", _by_folder(layout.root)))
        tracker = resources["mlflow"].tracker()
        merged = export_model(f"models:/{trained[0]}/1", work / "merged", tracker.tracking_uri)  # before pruning
        report = apply_retention(tracker, layout, RetentionPolicy(keep_last=1, min_age_hours=0), busy_assets=set())
        rows.append((f"after retention, keep_last=1 (freed {mb(report.total_freed)} MB)", _by_folder(layout.root)))

    versions = [v for name in trained for v in tracker.client.search_model_versions(f"name='{name}'")]
    formats = sorted({v.tags["storage.format"] for v in versions})
    version_bytes = [int(v.tags["storage.bytes"]) for v in versions]
    merged_bytes = sum(p.stat().st_size for p in merged.iterdir() if p.is_file())
    tokenizer_bytes = sum((base / name).stat().st_size for name in TOKENIZER_FILES if (base / name).is_file())
    adapters = [b for v, b in zip(versions, version_bytes) if v.tags["storage.format"] == "adapter"]
    adapter_weights = (sum(adapters) / len(adapters)) if adapters else 0
    per_round_after = sum(version_bytes) / args.rounds

    folders = sorted({name for _, sizes in rows for name in sizes})
    lines = [
        "# Model storage: bytes on disk per retraining round",
        "",
        f"Model `{args.model}` ({mb(sum(p.stat().st_size for p in base.glob('*.safetensors')))} MB of weights), "
        f"{args.rounds} rounds of every method ({', '.join(trained)}), LoRA r=16 (the default), {args.steps} step(s) "
        f"each, {args.rows} new feedback rows per round; {os.cpu_count()} CPU cores, Python "
        f"{platform.python_version()}; {date.today()}. Wall time {time.perf_counter() - started:.0f} s. Command: "
        f"`python benchmarks/storage.py --model {args.model} --rounds {args.rounds} --steps {args.steps} "
        f"--methods {args.methods}`.",
        "",
        "## Per round, by layout",
        "",
        f"| layout | stored per trained method | per round ({len(trained)} methods) |",
        "|---|---|---|",
        f"| merged ×2 (the issue's measurement: merged weights in `runs/` and again in MLflow) | "
        f"{mb(2 * merged_bytes)} MB | {mb(2 * merged_bytes * len(trained))} MB |",
        f"| adapter ×2 (LoRA run folder kept in `runs/` and uploaded again) | "
        f"{mb(2 * (adapter_weights + tokenizer_bytes))} MB | {mb(2 * (adapter_weights + tokenizer_bytes) * len(trained))} MB |",
        f"| **this change: one MLflow model per version** (measured) | {mb(per_round_after / len(trained))} MB | "
        f"**{mb(per_round_after)} MB** |",
        "",
        f"Formats registered: {', '.join(formats)}. A merged model measures {mb(merged_bytes)} MB (an export of "
        f"`{trained[0]}` version 1); the tokenizer files {mb(tokenizer_bytes)} MB. The base model is stored once, "
        "in `models/`, and referenced by every adapter version.",
        "",
        "## The data root, measured",
        "",
        "| when | " + " | ".join(f"`{name}/` MB" for name in folders) + " | total MB |",
        "|---" * (len(folders) + 2) + "|",
        *(f"| {label} | " + " | ".join(mb(sizes.get(name, 0)) for name in folders) + f" | {mb(sum(sizes.values()))} |"
          for label, sizes in rows),
        "",
        "`runs/` holds no weights after a round: a run folder is staging, removed once its version is registered. "
        "`mlflow/` grows by one adapter (or one full model) per trained method and round; retention then keeps the "
        "champion, the rollback target and the newest `keep_last` versions of each method.",
        "",
    ]
    RESULTS.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
