"""Uncertainty for evaluation numbers, and the rate of broken answers.

A win-rate on a few dozen prompts moves by ten points from one sample to the next, so a
gate that compares point estimates promotes noise. Everything here returns an interval
alongside the number, and is pure Python/numpy so it can be tested against hand values.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

TIE = 0.5
OUTCOMES = (0.0, TIE, 1.0)


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion ``successes / n`` (``z=1.96``: 95%).

    Wilson rather than the normal approximation because it stays inside [0, 1] and keeps
    its coverage at small ``n`` and at proportions near 0 or 1. ``successes`` may be
    fractional: a win-rate passes ``wins + ties / 2`` (see :func:`win_rate_summary`).
    With ``n == 0`` nothing is known and the interval is the whole of [0, 1].
    """
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    denominator = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half_width = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denominator
    return max(0.0, centre - half_width), min(1.0, centre + half_width)


def bootstrap_interval(values: Sequence[float], stat: Callable[[np.ndarray], float] = np.mean,
                       n_resamples: int = 2000, seed: int = 0, confidence: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat`` over ``values`` (resampled with replacement).

    For numbers without a closed-form interval (mean reward, KL, length). Seeded, so a
    re-materialized report shows the same interval. With no values the interval is NaN.
    """
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, data.size, size=(n_resamples, data.size))
    estimates = np.array([stat(data[row]) for row in indices], dtype=float)
    tail = (1 - confidence) / 2
    low, high = np.quantile(estimates, [tail, 1 - tail])
    return float(low), float(high)


def win_rate_summary(outcomes: Sequence[float], z: float = 1.96) -> dict:
    """Win-rate with counts and a Wilson interval, from per-prompt outcomes in {0, 0.5, 1}.

    A tie counts as half a win in both the rate and the interval (Wilson on
    ``wins + ties / 2`` out of ``n``). A tie has less variance than a coin flip, so this
    interval is a little wider than the exact one: a gate built on it errs towards refusing.
    With no outcomes the rate is NaN and the interval [0, 1], so no gate can pass on it.
    """
    for outcome in outcomes:
        if outcome not in OUTCOMES:
            raise ValueError(f"outcomes must be 0, 0.5 or 1, got {outcome!r}")
    wins = sum(1 for o in outcomes if o == 1.0)
    losses = sum(1 for o in outcomes if o == 0.0)
    ties = len(outcomes) - wins - losses
    n = len(outcomes)
    score = wins + TIE * ties
    ci_low, ci_high = wilson_interval(score, n, z)
    return {"win_rate": score / n if n else math.nan, "wins": wins, "losses": losses, "ties": ties, "n": n,
            "ci_low": ci_low, "ci_high": ci_high}


def is_degenerate(answer: str, min_distinct_bigram_ratio: float = 0.5) -> bool:
    """An answer is degenerate when it is blank or loops.

    Looping is measured by the share of distinct bigrams among all bigrams of the answer's
    words: ``"the cat the cat the cat"`` has 2 distinct out of 5, 0.4. Below
    ``min_distinct_bigram_ratio`` the answer counts as degenerate. A one-word answer is
    measured on its characters instead, so ``"!!!!!!!!"`` is caught and ``"Paris"`` is not.
    Answers too short to repeat anything (fewer than three bigrams) never count as loops.
    """
    words = answer.split()
    if not words:
        return True
    tokens: Sequence[str] = words if len(words) > 1 else words[0]
    bigrams = list(zip(tokens, tokens[1:]))
    return len(bigrams) >= 3 and len(set(bigrams)) / len(bigrams) < min_distinct_bigram_ratio


def degenerate_rate(answers: Sequence[str], eos_flags: Sequence[bool] | None = None,
                    min_distinct_bigram_ratio: float = 0.5) -> float:
    """Share of answers that are empty, loop (see :func:`is_degenerate`) or, when
    ``eos_flags`` are given, never emitted an end-of-sequence token (cut off at the token
    limit, which is how a loop usually ends). NaN with no answers: no evidence either way.
    """
    if eos_flags is not None and len(eos_flags) != len(answers):
        raise ValueError(f"eos_flags ({len(eos_flags)}) and answers ({len(answers)}) must have the same length")
    if not answers:
        return math.nan
    flags = eos_flags if eos_flags is not None else [True] * len(answers)
    broken = sum(1 for answer, ended in zip(answers, flags)
                 if not ended or is_degenerate(answer or "", min_distinct_bigram_ratio))
    return broken / len(answers)
