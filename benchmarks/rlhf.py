"""RLHF on SmolLM2 and the Anthropic HH harmless pairs: reward-model accuracy, and what each method costs.

Six runs through `run_training` (what the training worker runs), each in a fresh process so that its peak memory
is its own:

1. reward model with LoRA, 2. reward model in full: trained on the training split of the HH pairs (split by prompt),
   scored on the held-out split, whose prompts they never saw;
3. PPO with LoRA, 4. PPO in full, 5. RLOO with LoRA, 6. RLOO in full: the same prompts (the training split), the
   same model, the same samples per step and steps, rewarded by the LoRA reward model of run 1.

Every run starts from SmolLM2-135M-Instruct itself (the pipeline starts them from its SFT model; an SFT step is left
out here to keep the benchmark within its time). The tables go to benchmarks/results/rlhf.md; its reading of them
is written by hand below them.

    python benchmarks/rlhf.py

The critic comparison (``--critic``) runs PPO with LoRA twice on the LoRA reward model, longer, and reports the
critic's explained variance step by step: once with this tree's critic (a value model started from the reward model,
with its own adapter) and once with the code of ``--before-tree``, a checkout of the commit before it (the value head
on the policy's own trunk), imported through PYTHONPATH:

    git worktree add /tmp/ppo_before da8b4a2
    python benchmarks/rlhf.py --critic --before-tree /tmp/ppo_before --work /tmp/rlhf_bench
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
# benchmarks/datasets.py would shadow Hugging Face's datasets package for everything this script imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE.parent]
RESULTS = HERE.parent / "results" / "rlhf.md"
HH_PAIRS = HERE.parents[2] / "shared" / "data" / "hh-rlhf-harmless-base.jsonl.gz"
RM_RUNS = ("reward LoRA", "reward full")
RL_RUNS = ("PPO LoRA", "PPO full", "RLOO LoRA", "RLOO full")
CRITIC_RUNS = ("PPO LoRA, value head on the policy (before)", "PPO LoRA, critic from the reward model")


def run_specs(args, work: Path) -> dict[str, tuple[str, dict]]:
    """(method, config) of every run."""
    common = {"model": args.model_dir, "data": str(work / "train.parquet"), "seed": 0, "logging_steps": 1,
              "gradient_checkpointing": False, "save_steps": 0}
    reward = common | {"eval_data": str(work / "eval.parquet"), "max_steps": args.rm_steps,
                       "per_device_batch_size": args.rm_batch, "max_length": args.rm_max_length,
                       "learning_rate": args.rm_learning_rate}
    online = common | {"reward_model": str(work / "reward LoRA"), "reward_funcs": ["model"],
                       "max_steps": args.rl_steps, "per_device_batch_size": args.rl_batch,
                       "max_length": args.rl_max_length, "max_new_tokens": args.max_new_tokens,
                       "learning_rate": 1e-5}
    return {
        "reward LoRA": ("reward", reward | {"lora": True}),
        "reward full": ("reward", reward | {"lora": False, "learning_rate": args.rm_learning_rate / 10}),
        "PPO LoRA": ("ppo", online | {"lora": True}),
        "PPO full": ("ppo", online | {"lora": False}),
        "RLOO LoRA": ("rloo", online | {"lora": True, "num_generations": args.num_generations}),
        "RLOO full": ("rloo", online | {"lora": False, "num_generations": args.num_generations}),
        CRITIC_RUNS[0]: ("ppo", online | {"lora": True, "max_steps": args.critic_steps}),
        CRITIC_RUNS[1]: ("ppo", online | {"lora": True, "max_steps": args.critic_steps} | critic_overrides(args)),
    }


CRITIC_OPTIONS = ("value_warmup_steps", "value_learning_rate", "value_model_start", "temperature", "ppo_epochs",
                  "num_mini_batches")


def critic_overrides(args) -> dict:
    """The PPO options the critic run was given on the command line; the rest keep PPO's own defaults."""
    return {name: getattr(args, name) for name in CRITIC_OPTIONS if getattr(args, name) is not None}


def run_one(name: str, args) -> None:
    """Child process: one run; print its measurements as JSON."""
    import torch

    from alignment_pipelines.methods import config_from_dict, run_training

    work = Path(args.work)
    method, values = run_specs(args, work)[name]
    started = time.perf_counter()
    result = run_training(method, config_from_dict(method, values | {"output_dir": str(work / name)}))
    peak = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        peak["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    curves = {key: [h.get(key) for h in result.history]
              for key in ("val/explained_variance", "objective/scores", "loss/value_avg", "objective/kl")}
    print(json.dumps({"name": name, "method": method, "wall_s": time.perf_counter() - started, **peak,
                      "metrics": result.metrics, "curves": curves}))


def train_seconds(row: dict) -> float:
    """Seconds spent in the training loop: TRL's train_runtime, the PPO trainer's wall_seconds."""
    return row["metrics"].get("train_runtime", row["metrics"]["wall_seconds"])


def samples_per_second(row: dict, args) -> float:
    """Pairs per second for a reward model, sampled answers per second for PPO and RLOO."""
    batch = args.rm_batch if row["method"] == "reward" else args.rl_batch
    return row["metrics"]["steps"] * batch / train_seconds(row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", default=str(HH_PAIRS), help="HH pairs (hh-rlhf layout)")
    parser.add_argument("--eval-fraction", type=float, default=0.1)
    parser.add_argument("--rm-steps", type=int, default=30)
    parser.add_argument("--rm-batch", type=int, default=4, help="pairs per reward-model step")
    parser.add_argument("--rm-max-length", type=int, default=256)
    parser.add_argument("--rm-learning-rate", type=float, default=5e-4)
    parser.add_argument("--rl-steps", type=int, default=3)
    parser.add_argument("--rl-batch", type=int, default=4, help="sampled answers per PPO/RLOO step")
    parser.add_argument("--rl-max-length", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--critic", action="store_true", help="only the critic comparison (see above)")
    parser.add_argument("--before-tree", help="--critic: a checkout of the code before the separate critic")
    parser.add_argument("--critic-steps", type=int, default=8, help="--critic: PPO steps of each run")
    # --critic, the run after the change; each left out keeps PPO's default (PPOMethodConfig)
    parser.add_argument("--value-warmup-steps", type=int, help="--critic: critic-only steps (after)")
    parser.add_argument("--value-learning-rate", type=float, help="--critic: the critic's (after)")
    parser.add_argument("--value-model-start", help="--critic: the critic's start (after)")
    parser.add_argument("--temperature", type=float, help="--critic: sampling temperature (after)")
    parser.add_argument("--ppo-epochs", type=int, help="--critic: passes over each rollout (after)")
    parser.add_argument("--num-mini-batches", type=int, help="--critic: optimizer steps a pass (after)")
    parser.add_argument("--work", help="--critic: a folder kept between runs (the data and the LoRA reward model)")
    parser.add_argument("--runs", nargs="+", default=[*RM_RUNS, *RL_RUNS], help=argparse.SUPPRESS)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return run_one(args.one, args)
    if args.critic:
        return critic_comparison(args)

    from alignment_pipelines.data.records import write_records
    from alignment_pipelines.data.datasets.splits import split_by_prompt
    from alignment_pipelines.data.validate.engine import validate_file
    from alignment_pipelines.layout import default_data_root
    from alignment_pipelines.models.loading import resolve_model

    args.model_dir = str(resolve_model(args.model, default_data_root() / "models"))
    pairs = validate_file(args.data).accepted
    train, held_out = split_by_prompt(pairs, eval_fraction=args.eval_fraction)
    rows = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_records(train, work / "train.parquet")
        write_records(held_out, work / "eval.parquet")
        for name in args.runs:
            row = finished(name, child(name, args, work))
            if row:
                rows.append(row)
    write_table(rows, args, len(pairs), len(train), len(held_out), time.perf_counter() - started)


def child(name: str, args, work: Path, code: str | None = None):
    """Start run ``name`` in a fresh process (its peak memory its own); ``code``: import the project from there.
    (process, its stdout file, its stderr file)."""
    forwarded = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                 if k not in ("runs", "one", "work", "model_dir", "model", "data", "critic", "before_tree")
                 and v is not None]
    env = os.environ | {"TQDM_DISABLE": "1"} | ({"PYTHONPATH": code} if code else {})
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # a full pipe nobody reads would stall
    process = subprocess.Popen([sys.executable, str(HERE), "--one", name, "--work", str(work), "--model-dir",
                                args.model_dir, *forwarded], stdout=out, stderr=err, env=env)
    return process, out, err


def finished(name: str, started) -> dict | None:
    """The run's measurements, or None (and its error printed): one failed run still leaves the others' figures."""
    process, out_file, err_file = started
    process.wait()
    out, err = (stream.seek(0) or stream.read() for stream in (out_file, err_file))
    if process.returncode:
        print(f"{name} failed:\n{err[-3000:]}", flush=True)
        return None
    row = json.loads(out.strip().splitlines()[-1])
    print(json.dumps(row, default=str)[:1500], flush=True)
    return row


def critic_comparison(args) -> None:
    """PPO with LoRA before and after the separate critic, side by side (two processes at once); the section goes
    to the end of the results file, replacing an older one."""
    from alignment_pipelines.data.records import write_records
    from alignment_pipelines.data.datasets.splits import split_by_prompt
    from alignment_pipelines.data.validate.engine import validate_file
    from alignment_pipelines.layout import default_data_root
    from alignment_pipelines.models.loading import resolve_model

    if not args.work or not args.before_tree:
        raise SystemExit("--critic needs --work (a folder kept between runs) and --before-tree")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    args.model_dir = str(resolve_model(args.model, default_data_root() / "models"))
    if not (work / "train.parquet").exists():
        train, held_out = split_by_prompt(validate_file(args.data).accepted, eval_fraction=args.eval_fraction)
        write_records(train, work / "train.parquet")
        write_records(held_out, work / "eval.parquet")
    if not (work / "reward LoRA").exists() and not finished("reward LoRA", child("reward LoRA", args, work)):
        return
    started = time.perf_counter()
    before, after = CRITIC_RUNS
    processes = {before: child(before, args, work, code=str(Path(args.before_tree).resolve())),
                 after: child(after, args, work)}
    rows = {name: finished(name, process) for name, process in processes.items()}
    if not all(rows.values()):
        return
    write_critic_section(rows, args, time.perf_counter() - started)


CRITIC_HEADING = "## PPO's critic: a value head on the policy against a value model from the reward model"


def write_critic_section(rows: dict, args, total_s: float) -> None:
    steps = range(1, args.critic_steps + 1)
    lines = [
        CRITIC_HEADING,
        "",
        f"PPO with LoRA (PERL), {args.critic_steps} steps of {args.rl_batch} answers (at most {args.max_new_tokens} "
        f"new tokens, prompts of at most {args.rl_max_length - args.max_new_tokens} tokens, 4 PPO epochs, one "
        "minibatch), reward = the LoRA reward model (trained by this script, "
        "`--rm-steps` as above), KL coefficient 0.05, missing-EOS penalty 1, seed 0; the policy at learning rate "
        "1e-05 in both. Before: the code of the commit before the separate critic (`--before-tree`): a zeroed "
        "`Linear(hidden, 1)` on the policy's last hidden state, in the policy's optimizer group. After: a value model "
        "started from the reward model (its score head and trunk) with its own LoRA adapter, at "
        "`value_learning_rate` 5e-4. Both ran at the same time, one process each, at `nice 10` on a 2-core CPU shared "
        f"with other work (both took {total_s / 60:.1f} minutes); peak RSS is each process's own. "
        f"Command: `python benchmarks/rlhf.py --critic --before-tree <checkout> --work <folder> --critic-steps "
        f"{args.critic_steps} --rl-batch {args.rl_batch} --max-new-tokens {args.max_new_tokens} --rl-max-length "
        f"{args.rl_max_length}`.",
        "",
        "| run | " + " | ".join(f"step {s}" for s in steps) + " | train s | peak RSS MiB |",
        "|---|" + "---|" * (len(steps) + 2),
    ]
    for name, row in rows.items():
        curve = row["curves"]["val/explained_variance"]
        shown = " | ".join("n/a" if v is None or v != v else f"{v:.2f}" for v in curve)
        lines.append(f"| {name}: explained variance | {shown} | {train_seconds(row):.0f} | {row['peak_rss_mib']:.0f} |")
    for name, row in rows.items():
        shown = " | ".join(f"{v:.2f}" for v in row["curves"]["objective/scores"])
        lines.append(f"| {name}: mean score | {shown} | | |")
    text = RESULTS.read_text() if RESULTS.exists() else ""
    text = text.split(CRITIC_HEADING)[0].rstrip("\n")
    RESULTS.write_text(text + "\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


def _ratio(rows: dict, a: str, b: str, key) -> str:
    return f"{key(rows[a]) / key(rows[b]):.2f}×" if a in rows and b in rows else "n/a"


def write_table(rows: list[dict], args, n_pairs: int, n_train: int, n_eval: int, total_s: float) -> None:
    from alignment_pipelines.evaluation.stats import wilson_interval

    by_name = {row["name"]: row for row in rows}
    gpu = any("peak_gpu_mib" in row for row in rows)
    device = "one CUDA GPU" if gpu else f"{os.cpu_count()} CPU cores, no GPU"
    lines = [
        "# RLHF: reward-model accuracy and the cost of PPO, RLOO and LoRA (PERL)",
        "",
        f"SmolLM2-135M-Instruct (`{args.model}`), Anthropic HH harmless-base: {n_pairs} accepted pairs, split by "
        f"prompt into {n_train} for training and {n_eval} held out. {device}, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d')}; the whole benchmark took {total_s / 60:.1f} minutes. Command: "
        f"`python benchmarks/rlhf.py --rm-steps {args.rm_steps} --rl-steps {args.rl_steps}`.",
        "",
        "## Reward model: pairwise accuracy on the held-out pairs",
        "",
        f"{args.rm_steps} steps of {args.rm_batch} pairs (max length {args.rm_max_length} tokens: TRL drops longer "
        "training pairs, and the held-out pairs scored are those that fit too), LoRA r=16 at learning rate "
        f"{args.rm_learning_rate:g}, full at {args.rm_learning_rate / 10:g}, centring coefficient 0.01, seed 0. "
        "Accuracy counts a tie as half; the interval is Wilson's 95%.",
        "",
        "| run | held-out accuracy | 95% interval | mean margin | pairs scored | held-out / training pairs too long | "
        "pairs / s | train s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in RM_RUNS:
        if name not in by_name:
            continue
        row, m = by_name[name], by_name[name]["metrics"]
        low, high = wilson_interval(m["pairwise_accuracy"] * m["report_pairs"], int(m["report_pairs"]))
        lines.append(f"| {name} | {m['pairwise_accuracy']:.3f} | {low:.3f}–{high:.3f} | {m['mean_margin']:.3f} | "
                     f"{m['report_pairs']:.0f} | {m['report_pairs_too_long']:.0f} / {m['train_pairs_too_long']:.0f} | {samples_per_second(row, args):.2f} "
                     f"| {train_seconds(row):.0f} | {row['peak_rss_mib']:.0f} |")
    lines += [
        "",
        "## Cost: the same prompts, model, samples per step and steps",
        "",
        f"PPO and RLOO: {args.rl_steps} steps of {args.rl_batch} sampled answers (PPO: {args.rl_batch} prompts x 1, "
        f"one minibatch, 4 PPO epochs; RLOO: {args.rl_batch // args.num_generations} prompts x "
        f"{args.num_generations}, one update), at most {args.max_new_tokens} new tokens, prompts of at most "
        f"{args.rl_max_length - args.max_new_tokens} tokens, reward = the LoRA reward model above, KL coefficient "
        "0.05. Wall s is the whole process (imports, loading every model, training, saving); train s the training "
        "loop alone; samples / s = answers (reward model: pairs) per second of training loop; peak RSS of the "
        "process" + (", peak GPU memory allocated by torch." if gpu else "."),
        "",
        "| run | models in memory | wall s | train s | samples / s | peak RSS MiB |" + (" peak GPU MiB |" if gpu else ""),
        "|---|---|---|---|---|---|" + ("---|" if gpu else ""),
    ]
    models = {"reward LoRA": "1 (adapter + score head trained)", "reward full": "1",
              "PPO LoRA": "3 (policy = reference with adapter off; reward; critic = reward model + its own adapter)",
              "PPO full": "4 (policy, reference, reward, value)", "RLOO LoRA": "2 (policy = reference; reward)",
              "RLOO full": "3 (policy, reference, reward)"}
    for name in (*RM_RUNS, *RL_RUNS):
        if name in by_name:
            row = by_name[name]
            lines.append(f"| {name} | {models[name]} | {row['wall_s']:.0f} | {train_seconds(row):.0f} | "
                         f"{samples_per_second(row, args):.2f} | {row['peak_rss_mib']:.0f} |"
                         + (f" {row.get('peak_gpu_mib', 0):.0f} |" if gpu else ""))
    rss = lambda row: row["peak_rss_mib"]  # noqa: E731
    speed = lambda row: samples_per_second(row, args)  # noqa: E731
    lines += [
        "",
        "## Against the seed's claims",
        "",
        "| claim | measured |",
        "|---|---|",
        f"| RLOO uses 50–70% less memory than PPO | RLOO / PPO peak RSS: LoRA {_ratio(by_name, 'RLOO LoRA', 'PPO LoRA', rss)}, "
        f"full {_ratio(by_name, 'RLOO full', 'PPO full', rss)} |",
        f"| RLOO runs 2–3× faster than PPO | RLOO / PPO samples per second: LoRA "
        f"{_ratio(by_name, 'RLOO LoRA', 'PPO LoRA', speed)}, full {_ratio(by_name, 'RLOO full', 'PPO full', speed)} |",
        f"| a LoRA reward model uses ~50% less memory | LoRA / full peak RSS "
        f"{_ratio(by_name, 'reward LoRA', 'reward full', rss)} |",
        f"| a LoRA policy uses ~20% less memory | PPO LoRA / full peak RSS {_ratio(by_name, 'PPO LoRA', 'PPO full', rss)}, "
        f"RLOO {_ratio(by_name, 'RLOO LoRA', 'RLOO full', rss)} |",
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    kept = RESULTS.read_text().partition(CRITIC_HEADING) if RESULTS.exists() else ("", "", "")
    RESULTS.write_text("\n".join(lines) + "\n" + ("\n" + kept[1] + kept[2] if kept[1] else ""))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
