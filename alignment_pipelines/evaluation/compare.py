"""Evaluate every model present on the same held-out prompts and pairs, loading each model once.

A model is needed in up to three roles: as a policy (its answers, its log-probabilities on the
pairs and on its own answers), as another policy's reference (the same log-probabilities, for the
implicit reward and the KL), and as the baseline or champion the others are judged against. Models
are visited children first (a policy before the model it started from), so when a reference is
loaded every answer it must score already exists, and one load serves every role.

The judge is never a reward model that one of the models optimised (:func:`schema.check_judge_independent`):
PPO and RLOO are judged by another model than the reward model they were trained against. The training reward model
still scores every answer (``reward_mean``), as a measurement beside the judge's verdicts.
"""

from __future__ import annotations

import gc
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from alignment_pipelines.evaluation.metrics import (Answer, implicit_reward_metrics,
                                                    judge_answers, pair_logprobs, sequence_logprobs,
                                                    summarize_verdicts)
from alignment_pipelines.evaluation.schema import JudgeIdentity, check_judge_independent
from alignment_pipelines.evaluation.stats import bootstrap_interval, degenerate_rate
from alignment_pipelines.generation import generation_backend
from alignment_pipelines.models.loading import load_model

BASELINE = "sft"
CHAMPION = "champion"
OUTCOME_NAMES = {1.0: "win", 0.0: "loss", 0.5: "tie"}


@dataclass(frozen=True)
class ModelUnderTest:
    name: str  # the training asset (``policy_dpo``), or ``champion`` for a champion no longer trained
    path: str
    reference_path: str | None = None  # the model it started from: implicit reward and KL are measured against it
    optimised_against: tuple[str, ...] = ()  # the reward models its training optimised (URIs or folders)


@dataclass
class ModelResult:
    name: str
    metrics: dict[str, float]
    answers: list[Answer]
    outcomes: dict[str, list[str]] = field(default_factory=dict)  # baseline label → win/loss/tie per prompt


@dataclass
class Evaluation:
    """Every model's numbers and answers on the same prompts; ``champion`` names the entry that is it."""

    prompts: list
    results: dict[str, ModelResult]
    baseline: str
    champion: str | None
    judge: JudgeIdentity
    pairs: int
    reward_model: dict[str, float] | None = None  # the reward model's own accuracy on the held-out pairs
    reward_model_scores: dict[str, list[float]] = field(default_factory=dict)  # its scores of chosen and rejected


def load_for_evaluation(path: str, role: str = "policy"):
    """The one place evaluation gets a model from (switches to the registry's fetch in one line)."""
    return load_model(path, role)


def evaluate_models(models: list[ModelUnderTest], baseline: str, pairs: pd.DataFrame, prompts: list, judge, *,
                    champion: str | None = None, reward_model_path: str | None = None, max_new_tokens: int = 64,
                    beta: float = 0.1, batch_size: int = 8, max_length: int = 512,
                    judge_identity: JudgeIdentity | None = None,
                    progress: Callable[[int, int, str], None] | None = None) -> Evaluation:
    """Measure every model in ``models`` on ``pairs`` and ``prompts``, and judge each one's answers against
    the ``baseline``'s and the ``champion``'s (names of entries in ``models``), in both orders. ``reward_model_path``
    (the training reward model) scores every answer; ``judge_identity`` says where the judge came from (default:
    passed explicitly). Refuses, before loading anything, a judge that is a reward model one of ``models``
    optimised (:class:`~alignment_pipelines.evaluation.schema.JudgeIsOptimisationTarget`). ``progress(done, total,
    what)`` hears of each step as it ends: a model measured (loaded once: answers, log-probabilities), the answers
    scored by the reward model, a model judged against the baseline or the champion."""
    judge_identity = judge_identity or JudgeIdentity.of(judge)
    check_judge_independent(judge_identity, {m.name: m.optimised_against for m in models})
    by_name = {m.name: m for m in models}
    for label, name in ((BASELINE, baseline), (CHAMPION, champion)):
        if name is not None and name not in by_name:
            raise ValueError(f"the {label} {name!r} is not among the models under test {sorted(by_name)}")
    against = {label: by_name[name] for label, name in ((BASELINE, baseline), (CHAMPION, champion)) if name is not None}
    judged = sum(m.path != other.path for other in against.values() for m in models)
    step = _step_counter(len(_children_first(models)) + bool(reward_model_path) + judged, progress)
    answers, pair_logps, answer_logps = _measure(models, pairs, prompts, max_new_tokens, batch_size, max_length, step)
    results = {m.name: ModelResult(m.name, _own_metrics(m, answers, pair_logps, answer_logps, beta), answers[m.path])
               for m in models}
    reward_model, reward_model_scores = None, {}
    if reward_model_path:
        reward_model, reward_model_scores = _score_with_reward_model(reward_model_path, prompts, pairs, answers,
                                                                     models, results, batch_size)
        step("answers scored by the reward model")
    for label, other in against.items():
        _judge_against(label, other, models, results, answers, prompts, judge, step)
    if callable(getattr(judge, "release", None)):  # a model judge frees its model once every verdict is in
        judge.release()
    return Evaluation(prompts=list(prompts), results=results, baseline=baseline, champion=champion,
                      judge=judge_identity, pairs=len(pairs), reward_model=reward_model,
                      reward_model_scores=reward_model_scores)


def _step_counter(total: int, progress: Callable[[int, int, str], None] | None) -> Callable[[str], None]:
    """``step(what)``: one more of ``total`` steps done, told to ``progress``."""
    done = 0

    def step(what: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total, what)
    return step


def _measure(models: list[ModelUnderTest], pairs, prompts, max_new_tokens: int, batch_size: int, max_length: int,
             step: Callable[[str], None]):
    """Answers by policy path; sequence log-probabilities of the pairs by model path; and of each policy's
    answers under itself and under its reference, by (policy path, scoring path). One load per model, one
    ``step`` each."""
    answers: dict[str, list[Answer]] = {}
    pair_logps: dict[str, tuple[list, list]] = {}
    answer_logps: dict[tuple[str, str], list[float]] = {}
    policy_paths = {m.path for m in models}
    names = {m.path: m.name for m in models}
    for path in _children_first(models):
        model, tokenizer = load_for_evaluation(path)
        if path in policy_paths:
            backend = generation_backend(path, batch_size, loaded=(model, tokenizer))  # vLLM where it can run
            answers[path] = backend.generate(prompts, max_new_tokens)
        scored = [m.path for m in models if m.reference_path == path]  # answers this model is the reference of
        if any(m.path == path and m.reference_path for m in models):  # and its own, for its KL
            scored.append(path)
        if scored and len(pairs):
            pair_logps[path] = pair_logprobs(model, tokenizer, pairs, max_length, batch_size)
        for owner in dict.fromkeys(scored):
            answer_logps[owner, path] = sequence_logprobs(model, tokenizer, prompts, [a.text for a in answers[owner]],
                                                          max_length, batch_size)
        del model
        gc.collect()
        step(f"{names.get(path, Path(path).name)} measured")
    return answers, pair_logps, answer_logps


def _judge_against(label: str, against: ModelUnderTest, models, results, answers, prompts, judge,
                   step: Callable[[str], None]) -> None:
    """Each model's win-rate against ``against`` (a 95% interval, ties counted) and its per-prompt outcomes; a
    ``step`` a model."""
    theirs = [a.text for a in answers[against.path]]
    for m in models:
        if m.path == against.path:  # a model against itself says nothing
            continue
        verdicts = judge_answers([a.text for a in answers[m.path]], theirs, prompts, judge)
        summary = summarize_verdicts(verdicts)
        results[m.name].metrics.update({
            f"win_rate_vs_{label}": summary["win_rate"], f"win_rate_vs_{label}_ci_low": summary["ci_low"],
            f"win_rate_vs_{label}_ci_high": summary["ci_high"], f"wins_vs_{label}": summary["wins"],
            f"losses_vs_{label}": summary["losses"], f"ties_vs_{label}": summary["ties"],
            f"judged_vs_{label}": summary["judged"], f"judge_agreement_vs_{label}": summary["judge_agreement_rate"]})
        results[m.name].outcomes[label] = [OUTCOME_NAMES[v.score_a] for v in verdicts]
        step(f"{m.name} judged against {against.name}")


def _children_first(models: list[ModelUnderTest]) -> list[str]:
    """Every path to load, each after all the policies that use it as their reference."""
    paths = list(dict.fromkeys([p for m in models for p in (m.path, m.reference_path) if p]))
    ordered: list[str] = []
    while len(ordered) < len(paths):
        ready = [p for p in paths if p not in ordered
                 and all(m.path in ordered or m.path == p for m in models if m.reference_path == p)]
        if not ready:
            raise ValueError(f"the models' references form a cycle: {[p for p in paths if p not in ordered]}")
        ordered.append(ready[0])
    return ordered


def _own_metrics(m: ModelUnderTest, answers, pair_logps, answer_logps, beta: float) -> dict[str, float]:
    """What a model shows on its own: implicit-reward accuracy, KL to its reference, lengths, broken answers."""
    own = answers[m.path]
    metrics: dict[str, float] = {
        "answers": len(own),
        "mean_tokens": statistics.fmean(a.tokens for a in own) if own else math.nan,
        "mean_chars": statistics.fmean(len(a.text) for a in own) if own else math.nan,
        "empty_rate": sum(not a.text.strip() for a in own) / len(own) if own else math.nan,
        "unfinished_rate": sum(not a.finished for a in own) / len(own) if own else math.nan,
        "degenerate_rate": degenerate_rate([a.text for a in own], [a.finished for a in own]),
    }
    if m.reference_path is None:
        return metrics
    if m.path in pair_logps and m.reference_path in pair_logps:
        metrics.update(implicit_reward_metrics(*pair_logps[m.path], *pair_logps[m.reference_path], beta=beta))
    log_ratios = [p - r for p, r in zip(answer_logps[m.path, m.path], answer_logps[m.path, m.reference_path])]
    metrics["kl_to_reference"] = statistics.fmean(log_ratios) if log_ratios else math.nan
    metrics["kl_to_reference_ci_low"], metrics["kl_to_reference_ci_high"] = bootstrap_interval(log_ratios)
    return metrics


def _score_with_reward_model(path: str, prompts, pairs, answers, models, results,
                             batch_size: int) -> tuple[dict, dict]:
    """Each model's mean reward-model score (with a bootstrap interval), and the reward model's own accuracy on the
    held-out pairs and its scores of them: one load serves all."""
    from alignment_pipelines.methods.rewards import reward_model_reward

    model, tokenizer = load_for_evaluation(path, "reward")
    score = reward_model_reward(model, tokenizer, batch_size)
    for m in models:
        rewards = score(prompts, [a.text for a in answers[m.path]], finished=[a.finished for a in answers[m.path]])
        metrics = results[m.name].metrics
        metrics["reward_mean"] = statistics.fmean(rewards) if rewards else math.nan
        metrics["reward_mean_ci_low"], metrics["reward_mean_ci_high"] = bootstrap_interval(rewards)
    chosen = score(list(pairs["prompt"]), [str(c) for c in pairs["chosen"]]) if len(pairs) else []
    rejected = score(list(pairs["prompt"]), [str(r) for r in pairs["rejected"]]) if len(pairs) else []
    del model
    gc.collect()
    margins = [c - r for c, r in zip(chosen, rejected)]
    accuracy = {"preference_accuracy": sum(m > 0 for m in margins) / len(margins) if margins else math.nan,
                "reward_margin_mean": statistics.fmean(margins) if margins else math.nan, "pairs": len(margins)}
    return accuracy, {"chosen": chosen, "rejected": rejected}
