"""Evaluate several aligned policies against one baseline on the same held-out data."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from alignment_pipelines.evaluation.metrics import generate_answers, length_stats, preference_accuracy, win_rate
from alignment_pipelines.evaluation.report import build_report


@dataclass(frozen=True)
class PolicyUnderTest:
    name: str
    path: str
    reference_path: str  # the model it started from: the implicit reward is measured against it


@dataclass
class PolicyEvaluation:
    name: str
    metrics: dict[str, float]
    report: str
    examples: list[dict] = field(default_factory=list)


def evaluate_policies(policies: list[PolicyUnderTest], baseline_path: str, pairs: pd.DataFrame, judge, *,
                      max_prompts: int = 16, max_new_tokens: int = 64, beta: float = 0.1) -> list[PolicyEvaluation]:
    """Held-out preference accuracy per policy, and each policy's win-rate against the baseline's answers
    (generated once), judged in both orders."""
    prompts = list(pairs["prompt"].head(max_prompts))
    baseline_answers = generate_answers(baseline_path, prompts, max_new_tokens=max_new_tokens)
    results = []
    for policy in policies:
        answers = generate_answers(policy.path, prompts, max_new_tokens=max_new_tokens)
        metrics = {
            **preference_accuracy(policy.path, policy.reference_path, pairs, beta=beta),
            **win_rate(answers, baseline_answers, prompts, judge),
            **{f"policy_{k}": v for k, v in length_stats(answers).items()},
            **{f"baseline_{k}": v for k, v in length_stats(baseline_answers).items()},
        }
        examples = [{"prompt": p, "policy": a, "baseline": b} for p, a, b in zip(prompts, answers, baseline_answers)]
        results.append(PolicyEvaluation(policy.name, metrics,
                                        build_report(metrics, examples, title=f"{policy.name} vs. baseline",
                                                     max_examples=3), examples))
    return results


def comparison_table(results: list[PolicyEvaluation]) -> str:
    """One markdown row per policy: the numbers a reviewer compares methods by."""
    lines = ["| policy | preference accuracy | reward margin | win-rate vs. baseline | W/L/T | mean chars |",
             "|---|---|---|---|---|---|"]
    for r in results:
        m = r.metrics
        lines.append(f"| {r.name} | {m['preference_accuracy']:.3f} | {m['reward_margin_mean']:.3f} | "
                     f"{m['win_rate']:.3f} | {m['wins']}/{m['losses']}/{m['ties']} | "
                     f"{m['policy_mean_chars']:.0f} |")
    return "\n".join(lines)
