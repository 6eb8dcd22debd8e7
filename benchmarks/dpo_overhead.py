"""What does the pipeline cost on top of TRL? The same DPO run three ways, in one go.

1. bare TRL: a plain script with `trl.DPOTrainer` + PEFT LoRA, nothing of ours;
2. `alignment-pipelines train dpo --config ...` (what a GPU worker runs);
3. the `policy_dpo` asset materialized through Dagster with the Pipes subprocess launcher
   (includes the MLflow run, per-step metric streaming and model registration).

Each way runs in a fresh process; wall time, seconds per optimizer step (TRL's own
`train_runtime`) and peak RSS (the process and its children) are recorded, with the ratio to
bare TRL. Results go to benchmarks/results/dpo_overhead.md.

    python benchmarks/dpo_overhead.py --steps 20 --model smollm2-135m-instruct
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
RESULTS = HERE.parent / "results" / "dpo_overhead.md"


def _peak_mib() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024


def _config(args, work: Path, output: str) -> dict:
    return {"model": args.model_dir, "data": str(work / "train.parquet"), "eval_data": str(work / "eval.parquet"),
            "output_dir": output,
            "max_steps": args.steps, "learning_rate": 5e-5, "per_device_batch_size": args.batch_size,
            "max_length": args.max_length, "lora": True, "beta": 0.1, "seed": 0}


def way_bare(args, work: Path) -> dict:
    """Plain TRL, as a user would write it without this project."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from alignment_pipelines.data.records import read_records

    def conversational(path):
        pairs = read_records(path)
        return Dataset.from_list([
            {"prompt": list(p), "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]}
            for p, c, r in zip(pairs["prompt"], pairs["chosen"], pairs["rejected"])])
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, use_safetensors=True)
    trainer = DPOTrainer(
        model=model, processing_class=tokenizer, train_dataset=conversational(work / "train.parquet"),
        eval_dataset=conversational(work / "eval.parquet"),
        peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                               task_type="CAUSAL_LM"),
        args=DPOConfig(output_dir=str(work / "bare"), max_steps=args.steps, learning_rate=5e-5,
                       per_device_train_batch_size=args.batch_size, max_length=args.max_length, beta=0.1,
                       logging_steps=1, report_to=[], save_strategy="no", seed=0, data_seed=0,
                       lr_scheduler_type="constant", activation_checkpointing=False,
                       use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
                       # the same precision our trainers pick: TRL 1.16 defaults to bf16, which on a CPU
                       # without bf16 units is several times slower (14 s/step here instead of ~5)
                       bf16=bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()), fp16=False))
    output = trainer.train()
    trainer.evaluate()  # the pipeline evaluates on the held-out split after training; so does this
    trainer.model.merge_and_unload().save_pretrained(work / "bare" / "model", safe_serialization=True)
    return {"train_runtime": output.metrics["train_runtime"]}


def way_cli(args, work: Path) -> dict:
    config_file = work / "cli.json"
    config_file.write_text(json.dumps(_config(args, work, str(work / "cli" / "model"))))
    subprocess.run([sys.executable, "-m", "alignment_pipelines.cli", "train", "dpo", "--config", str(config_file)],
                   check=True, stdout=subprocess.DEVNULL)
    metrics = json.loads((work / "cli" / "model" / "metrics.json").read_text())["metrics"]
    return {"train_runtime": metrics["train_runtime"]}


def way_dagster(args, work: Path) -> dict:
    """The real `policy_dpo` asset; its inputs are handed over as already-materialized refs."""
    import dagster as dg

    from alignment_pipelines.definitions import build_resources
    from alignment_pipelines.refs import DatasetRef, ModelRef
    from alignment_pipelines.assets.training import policy_dpo

    @dg.asset(name="sft_model")
    def given_sft_model():
        return ModelRef(path=args.model_dir, method="sft", base_model=args.model)

    @dg.asset(name="preference_pairs")
    def given_pairs():
        return DatasetRef(name="preference_pairs", version="benchmark", train_path=str(work / "train.parquet"),
                          eval_path=str(work / "eval.parquet"), batches=(), train_rows=0, eval_rows=0)

    config = {k: v for k, v in _config(args, work, "").items()
              if k in ("max_steps", "learning_rate", "per_device_batch_size", "max_length", "lora", "beta", "seed")}
    config["save_steps"] = 0
    with dg.instance_for_test() as instance:
        result = dg.materialize([given_sft_model, given_pairs, policy_dpo], instance=instance,
                                resources=build_resources(data_root=work / "dagster", launcher_mode="subprocess"),
                                run_config={"ops": {"policy_dpo": {"config": config}}})
    ref = result.output_for_node("policy_dpo")
    return {"train_runtime": ref.metrics["train_runtime"]}


WAYS = {"bare TRL": way_bare, "alignment-pipelines train": way_cli, "policy_dpo asset (Pipes)": way_dagster}


def run_one(way: str, args) -> None:
    """Child process: run one way, print its measurements as JSON."""
    work = Path(args.work)
    start = time.perf_counter()
    measured = WAYS[way](args, work)
    wall = time.perf_counter() - start
    print(json.dumps({"way": way, "wall_s": wall, **measured, "peak_mib": _peak_mib()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return run_one(args.one, args)

    from alignment_pipelines.data.demo import demo_feedback_path
    from alignment_pipelines.data.records import write_records
    from alignment_pipelines.data.datasets.splits import split_by_prompt
    from alignment_pipelines.data.validate.engine import validate_file
    from alignment_pipelines.layout import default_data_root
    from alignment_pipelines.models.loading import resolve_model

    model_dir = resolve_model(args.model, default_data_root() / "models")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        train, held_out = split_by_prompt(validate_file(demo_feedback_path()).accepted)
        write_records(train, work / "train.parquet")
        write_records(held_out, work / "eval.parquet")
        for way in WAYS:
            out = subprocess.run([sys.executable, str(HERE), "--one", way, "--work", str(work),
                                  "--model-dir", str(model_dir), "--model", args.model, "--steps", str(args.steps),
                                  "--batch-size", str(args.batch_size), "--max-length", str(args.max_length)],
                                 check=True, capture_output=True, text=True, env=os.environ | {"TQDM_DISABLE": "1"})
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    write_table(rows, args)


def write_table(rows: list[dict], args) -> None:
    bare = rows[0]
    lines = [
        "# DPO overhead: bare TRL vs. the CLI vs. the Dagster asset",
        "",
        f"Model `{args.model}`, LoRA r=16, {args.steps} steps, batch {args.batch_size}, max length "
        f"{args.max_length}, demo feedback; {os.cpu_count()} CPU cores, no GPU, {platform.python_version()}; "
        f"{time.strftime('%Y-%m-%d')}. Command: `python benchmarks/dpo_overhead.py --steps {args.steps} "
        f"--model {args.model}`.",
        "",
        "| way | wall s | train s | s / step | peak RSS MiB | wall vs. bare | s/step vs. bare |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        per_step = row["train_runtime"] / args.steps
        lines.append(f"| {row['way']} | {row['wall_s']:.1f} | {row['train_runtime']:.1f} | {per_step:.2f} | "
                     f"{row['peak_mib']:.0f} | {row['wall_s'] / bare['wall_s']:.2f}× | "
                     f"{row['train_runtime'] / bare['train_runtime']:.3f}× |")
    lines += ["", "Every way trains on the same split of the demo feedback and evaluates on its held-out part. "
              "Wall time includes process start, imports, model load, evaluation and saving the merged model; "
              "the asset also starts a Dagster run in a fresh instance, opens an MLflow run (a new SQLite store), "
              "streams every step's metrics through Pipes and uploads and registers the model version. "
              "Seconds per step is TRL's own `train_runtime` divided by the steps."]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
