"""Every seed method from one SFT model on the Anthropic HH harmless pairs, measured on the eval split.

The pairs are validated by the project's engine, deduplicated and split by a seeded hash of each prompt into train,
judge and eval as ``preference_pairs`` splits them (10% eval, 20% judge). From SmolLM2-135M-Instruct:

- SFT on the train split's chosen answers; a training reward model (from SFT, train split) and an evaluation reward
  model (from SFT, judge split), both LoRA, each scored by the reward method's own report on every eval pair
  (a long conversation keeps its last ``max_length`` tokens, as training renders it);
- from SFT: DPO (pairs), KTO (binary rows derived from the pairs, class weights from the balance report), PPO and
  RLOO (prompts, rewarded by the training reward model) and online DPO (prompts, annotated by the training reward
  model as a reward-model judge); ORPO from the base model;
- then the project's evaluation (``evaluate_models``) on the eval split: every policy's implicit-reward accuracy on
  every eval pair, greedy answers to a seeded sample of eval prompts judged against SFT's by the evaluation reward
  model (both orders, Wilson 95% intervals), KL to the model each started from, answer length, and the training
  reward model's mean score of the answers.

Each run is a child process (its peak RSS its own); each finished run's figures go to ``<work>/runs/<name>.json``,
so a re-run with the same ``--work`` skips what is done. The tables go to benchmarks/results/quality.md, its
reading written by hand below them.

    OMP_NUM_THREADS=1 python benchmarks/quality.py --work /tmp/quality

At scale on a GPU (the evaluation generates with vLLM where it runs): the same command with larger budgets, e.g.
``--steps 500 --rl-steps 200 --batch 16 --max-length 1024 --max-new-tokens 128 --eval-prompts 205 --eval-pairs 205
--eval-new-tokens 128``. ``--report-only`` rewrites the tables from what ``--work`` holds so far.
"""

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
# rlhf.py removes this folder from sys.path when imported (benchmarks/datasets.py would shadow Hugging Face's
# datasets package); this script reuses its child-process helpers through that import
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))
import rlhf  # noqa: E402

RESULTS = HERE.parent / "results" / "quality.md"
EVALUATION = "evaluation"
TRAINING_RM, JUDGE_RM = "reward (train split)", "reward (judge split)"
POLICIES = ("dpo", "kto", "orpo", "ppo", "rloo", "online_dpo")
# what the evaluation and the goals need first: a slow machine that runs out of time leaves out the last ones
RUN_ORDER = ("sft", JUDGE_RM, TRAINING_RM, "dpo", "rloo", "kto", "orpo", "ppo", "online_dpo")
EVAL_FRACTION, JUDGE_FRACTION = 0.1, 0.2
LORA_LEARNING_RATE = 5e-4  # the offline methods and the reward models: LoRA adapters need a higher rate than full
RL_LEARNING_RATE = 5e-5  # PPO, RLOO and online DPO (LoRA)


def run_specs(args, work: Path) -> dict[str, tuple[str, dict]]:
    """(method, config) of every training run; ``<work>/<name>`` is each one's model folder."""
    data = work / "data"
    common = {"seed": 0, "logging_steps": 1, "gradient_checkpointing": False, "save_steps": 0, "lora": True,
              "max_length": args.max_length, "per_device_batch_size": args.batch}
    offline = common | {"max_steps": args.steps, "learning_rate": LORA_LEARNING_RATE}
    online = common | {"model": str(work / "sft"), "data": str(data / "prompts.parquet"), "max_steps": args.rl_steps,
                       "max_new_tokens": args.max_new_tokens, "learning_rate": RL_LEARNING_RATE}
    reward = offline | {"model": str(work / "sft"), "eval_data": str(data / "eval.parquet"),
                        "report_pairs": args.report_pairs}
    kto_weights = json.loads((data / "kto_balance.json").read_text())
    return {
        "sft": ("sft", common | {"model": args.model_dir, "data": str(data / "train.parquet"),
                                 "max_steps": args.steps}),
        TRAINING_RM: ("reward", reward | {"data": str(data / "train.parquet")}),
        JUDGE_RM: ("reward", reward | {"data": str(data / "judge.parquet")}),
        "dpo": ("dpo", offline | {"model": str(work / "sft"), "data": str(data / "train.parquet")}),
        "kto": ("kto", offline | {"model": str(work / "sft"), "data": str(data / "binary.parquet"),
                                  "desirable_weight": kto_weights["desirable_weight"],
                                  "undesirable_weight": kto_weights["undesirable_weight"]}),
        "orpo": ("orpo", offline | {"model": args.model_dir, "data": str(data / "train.parquet")}),
        "ppo": ("ppo", online | {"reward_model": str(work / TRAINING_RM), "reward_funcs": ["model"]}),
        "rloo": ("rloo", online | {"reward_model": str(work / TRAINING_RM), "reward_funcs": ["model"],
                                   "num_generations": args.num_generations}),
        "online_dpo": ("online_dpo", online | {"judge": "reward_model", "judge_model": str(work / TRAINING_RM)}),
    }


def prepare_data(args, work: Path) -> dict[str, int]:
    """Validate, deduplicate and split the HH pairs; write each split, the prompts and the binary rows. Row counts."""
    from alignment_pipelines.data.records import write_records
    from alignment_pipelines.data.datasets.splits import (binary_from_pairs, deduplicate_pairs, kto_balance, prompts_from,
                                                 split_three_ways)
    from alignment_pipelines.data.validate.engine import validate_file

    data = work / "data"
    counts_file = data / "counts.json"
    if counts_file.exists():
        return json.loads(counts_file.read_text())
    data.mkdir(parents=True, exist_ok=True)
    validated = validate_file(args.data)
    pairs = deduplicate_pairs(validated.accepted)
    splits = split_three_ways(pairs, eval_fraction=EVAL_FRACTION, judge_fraction=JUDGE_FRACTION, seed=0)
    for side, frame in splits.items():
        write_records(frame, data / f"{side}.parquet")
    binary = binary_from_pairs(splits["train"])
    write_records(binary, data / "binary.parquet")
    write_records(prompts_from(splits["train"]), data / "prompts.parquet")
    (data / "kto_balance.json").write_text(json.dumps(kto_balance(binary)))
    counts = {"input": len(validated.accepted) + len(validated.quarantined), "accepted": len(validated.accepted),
              "deduplicated": len(pairs), **{side: len(frame) for side, frame in splits.items()},
              "binary": len(binary)}
    counts_file.write_text(json.dumps(counts))
    return counts


def train_one(name: str, args) -> None:
    """Child process: one training run; print its measurements as JSON."""
    from alignment_pipelines.methods import config_from_dict, run_training

    work = Path(args.work)
    method, values = run_specs(args, work)[name]
    started = time.perf_counter()
    result = run_training(method, config_from_dict(method, values | {"output_dir": str(work / name)}))
    print(json.dumps({"name": name, "method": method, "wall_s": time.perf_counter() - started,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "metrics": result.metrics}, default=float))


def evaluate(args) -> None:
    """Child process: the project's evaluation of SFT and every trained policy on the eval split; print JSON."""
    from alignment_pipelines.evaluation.compare import ModelUnderTest, evaluate_models
    from alignment_pipelines.evaluation.schema import JudgeIdentity, optimisation_targets
    from alignment_pipelines.judges.reward_model import RewardModelJudge

    work = Path(args.work)
    starts = {"sft": args.model_dir, "orpo": args.model_dir} | {name: str(work / "sft") for name in POLICIES
                                                                 if name != "orpo"}
    trained = [name for name in ("sft", *POLICIES) if (work / "runs" / f"{name}.json").exists()]
    models = [ModelUnderTest(name, str(work / name), starts[name], optimisation_targets(str(work / name), {})
                             + ((str(work / TRAINING_RM),) if name == "online_dpo" else ()))
              for name in trained]
    from alignment_pipelines.data.records import read_records

    pairs = read_records(work / "data" / "eval.parquet", columns=["prompt", "chosen", "rejected"])
    pairs = pairs.sample(n=min(args.eval_pairs, len(pairs)), random_state=0).sort_index()
    distinct = list(dict.fromkeys(json.dumps(list(p), sort_keys=True) for p in pairs["prompt"]))
    prompts = [json.loads(p) for p in random.Random(0).sample(distinct, min(args.eval_prompts, len(distinct)))]
    judge_run = json.loads((work / "runs" / f"{JUDGE_RM}.json").read_text())
    judge = RewardModelJudge(str(work / JUDGE_RM), batch_size=8)
    accuracy = {k: v for k, v in judge_run["metrics"].items() if k.startswith("eval_")}
    started = time.perf_counter()
    evaluation = evaluate_models(models, "sft", pairs, prompts, judge,
                                 reward_model_path=str(work / TRAINING_RM), max_new_tokens=args.eval_new_tokens,
                                 beta=0.1, batch_size=8, max_length=args.max_length,
                                 judge_identity=JudgeIdentity.of(judge, "evaluation_reward_model", accuracy))
    samples = {name: [a.text for a in result.answers[:2]] for name, result in evaluation.results.items()}
    print(json.dumps({"name": EVALUATION, "wall_s": time.perf_counter() - started,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "prompts": len(prompts), "pairs": evaluation.pairs, "judge": evaluation.judge.id,
                      "training_reward_model": evaluation.reward_model,
                      "metrics": {name: result.metrics for name, result in evaluation.results.items()},
                      "samples": samples}, default=float))


def child(name: str, args):
    """Start ``name`` (a training run or the evaluation) in a fresh process: (process, stdout file, stderr file)."""
    import tempfile

    forwarded = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                 if k not in ("one", "runs", "report_only") and v is not None]
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # a full pipe nobody reads would stall
    process = subprocess.Popen([sys.executable, str(HERE), "--one", name, *forwarded], stdout=out, stderr=err,
                               env=os.environ | {"TQDM_DISABLE": "1"})
    return process, out, err


def run_checkpointed(name: str, args, work: Path) -> dict | None:
    """The run's figures from ``<work>/runs/<name>.json``, else from a fresh child (then written there)."""
    saved = work / "runs" / f"{name}.json"
    if saved.exists():
        print(f"{name}: done before, {saved}", flush=True)
        return json.loads(saved.read_text())
    print(f"{name}: started {time.strftime('%H:%M:%S')}", flush=True)
    row = rlhf.finished(name, child(name, args))
    if row:
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(row, default=float))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--model-dir", help="the start model's folder (default: --model from the model store)")
    parser.add_argument("--data", default=str(rlhf.HH_PAIRS), help="HH pairs (hh-rlhf layout)")
    parser.add_argument("--work", required=True, help="folder kept between runs: splits, models, figures per run")
    parser.add_argument("--steps", type=int, default=10, help="steps of SFT, DPO, KTO, ORPO and each reward model")
    parser.add_argument("--rl-steps", type=int, default=5, help="steps of PPO, RLOO and online DPO")
    parser.add_argument("--batch", type=int, default=4, help="examples (PPO, RLOO: sampled answers) per step")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per training example and scored pair")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens per sampled answer in training")
    parser.add_argument("--num-generations", type=int, default=4, help="RLOO: answers per prompt")
    parser.add_argument("--report-pairs", type=int, default=2048, help="eval pairs each reward model scores (all)")
    parser.add_argument("--eval-prompts", type=int, default=48, help="eval prompts every policy answers (a sample)")
    parser.add_argument("--eval-pairs", type=int, default=48,
                        help="eval pairs the policies' implicit reward is scored on (a sample)")
    parser.add_argument("--eval-new-tokens", type=int, default=48, help="tokens per greedy evaluation answer")
    parser.add_argument("--runs", nargs="+", default=list(RUN_ORDER), choices=RUN_ORDER,
                        help="training runs to do (default: all); the evaluation takes every trained model")
    parser.add_argument("--report-only", action="store_true",
                        help="write the tables from the runs --work holds so far; train and evaluate nothing")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return evaluate(args) if args.one == EVALUATION else train_one(args.one, args)

    from alignment_pipelines.layout import default_data_root
    from alignment_pipelines.models.loading import resolve_model

    args.model_dir = args.model_dir or str(resolve_model(args.model, default_data_root() / "models"))
    work = Path(args.work)
    counts = prepare_data(args, work)
    if args.report_only:
        rows = {path.stem: json.loads(path.read_text()) for path in sorted((work / "runs").glob("*.json"))}
    else:
        rows = {name: row for name in RUN_ORDER if name in args.runs and (row := run_checkpointed(name, args, work))}
        if "sft" in rows and JUDGE_RM in rows and (evaluation := run_checkpointed(EVALUATION, args, work)):
            rows[EVALUATION] = evaluation
    write_tables(rows, args, counts)


def interval(rate: float, n: int) -> str:
    from alignment_pipelines.evaluation.stats import wilson_interval

    low, high = wilson_interval(rate * n, n)
    return f"{low:.3f}–{high:.3f}"


def write_tables(rows: dict, args, counts: dict) -> None:
    """benchmarks/results/quality.md: the tables (a hand-written reading below them is kept)."""
    evaluation = rows.get(EVALUATION) or {}
    lines = [
        "# Quality: every seed method from one SFT model on the HH eval split",
        "",
        f"SmolLM2-135M-Instruct, Anthropic HH harmless-base (`{Path(args.data).name}`): {counts['input']} rows, "
        f"{counts['accepted']} accepted by the project's validation, {counts['deduplicated']} after deduplication, "
        f"split by a seeded hash of each prompt into {counts['train']} train / {counts['judge']} judge / "
        f"{counts['eval']} eval pairs (eval 10%, judge 20%, as `preference_pairs` splits them). "
        f"{platform.machine()}, {os.cpu_count()} CPU cores shared with other work, no GPU, one torch thread per "
        f"run (`OMP_NUM_THREADS=1`); Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}. The "
        f"finished runs' own wall times (process start to end) add up to "
        f"{sum(row['wall_s'] for row in rows.values()) / 60:.0f} minutes.",
        "",
        f"Command: `OMP_NUM_THREADS=1 python benchmarks/quality.py --work <folder> --steps {args.steps} "
        f"--rl-steps {args.rl_steps} --batch {args.batch} --max-length {args.max_length} --max-new-tokens "
        f"{args.max_new_tokens} --eval-prompts {args.eval_prompts} --eval-pairs {args.eval_pairs} --eval-new-tokens "
        f"{args.eval_new_tokens}`.",
        "",
        f"Settings: all LoRA (r 16, alpha 32), seed 0, batches of {args.batch}, at most {args.max_length} tokens per "
        f"example. SFT {args.steps} steps at 2e-4 from the base model on the train split's chosen answers; DPO, KTO "
        f"(beta 0.1) and ORPO (from the base) {args.steps} steps at {LORA_LEARNING_RATE:g}; KTO on the "
        f"{counts['binary']} binary rows derived from the train pairs (chosen: desirable, rejected: undesirable). "
        f"Reward models {args.steps} steps at {LORA_LEARNING_RATE:g} from SFT: the training one on the train split, "
        f"the evaluation one (the judge) on the judge split. PPO, RLOO and online DPO {args.rl_steps} steps at "
        f"{RL_LEARNING_RATE:g}, each step {args.batch} sampled answers for PPO (one per prompt) and RLOO "
        f"({max(1, args.batch // args.num_generations)} prompt(s) x {args.num_generations}), {args.batch} pairs of "
        f"answers for online DPO; answers of at most {args.max_new_tokens} sampled tokens, rewarded (online DPO: "
        "annotated, both orders) by the training reward model.",
        "",
        "## Reward models: pairwise accuracy on every eval pair",
        "",
        "Scored by the reward method's report after training: every eval pair, a conversation longer than "
        f"{args.max_length} tokens kept to its last {args.max_length} (the answer's end, where the model pools), a "
        "tie counted half; Wilson 95% interval. Goal: at least 0.65.",
        "",
        "| reward model | trained on | eval accuracy | 95% interval | mean margin | pairs scored | of them truncated | "
        "train s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, split in ((TRAINING_RM, "train split (PPO, RLOO, online DPO optimise it)"),
                        (JUDGE_RM, "judge split (the evaluation's judge)")):
        if name not in rows:
            lines.append(f"| {name} | {split} | not run | | | | | | |")
            continue
        m = rows[name]["metrics"]
        n = int(m["eval_pairs_scored"])
        lines.append(f"| {name} | {split} | {m['eval_accuracy']:.3f} | {interval(m['eval_accuracy'], n)} | "
                     f"{m['eval_mean_margin']:.3f} | {n} | {m['eval_pairs_truncated']:.0f} | "
                     f"{rlhf.train_seconds(rows[name]):.0f} | {rows[name]['peak_rss_mib']:.0f} |")
    trm = evaluation.get("training_reward_model")
    if trm:
        lines += ["", f"The evaluation code's own scoring of the training reward model on the same {trm['pairs']} "
                      f"eval pairs, untruncated: accuracy {trm['preference_accuracy']:.3f} "
                      f"({interval(trm['preference_accuracy'], trm['pairs'])}), mean margin "
                      f"{trm['reward_margin_mean']:.3f}."]
    lines += [
        "",
        "## Policies on the eval split",
        "",
        f"Preference accuracy: the implicit reward beta·(log p_policy − log p_start) with beta 0.1 prefers the chosen "
        f"answer, strictly, on {evaluation.get('pairs', args.eval_pairs)} eval pairs drawn with seed 0 (at most "
        f"{args.max_length} tokens; start = SFT, for SFT and ORPO the base model); DPO's goal is at least 0.68. "
        f"Win-rate vs SFT: greedy answers (at most {args.eval_new_tokens} new tokens) to "
        f"{evaluation.get('prompts', args.eval_prompts)} eval prompts drawn with seed 0, judged against SFT's by the "
        "evaluation reward model (judge split) in both orders, a tie counted half, Wilson 95% interval. KL: mean of "
        "log p_policy − log p_start over the policy's own answers. Reward: the training reward model's mean score of "
        "the answers (what PPO and RLOO optimise: not a judge of them). Train s: the training loop; peak RSS: the "
        "training process.",
        "",
        "| policy | preference accuracy | 95% interval | win-rate vs SFT | 95% interval | W / T / L | KL to start | "
        "mean answer tokens | unfinished | training-RM reward | train s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("sft", *POLICIES):
        m = evaluation.get("metrics", {}).get(name)
        if m is None:
            lines.append(f"| {name} | {'not trained' if name not in rows else 'not evaluated'} |" + " |" * 10)
            continue
        accuracy = m.get("preference_accuracy")
        pairs = int(m.get("pairs", 0))
        acc = f"{accuracy:.3f} | {interval(accuracy, pairs)}" if pairs else "n/a | "
        win = (f"{m['win_rate_vs_sft']:.3f} | {m['win_rate_vs_sft_ci_low']:.3f}–{m['win_rate_vs_sft_ci_high']:.3f} | "
               f"{m['wins_vs_sft']:.0f} / {m['ties_vs_sft']:.0f} / {m['losses_vs_sft']:.0f}"
               if "win_rate_vs_sft" in m else "baseline | | ")
        lines.append(f"| {name} | {acc} | {win} | {m.get('kl_to_reference', float('nan')):.2f} | "
                     f"{m['mean_tokens']:.1f} | {m['unfinished_rate']:.2f} | {m.get('reward_mean', float('nan')):.3f} | "
                     f"{rlhf.train_seconds(rows[name]):.0f} | {rows[name]['peak_rss_mib']:.0f} |")
    if evaluation:
        lines += ["", f"The evaluation (one process, every model loaded once) took {evaluation['wall_s'] / 60:.1f} "
                      f"minutes, peak RSS {evaluation['peak_rss_mib']:.0f} MiB. Judge: `{evaluation['judge']}`."]
    missing = [name for name in (*RUN_ORDER, EVALUATION) if name not in rows]
    if missing:
        lines += ["", f"Missing (failed or not run; see the reading): {', '.join(missing)}."]
    text = RESULTS.read_text() if RESULTS.exists() else ""
    reading = text[text.index(READING):] if READING in text else READING + "\n\n(to be written by hand)\n"
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n\n" + reading)
    print("\n".join(lines))


READING = "## Reading"

if __name__ == "__main__":
    main()
