"""How much of PPO's return variance can any critic explain? A Monte Carlo ceiling for the critic benchmark.

PPO's critic predicts, before each answer token, the return still to come. Only the part of it that the prompt and
the answer so far decide can be predicted; the rest is the luck of tokens not yet sampled. This script measures
that part in the setting of rlhf.py's critic runs (SmolLM2, the HH prompts and LoRA reward model of their
``--work`` folder): for each of ``--prompts`` prompts it samples one answer from the start policy, and from every
``--every``-th prefix of it (and the last) ``--continuations`` completions, scored as the PPO trainer scores them
(the reward model, minus the missing-EOS penalty). The variance of those scores, c_t, is the score's variance left
once the answer's first t tokens are known: no critic can explain it at position t.

With the perfect critic V*_t = E[score | prompt, first t tokens] and no KL reward (the policy at its start, as in
the benchmark's value warm-up), PPO's GAE return is R_t = V*_t + sum_l lambda^l D_{t+l}, where D_k = V*_{k+1} - V*_k
(V*_T = the score) are uncorrelated with variance c_k - c_{k+1} (c_T = 0). So

    Var(R_t - V*_t) = sum_l lambda^(2l) (c_{t+l} - c_{t+l+1}),    Var(R_t) = Var(score) - c_t + Var(R_t - V*_t),

and the trainer's ``val/explained_variance`` (pooled over every answer token; every R_t has the same mean) of the
perfect critic is 1 - sum_t Var(R_t - V*_t) / sum_t Var(R_t). Both sums are linear in c, so each answer's own
(interpolated) c profile is used and the sums are averaged over answers. Var(score) is the variance of the fresh
answers sampled from the empty prefix, over all prompts. Intervals: bootstrap over prompts.

    python benchmarks/critic_ceiling.py --work <rlhf.py's critic --work folder>
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE.parent]  # benchmarks/datasets.py shadows HF's
RESULTS = HERE.parent / "results" / "critic_ceiling.md"


def sample_scores(args, work: Path) -> dict:
    """Per prompt: the sampled answer's length, the positions probed, each position's continuation scores, and
    the values PPO's critic starts with (``value_model_for``: the reward model's head) along the answer."""
    import torch

    from alignment_pipelines.methods import config_from_dict
    from alignment_pipelines.methods.own_loop import (
        chat_prompt_ids,
        cut_after_eos,
        eos_token_ids,
        left_pad,
        sampling_config,
    )
    from alignment_pipelines.methods.ppo import fitting_prompts, load_reward_model, value_model_for
    from alignment_pipelines.methods.ppo_trainer import critic_values
    from alignment_pipelines.methods.rewards import build_reward_funcs
    from alignment_pipelines.methods.training import load_start_model

    config = config_from_dict("ppo", {
        "model": args.model_dir, "data": str(work / "train.parquet"), "reward_model": str(work / "reward LoRA"),
        "reward_funcs": ["model"], "max_length": args.rl_max_length, "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature, "lora": True, "output_dir": str(work / "ceiling"), "seed": args.seed})
    policy, tokenizer = load_start_model(config, "policy")
    policy.eval()
    prompts = list(fitting_prompts(config, tokenizer)[0]["prompt"])
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(args.seed))
    prompts = [prompts[i] for i in order[: args.prompts].tolist()]
    reward = build_reward_funcs(["model"], *load_reward_model(config), args.continuations)[0]
    critic = value_model_for(config, tokenizer).eval()
    eos = eos_token_ids(tokenizer, policy)
    pad = tokenizer.pad_token_id
    torch.manual_seed(args.seed)

    def answers_from(prompt_ids: list[int], prefix: torch.Tensor, count: int) -> torch.Tensor:
        ids, mask = left_pad([prompt_ids + prefix.tolist()] * count, pad, "cpu")
        with torch.no_grad():
            sampled = policy.generate(input_ids=ids, attention_mask=mask, generation_config=sampling_config(
                args.max_new_tokens - len(prefix), config.temperature, eos, pad))
        return torch.cat([prefix.expand(count, -1), sampled[:, ids.size(1):]], dim=1)

    def scores(prompt, answers: torch.Tensor) -> list[float]:
        answers, mask, has_eos = cut_after_eos(answers, eos, pad)
        ids = [row[keep.bool()].tolist() for row, keep in zip(answers, mask)]
        texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
        raw = torch.tensor(reward(prompts=[prompt] * len(ids), completions=texts, completion_ids=ids,
                                    finished=has_eos.tolist()))
        return (raw - config.missing_eos_penalty * (~has_eos).float()).tolist()

    rows = []
    for number, (prompt, prompt_ids) in enumerate(zip(prompts, chat_prompt_ids(
            tokenizer, prompts, config.max_length, config.max_new_tokens)), 1):
        answer = answers_from(prompt_ids, torch.empty(0, dtype=torch.long), 1)
        _, mask, _ = cut_after_eos(answer, eos, pad)
        length = int(mask.sum())
        positions = sorted({*range(0, length, args.every), length - 1})
        whole = torch.tensor([prompt_ids + answer[0, :length].tolist()])
        with torch.no_grad():
            values = critic_values(critic, whole, torch.ones_like(whole), len(prompt_ids))[0].tolist()
        rows.append({"length": length, "positions": positions, "start_critic_values": values, "scores": [
            scores(prompt, answers_from(prompt_ids, answer[0, :t], args.continuations)) for t in positions]})
        print(f"prompt {number}/{len(prompts)}: {length} tokens", flush=True)
    return {"rows": rows, "temperature": config.temperature, "lam": config.lam,
            "missing_eos_penalty": config.missing_eos_penalty}


def residual_profile(row: dict) -> np.ndarray:
    """c_0 .. c_T of one answer: its continuations' score variance at the probed positions, linear in between,
    and 0 once the answer is whole."""
    probed = [float(np.var(s, ddof=1)) for s in row["scores"]]
    positions = [*row["positions"], row["length"]]
    return np.interp(np.arange(row["length"] + 1), positions, [*probed, 0.0])


def fresh_score_variance(rows: list[dict]) -> float:
    """Var(score): the variance of the answers sampled from the empty prefix, over all prompts."""
    return float(np.var(np.concatenate([row["scores"][0] for row in rows]), ddof=1))


def ceiling(rows: list[dict], lam: float) -> float:
    """The perfect critic's pooled explained variance on GAE(lambda) returns (see the module docstring)."""
    score_var = fresh_score_variance(rows)
    unexplained = total = 0.0
    for row in rows:
        c = residual_profile(row)
        increments = c[:-1] - c[1:]
        for t in range(row["length"]):
            left = float(np.sum(lam ** (2 * np.arange(row["length"] - t)) * increments[t:]))
            unexplained += left
            total += score_var - c[t] + left
    return 1 - unexplained / total


def write_table(sampled: dict, args, seconds: float) -> str:
    from alignment_pipelines.evaluation.stats import bootstrap_interval

    rows, lam = sampled["rows"], sampled["lam"]
    everyone = np.arange(len(rows), dtype=float)
    score_var = fresh_score_variance(rows)
    shown = sorted({*range(0, args.max_new_tokens, args.every), args.max_new_tokens - 1})
    lines = [
        "# The critic's ceiling: how much of PPO's return variance any critic can explain",
        "",
        f"Setting of rlhf.py's critic runs: `{args.model}` at its start (no update yet), {len(rows)} training "
        f"prompts of at most {args.rl_max_length - args.max_new_tokens} tokens (seeded sample), one answer each of at "
        f"most {args.max_new_tokens} new tokens at temperature {sampled['temperature']:g}; from every "
        f"{args.every}th prefix of it (and the last) {args.continuations} completions, scored by the LoRA HH reward "
        f"model minus the missing-EOS penalty {sampled['missing_eos_penalty']:g}. {platform.processor() or 'CPU'}, "
        f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}, {seconds / 60:.1f} minutes. Command: "
        f"`python benchmarks/critic_ceiling.py --work <folder> --prompts {args.prompts} --continuations "
        f"{args.continuations} --every {args.every} --temperature {args.temperature:g} --seed {args.seed}`. "
        "Intervals: 95% bootstrap "
        "over prompts.",
        "",
        f"Variance of the score over fresh answers (all prompts): {score_var:.3f}; mean answer length "
        f"{np.mean([r['length'] for r in rows]):.1f} tokens.",
        "",
        "| score variance left, as a share of the score's variance, once the answer's first t tokens are known | "
        + " | ".join(f"t={t}" for t in shown) + " |",
        "|---|" + "---|" * len(shown),
        "| mean over the answers that long | " + " | ".join(
            f"{np.mean([residual_profile(r)[t] for r in rows if r['length'] > t]) / score_var:.2f}" for t in shown)
        + " |",
        "",
        "| returns | a perfect critic's explained variance | 95% interval |",
        "|---|---|---|",
    ]
    for name, value in ((f"GAE, lambda {lam:g} (what the trainer's `val/explained_variance` reads)", lam),
                        ("Monte Carlo, lambda 1", 1.0)):
        low, high = bootstrap_interval(everyone, lambda idx, v=value: ceiling([rows[int(i)] for i in idx], v),
                                       n_resamples=1000)
        lines.append(f"| {name} | {ceiling(rows, value):.3f} | {low:.3f}–{high:.3f} |")
    perfect, start = value_steps(rows)
    lines += [
        "",
        "| how much a critic's value moves from one answer token to the next (variance over answers of "
        "V_{t+1} - V_t, mean over the answer's positions but the last) | |",
        "|---|---|",
        f"| the perfect critic (c_t - c_{{t+1}}) | {perfect:.3f} |",
        f"| the critic PPO starts with (the reward model's head on every prefix) | {start:.3f} |",
    ]
    return "\n".join(lines) + "\n"


def value_steps(rows: list[dict]) -> tuple[float, float]:
    """Mean variance of one token's value change: the perfect critic's, and the starting critic's over the answers
    long enough to have it. A critic that moves more than the perfect one must unlearn it before it can fit."""
    perfect = np.mean([np.mean(-np.diff(residual_profile(row))[:-1]) for row in rows])
    longest = max(row["length"] for row in rows)
    start = [np.var([row["start_critic_values"][t + 1] - row["start_critic_values"][t] for row in rows
                     if row["length"] > t + 1], ddof=1) for t in range(longest - 1)]
    return float(perfect), float(np.nanmean(start))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="rlhf.py's critic folder: train.parquet and 'reward LoRA'")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--continuations", type=int, default=8)
    parser.add_argument("--every", type=int, default=3, help="probe every n-th prefix (and the last)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--rl-max-length", type=int, default=112)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from alignment_pipelines.layout import default_data_root
    from alignment_pipelines.models.loading import resolve_model

    work = Path(args.work)
    args.model_dir = str(resolve_model(args.model, default_data_root() / "models"))
    started = time.perf_counter()
    sampled = sample_scores(args, work)
    (work / "ceiling.json").write_text(json.dumps(sampled))
    table = write_table(sampled, args, time.perf_counter() - started)
    kept = RESULTS.read_text().partition("\n## Reading")[1:] if RESULTS.exists() else ("", "")
    RESULTS.write_text(table + "".join(kept))
    print(table)


if __name__ == "__main__":
    main()
