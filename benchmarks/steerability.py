"""Does the annotator's instruction steer online DPO? Two runs that differ only in the instruction.

SmolLM2-135M-Instruct is the base; a short LoRA SFT on the chosen answers of single-turn HH-RLHF prompts makes
the SFT model (an adapter on the base, as in the pipeline), and both online DPO runs start from it with the base
as their annotator (the default: the model under the start model's adapters). The runs share prompts, steps,
seed and every other setting; one annotator is told "helpful and very short", the other "helpful".

Reported for each run, on held-out prompts answered greedily: mean answer length (tokens) against the SFT model,
the win-rate against the SFT model under each annotator (both orders; disagreeing orders are ties), and the
annotators' agreement and position-bias rates, in training and in evaluation. Results go to
benchmarks/results/steerability.md.

    python benchmarks/steerability.py --steps 30
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

HERE = Path(__file__).resolve()
RESULTS = HERE.parent / "results" / "steerability.md"
HH = HERE.parents[2] / "shared" / "data" / "hh-rlhf-harmless-base.jsonl.gz"
INSTRUCTIONS = ("helpful and very short", "helpful")


def single_turn_pairs(path: Path, max_prompt_chars: int) -> list[dict]:
    """(prompt, chosen, rejected) of the single-turn HH transcripts with a short question and two answers."""
    def split(transcript: str) -> tuple[str, str] | None:
        turns = transcript.split("\n\nHuman: ")
        if len(turns) != 2 or "\n\nAssistant: " not in turns[1]:
            return None
        question, answer = (part.strip() for part in turns[1].split("\n\nAssistant: ", 1))
        return question, answer

    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            record = json.loads(line)
            chosen, rejected = split(record["chosen"]), split(record["rejected"])
            if not chosen or not rejected or chosen[0] != rejected[0]:
                continue
            (question, answer), (_, worse) = chosen, rejected
            if question and answer and worse and len(question) <= max_prompt_chars:
                rows.append({"prompt": question, "chosen": answer, "rejected": worse})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def answers_and_lengths(model_dir: str, prompts: list, max_new_tokens: int) -> tuple[list[str], list[int], float]:
    """Greedy answers, their token counts and the share that ended by themselves (EOS before the cap)."""
    from alignment_pipelines.evaluation.metrics import TransformersBackend
    from alignment_pipelines.models.loading import load_causal_lm

    backend = TransformersBackend(*load_causal_lm(model_dir, dtype="float32"), batch_size=8)
    answers = backend.generate([[{"role": "user", "content": p}] for p in prompts], max_new_tokens=max_new_tokens)
    return [a.text for a in answers], [a.tokens for a in answers], sum(a.finished for a in answers) / len(answers)


def judged_win_rate(judge, prompts: list, policy: list[str], baseline: list[str]) -> dict:
    from alignment_pipelines.evaluation.stats import wilson_interval
    from alignment_pipelines.judges import agreement_stats

    verdicts = judge.judge([[{"role": "user", "content": p}] for p in prompts], policy, baseline)
    wins = sum(v.preferred == "a" for v in verdicts)
    ties = sum(v.preferred == "tie" for v in verdicts)
    stats = agreement_stats(verdicts)
    low, high = wilson_interval(wins + ties / 2, len(verdicts))
    return {"win_rate": (wins + ties / 2) / len(verdicts), "low": low, "high": high, "wins": wins, "ties": ties,
            "losses": len(verdicts) - wins - ties, "agreement": stats["agreement_rate"],
            "position_bias": stats["position_bias_rate"]}


def annotator_probe(base: Path, rows: list[dict]) -> str:
    """The annotator on pairs whose answer is known to differ only in length: the first sentence of a human-chosen
    answer against the whole answer, in both orders, under each instruction."""
    from alignment_pipelines.judges import agreement_stats, build_judge

    prompts = [[{"role": "user", "content": r["prompt"]}] for r in rows]
    whole = [r["chosen"] for r in rows]
    first_sentence = [r["chosen"].split(". ")[0].rstrip(".") + "." for r in rows]
    lines = ["## Annotator probe: first sentence vs. the whole answer", "",
             f"{len(rows)} held-out prompts; answer a = the first sentence of the human-chosen answer, b = the whole "
             f"answer; command: `python benchmarks/steerability.py {' '.join(sys.argv[1:])}`.", "",
             "| instruction | mean P(first shown better), a first | same, b first | position bias | "
             "order-averaged P(shorter better) | shorter preferred (averaged) |",
             "|---|---|---|---|---|---|"]
    for instruction in INSTRUCTIONS:
        judge = build_judge({"kind": "llm", "model_dir": str(base), "instruction": instruction})
        verdicts = judge.judge(prompts, first_sentence, whole)
        lines.append(f"| \"{instruction}\" | {statistics.fmean(v.first_order for v in verdicts):.3f} | "
                     f"{statistics.fmean(v.second_order for v in verdicts):.3f} | "
                     f"{agreement_stats(verdicts)['position_bias_rate']:.2f} | "
                     f"{statistics.fmean(v.p_a for v in verdicts):.3f} | "
                     f"{sum(v.p_a > 0.5 for v in verdicts)} / {len(verdicts)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--model-store", default=None, help="default: the data root's model store")
    parser.add_argument("--steps", type=int, default=30, help="online DPO steps per run")
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per step (2 samples each)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens per sampled answer in training")
    parser.add_argument("--eval-max-new-tokens", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--sft-steps", type=int, default=10)
    parser.add_argument("--sft-model", default=None,
                        help="an SFT adapter made earlier with this recipe (--sft-steps of them): skips the SFT step")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--hh", default=str(HH), help="the HH-RLHF harmless-base pairs (jsonl.gz)")
    parser.add_argument("--ties", choices=["drop", "downweight"], default="drop")
    parser.add_argument("--probe-only", action="store_true",
                        help="only ask the annotator about first-sentence vs. whole answers; append that to --results")
    parser.add_argument("--train-prompts", type=int, default=120)
    parser.add_argument("--eval-prompts", type=int, default=24)
    args = parser.parse_args()

    import torch

    from alignment_pipelines.judges import build_judge
    from alignment_pipelines.layout import default_data_root
    from alignment_pipelines.methods import config_from_dict, run_training
    from alignment_pipelines.models.loading import resolve_model

    started = time.perf_counter()
    base = resolve_model(args.model, args.model_store or default_data_root() / "models")
    rows = single_turn_pairs(Path(args.hh), max_prompt_chars=200)
    if args.probe_only:
        section = annotator_probe(base, rows[args.train_prompts: args.train_prompts + args.eval_prompts])
        with open(args.results, "a", encoding="utf-8") as fh:
            fh.write("\n" + section)
        print(section)
        return
    train_rows, eval_rows = rows[: args.train_prompts], rows[args.train_prompts: args.train_prompts + args.eval_prompts]
    eval_prompts = [r["prompt"] for r in eval_rows]
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="steerability-") as tmp:
        work = Path(tmp)
        data = write_jsonl(train_rows, work / "train.jsonl")
        t = time.perf_counter()
        sft_dir = args.sft_model or run_training("sft", config_from_dict("sft", {
            "model": str(base), "data": str(data), "output_dir": str(work / "sft"), "max_steps": args.sft_steps,
            "per_device_batch_size": 4, "max_length": 256, "learning_rate": 5e-5, "seed": 0,
            "gradient_checkpointing": False})).output_dir
        timings["sft"] = time.perf_counter() - t

        runs = {}
        for instruction in INSTRUCTIONS:
            t = time.perf_counter()
            result = run_training("online_dpo", config_from_dict("online_dpo", {
                "model": sft_dir, "data": str(data), "output_dir": str(work / instruction.replace(" ", "_")),
                "feedback_store": str(work / "ai_feedback"), "judge": "llm", "instruction": instruction,
                "max_steps": args.steps, "per_device_batch_size": args.batch_size,
                "max_new_tokens": args.max_new_tokens, "max_length": 256, "learning_rate": args.learning_rate,
                "beta": args.beta, "seed": 0, "save_steps": 0, "gradient_checkpointing": False,
                "ties": args.ties}))
            timings[instruction] = time.perf_counter() - t
            runs[instruction] = result

        t = time.perf_counter()
        answers = {"SFT": answers_and_lengths(sft_dir, eval_prompts, args.eval_max_new_tokens)}
        for instruction, result in runs.items():
            answers[instruction] = answers_and_lengths(result.output_dir, eval_prompts, args.eval_max_new_tokens)
        judges = {i: build_judge({"kind": "llm", "model_dir": str(base), "instruction": i}) for i in INSTRUCTIONS}
        wins = {(policy, judged_by): judged_win_rate(judges[judged_by], eval_prompts, answers[policy][0],
                                                     answers["SFT"][0])
                for policy in INSTRUCTIONS for judged_by in INSTRUCTIONS}
        timings["evaluation"] = time.perf_counter() - t
        examples = [(eval_prompts[i], {name: answers[name][0][i] for name in answers}) for i in range(2)]
    total = time.perf_counter() - started
    hardware = (f"one {torch.cuda.get_device_name()}" if torch.cuda.is_available()
                else f"{os.cpu_count()} CPU cores, no GPU")

    lines = [
        "# Steerability: online DPO with the annotator told \"helpful and very short\" vs. \"helpful\"",
        "",
        f"`{args.model}`; SFT = {args.sft_steps} LoRA SFT steps on the chosen answers of single-turn HH-RLHF "
        f"(harmless-base) prompts; online DPO from it, LoRA r=16, {args.steps} steps x {args.batch_size} prompts "
        f"(2 samples each, up to {args.max_new_tokens} tokens, temperature 0.9), lr {args.learning_rate}, "
        f"beta {args.beta}, ties: {args.ties}, seed 0; annotator = the base model (the default: the model under the SFT "
        f"adapter), scored by log P(A) vs P(B), both orders. Evaluation: {len(eval_prompts)} held-out prompts, greedy, "
        f"up to {args.eval_max_new_tokens} tokens. {hardware}, torch "
        f"{torch.__version__}, Python {platform.python_version()}; {date.today()}; {total / 60:.1f} min in all. "
        f"Command: `python benchmarks/steerability.py {' '.join(sys.argv[1:])}`.",
        "",
        "## Answer length against the SFT model (held-out prompts)",
        "",
        "| model | mean tokens | median tokens | vs. SFT | ended by itself |",
        "|---|---|---|---|---|",
    ]
    sft_mean = statistics.fmean(answers["SFT"][1])
    for name, (_, lengths, finished) in answers.items():
        mean = statistics.fmean(lengths)
        label = name if name == "SFT" else f"online DPO, \"{name}\""
        lines.append(f"| {label} | {mean:.1f} | {statistics.median(lengths):.0f} | {mean / sft_mean:.2f}x | "
                     f"{finished:.0%} |")
    lines += ["", "## Win-rate against the SFT model, by annotator (ties = half a win; 95% Wilson interval)", "",
              "| policy | judged by the annotator told | win-rate | interval | W / T / L | agreement | position bias |",
              "|---|---|---|---|---|---|---|"]
    for (policy, judged_by), w in wins.items():
        lines.append(f"| \"{policy}\" | \"{judged_by}\" | {w['win_rate']:.2f} | {w['low']:.2f}-{w['high']:.2f} | "
                     f"{w['wins']} / {w['ties']} / {w['losses']} | {w['agreement']:.2f} | {w['position_bias']:.2f} |")
    lines += ["", "## The annotator while training (every sampled pair, both orders)", "",
              "| run | pairs | preferences | ties | agreement | position bias | KL to SFT (last step) | minutes |",
              "|---|---|---|---|---|---|---|---|"]
    for instruction, result in runs.items():
        m = result.metrics
        lines.append(f"| \"{instruction}\" | {m['ai_feedback/pairs']:.0f} | {m['ai_feedback/preferences']:.0f} | "
                     f"{m['ai_feedback/ties']:.0f} | {m['ai_feedback/agreement_rate']:.2f} | "
                     f"{m['ai_feedback/position_bias_rate']:.2f} | {m.get('objective/kl', float('nan')):.2f} | "
                     f"{timings[instruction] / 60:.1f} |")
    lines += ["", "## Two held-out prompts", ""]
    for prompt, by_model in examples:
        lines.append(f"**{prompt}**")
        lines.append("")
        for name, text in by_model.items():
            shown = text.replace("\n", " ")
            lines.append(f"- {name}: {shown[:300]}{'...' if len(shown) > 300 else ''}")
        lines.append("")
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
