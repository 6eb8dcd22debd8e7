"""Peak memory and speed of every method: our defaults against bare TRL's, and what each saving contributes.

For each method (sft, dpo, kto, orpo) on SmolLM2-135M-Instruct with LoRA r=16, batch 4, max length 512 and
pairs from the HH harmless-base file, each configuration trains a few steps in its own process:

- bare TRL: the trainer with TRL 1.16's default config (only batch, length, steps and the same LoRA set);
- before: this project's previous defaults (no gradient checkpointing, the LM head scoring every position on a
  CPU, no SFT packing; the glibc mmap threshold that training now sets stays on, so its RSS is lower than the
  old code's);
- ours: the current defaults (``alignment-pipelines train <method>`` with nothing overridden);
- one saving turned off at a time (SFT packing), and for DPO and KTO full fine-tuning with a reference model
  against precomputed reference log-probabilities, where that saving applies.

Recorded: the process's peak RSS (``ru_maxrss``), the estimate made before launch, seconds per step (TRL's
``train_runtime`` over the steps, the first step included), trainer setup seconds (tokenizing and any
precomputation) and non-padding tokens trained on per second. Results go to benchmarks/results/memory.md.

    python benchmarks/memory.py --steps 3
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
RESULTS = HERE.parent / "results" / "memory.md"
HH_PAIRS = Path(os.environ.get("ALIGNMENT_PIPELINES_SHARED", HERE.parents[2] / "shared")) / "data" / \
    "hh-rlhf-harmless-base.jsonl.gz"
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear", "task_type": "CAUSAL_LM"}
BEFORE = {"gradient_checkpointing": False, "score_answers_only": False}  # the defaults until issue 15
# (method, configuration, how it runs, config overrides)
RUNS = [
    ("sft", "bare TRL defaults", "bare", {}),
    ("sft", "before (no checkpointing, no packing)", "ours", {**BEFORE, "packing": False}),
    ("sft", "ours without packing", "ours", {"packing": False}),
    ("sft", "ours", "ours", {}),
    ("dpo", "bare TRL defaults", "bare", {}),
    ("dpo", "before (no checkpointing)", "ours", BEFORE),
    ("dpo", "ours", "ours", {}),
    ("dpo", "full fine-tuning, reference model", "ours", {"lora": False, "precompute_ref_log_probs": False}),
    ("dpo", "full fine-tuning, precomputed reference", "ours", {"lora": False}),
    ("kto", "bare TRL defaults", "bare", {}),
    ("kto", "before (no checkpointing)", "ours", BEFORE),
    ("kto", "ours", "ours", {}),
    ("kto", "full fine-tuning, reference model", "ours", {"lora": False, "precompute_ref_log_probs": False}),
    ("kto", "full fine-tuning, precomputed reference", "ours", {"lora": False}),
    ("orpo", "bare TRL defaults", "bare", {}),
    ("orpo", "before (no checkpointing)", "ours", {"gradient_checkpointing": False}),
    ("orpo", "ours", "ours", {}),
]


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def run_ours(args, data: str, overrides: dict) -> dict:
    from alignment_pipelines.methods import config_from_dict, run_training

    config = config_from_dict(args.method, {
        "model": args.model_dir, "data": data, "output_dir": str(Path(args.work) / "out" / args.label),
        "max_steps": args.steps, "per_device_batch_size": args.batch_size, "max_length": args.max_length,
        "save_steps": 0, **overrides})
    config.adapt_to_data({})
    metrics = run_training(args.method, config).metrics
    return {k: metrics[k] for k in ("train_runtime", "train_tokens", "tokens_per_second", "memory_estimate_gb",
                                    "trainer_setup_seconds")}


def run_bare(args, data: str) -> dict:
    """The TRL trainer with its own default config: what a user gets without this project."""
    import torch
    from peft import LoraConfig

    from alignment_pipelines.methods import data as method_data
    from alignment_pipelines.methods.training import TokenCounter

    if args.method == "sft":
        from trl import SFTConfig as Config, SFTTrainer as Trainer
        dataset = method_data.to_sft_dataset(method_data.load_pairs(data, ("prompt", "chosen")))
    elif args.method == "dpo":
        from trl import DPOConfig as Config, DPOTrainer as Trainer
        dataset = method_data.to_preference_dataset(method_data.load_pairs(data))
    elif args.method == "kto":
        from trl import KTOConfig as Config, KTOTrainer as Trainer
        dataset = method_data.to_unpaired_dataset(method_data.load_binary(data))
    else:
        from trl.experimental.orpo import ORPOConfig as Config, ORPOTrainer as Trainer
        dataset = method_data.to_preference_dataset(method_data.load_pairs(data))
    config = Config(output_dir=str(Path(args.work) / "bare" / args.label), max_steps=args.steps,
                    per_device_train_batch_size=args.batch_size, max_length=args.max_length, report_to=[],
                    save_strategy="no", logging_steps=1, disable_tqdm=True,
                    use_cpu=not torch.cuda.is_available())
    started = time.perf_counter()
    trainer = Trainer(model=args.model_dir, args=config, train_dataset=dataset, peft_config=LoraConfig(**LORA))
    setup = time.perf_counter() - started
    keys = ("chosen_input_ids", "rejected_input_ids") if args.method == "orpo" else ("input_ids",)
    counter = TokenCounter(trainer, keys)
    runtime = trainer.train().metrics["train_runtime"]
    return {"train_runtime": runtime, "train_tokens": counter.tokens, "tokens_per_second": counter.tokens / runtime,
            "trainer_setup_seconds": setup, "bf16": config.bf16, "gradient_checkpointing": config.gradient_checkpointing}


def run_one(args) -> None:
    """Child process: one configuration; prints its measurements as JSON on the last line."""
    data = str(Path(args.work) / ("binary.parquet" if args.method == "kto" else "pairs.parquet"))
    overrides = json.loads(args.overrides)
    measured = run_bare(args, data) if args.how == "bare" else run_ours(args, data, overrides)
    print(json.dumps({**measured, "peak_rss_gb": _peak_gb()}))


def prepare(work: Path, examples: int, seed: int) -> None:
    """The first ``examples`` accepted HH pairs after a seeded shuffle; the binary rows (chosen = desirable,
    rejected = undesirable) of half as many pairs, so that every method's data is exactly what its steps use."""
    from alignment_pipelines.data.records import write_records
    from alignment_pipelines.data.datasets.splits import binary_from_pairs
    from alignment_pipelines.data.validate.engine import validate_file

    accepted = validate_file(HH_PAIRS).accepted
    pairs = accepted.sample(n=examples, random_state=seed).reset_index(drop=True)
    write_records(pairs, work / "pairs.parquet")
    write_records(binary_from_pairs(pairs.head(examples // 2)), work / "binary.parquet")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--methods", nargs="+", default=["sft", "dpo", "kto", "orpo"])
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--method", "--label", "--how", "--overrides", "--work", "--model-dir"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return run_one(args)

    from alignment_pipelines.layout import default_data_root
    from alignment_pipelines.models.loading import resolve_model

    model_dir = resolve_model(args.model, default_data_root() / "models")
    rows = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work, args.steps * args.batch_size, seed=0)
        for index, (method, label, how, overrides) in enumerate(r for r in RUNS if r[0] in args.methods):
            out = subprocess.run([sys.executable, str(HERE), "--one", "--method", method, "--label", f"run{index}",
                                  "--how", how, "--overrides", json.dumps(overrides), "--work", str(work),
                                  "--model-dir", str(model_dir), "--steps", str(args.steps),
                                  "--batch-size", str(args.batch_size), "--max-length", str(args.max_length)],
                                 capture_output=True, text=True,
                                 env=os.environ | {"TQDM_DISABLE": "1", "TRL_EXPERIMENTAL_SILENCE": "1"})
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                rows.append({"method": method, "label": label, "error": out.stderr.strip().splitlines()[-1]})
            else:
                rows.append({"method": method, "label": label, **json.loads(out.stdout.strip().splitlines()[-1])})
            print(rows[-1], flush=True)
    write_table(rows, args, time.perf_counter() - started)


def write_table(rows: list[dict], args, seconds: float) -> None:
    lines = [
        "# Peak memory and speed per method: our defaults against bare TRL's",
        "",
        f"SmolLM2-135M-Instruct, LoRA r=16 (unless full fine-tuning), batch {args.batch_size}, max length "
        f"{args.max_length}, {args.steps} steps, {args.steps * args.batch_size} HH harmless-base pairs (KTO: the "
        f"binary rows of half of them); {os.cpu_count()} CPU cores (shared), no GPU, Python "
        f"{platform.python_version()}; {time.strftime('%Y-%m-%d')}; the whole run took {seconds / 60:.0f} min. "
        f"Command: `python benchmarks/memory.py --steps {args.steps}`.",
        "",
        "| method | configuration | peak RSS GB | estimate GB | s / step | tokens / s | setup s | "
        "tokens/s vs. before |",
        "|---|---|---|---|---|---|---|---|",
    ]
    before = {r["method"]: r for r in rows if r["label"].startswith("before") and "error" not in r}
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['method']} | {row['label']} | failed: {row['error'][:120]} | | | | | |")
            continue
        base = before.get(row["method"])
        ratio = f"{row['tokens_per_second'] / base['tokens_per_second']:.2f}×" if base else ""
        estimate = f"{row['memory_estimate_gb']:.2f}" if "memory_estimate_gb" in row else ""
        lines.append(f"| {row['method']} | {row['label']} | {row['peak_rss_gb']:.2f} | {estimate} | "
                     f"{row['train_runtime'] / args.steps:.1f} | {row['tokens_per_second']:.0f} | "
                     f"{row['trainer_setup_seconds']:.1f} | {ratio} |")
    lines += ["", "GB are 10^9 bytes. Peak RSS is the whole training process's (imports, data, model, training). "
              "Tokens are the non-padding tokens of the batches trained on (prompt and answer; DPO and ORPO count "
              "chosen and rejected), over TRL's `train_runtime`. Setup is the trainer's construction: tokenizing, "
              "and for a precomputed reference its forward over the data."]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
