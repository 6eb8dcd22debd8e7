"""The batch judge interface: every pair judged in both orders, in one batch.

A judge answers "which of two answers to a prompt is better?". Judges (LLMs above all) prefer
a position as well as an answer, so every pair is asked as (a, b) and as (b, a); only a
preference that survives the swap counts, and a judge that just likes a position yields ties.
Both orders go into one :meth:`PairwiseJudge.compare_batch` call so that an LLM judge can
serve all 2N comparisons with batched forward passes or concurrent requests.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

Prompt = Any
"""A prompt: a list of ``{"role", "content"}`` messages (or a plain string, one user turn)."""

Comparison = tuple[float, str]
"""One look at a pair in one order: (P(the answer shown first is better), the judge's raw output)."""

ORDERS = ("(a, b)", "(b, a)")


class JudgeError(RuntimeError):
    """A judgement that could not be made (after retries, for remote judges).

    ``request_index`` is the failed comparison's index in :meth:`PairwiseJudge.compare_batch`;
    :meth:`PairwiseJudge.judge` adds the ``pair`` index and the ``order`` it was asked in.
    """

    def __init__(self, message: str, *, request_index: int | None = None, pair: int | None = None,
                 order: str | None = None):
        super().__init__(message)
        self.request_index = request_index
        self.pair = pair
        self.order = order


@dataclass(frozen=True)
class Verdict:
    """One pair judged in both orders.

    ``first_order`` is P(first shown is better) when shown as (a, b), i.e. P(a better);
    ``second_order`` is P(first shown is better) when shown as (b, a), i.e. P(b better).
    ``preferred`` is ``"a"`` or ``"b"`` only when both orders pick that answer, else ``"tie"``.
    ``confidence`` is the probability behind ``preferred``: :attr:`p_a` for ``"a"``,
    ``1 - p_a`` for ``"b"``, and for a tie how close ``p_a`` is to 0.5.
    ``raw`` holds the judge's raw output for each order, (a, b) first.
    """

    preferred: Literal["a", "b", "tie"]
    confidence: float
    first_order: float
    second_order: float
    raw: tuple[str, str]

    @classmethod
    def from_orders(cls, first: Comparison, second: Comparison) -> Verdict:
        (p_first, raw_first), (p_second, raw_second) = first, second
        for p in (p_first, p_second):
            if not (isinstance(p, (int, float)) and 0.0 <= p <= 1.0):
                raise JudgeError(f"a judge returned P(first better) = {p!r}; it must be a number in [0, 1]")
        p_a = (p_first + 1.0 - p_second) / 2
        if p_first > 0.5 and p_second < 0.5:
            preferred, confidence = "a", p_a
        elif p_first < 0.5 and p_second > 0.5:
            preferred, confidence = "b", 1.0 - p_a
        else:
            preferred, confidence = "tie", 1.0 - abs(2 * p_a - 1)
        return cls(preferred, float(confidence), float(p_first), float(p_second), (raw_first, raw_second))

    @property
    def p_a(self) -> float:
        """P(a better), averaged over both positions: a soft label for down-weighting ties."""
        return (self.first_order + 1.0 - self.second_order) / 2

    @property
    def score_a(self) -> float:
        """a's share of the win: 1, 0.5 (tie) or 0."""
        return {"a": 1.0, "b": 0.0, "tie": 0.5}[self.preferred]

    @property
    def agrees(self) -> bool:
        """Both orders reached the same conclusion about the answers (a, b, or no preference)."""
        return _sign(self.first_order) == -_sign(self.second_order)

    @property
    def position_biased(self) -> bool:
        """Both orders picked the same position, so the judge preferred a slot, not an answer."""
        return _sign(self.first_order) == _sign(self.second_order) != 0


def _sign(p_first: float) -> int:
    """+1 if the first-shown answer won, -1 if the second did, 0 for no preference."""
    return (p_first > 0.5) - (p_first < 0.5)


def agreement_stats(verdicts: Sequence[Verdict]) -> dict:
    """How consistent a judge was across orders: metrics to log next to every batch of judgements.

    ``agreement_rate``: share of pairs whose two orders agree; ``position_bias_rate``: share
    where both orders picked the same position; ``ties``: number of tied verdicts. Rates are
    NaN for no verdicts.
    """
    n = len(verdicts)
    return {
        "pairs": n,
        "agreement_rate": sum(v.agrees for v in verdicts) / n if n else math.nan,
        "position_bias_rate": sum(v.position_biased for v in verdicts) / n if n else math.nan,
        "ties": sum(v.preferred == "tie" for v in verdicts),
    }


@runtime_checkable
class Judge(Protocol):
    """What callers rely on: a name, a stable id for caching, and batch judgements."""

    name: str

    @property
    def id(self) -> str: ...

    def judge(self, prompts: Sequence[Prompt], answers_a: Sequence[str], answers_b: Sequence[str]) -> list[Verdict]: ...


class PairwiseJudge(ABC):
    """Base of every judge: implements :meth:`judge` (both orders, one batch) from :meth:`compare_batch`."""

    name: str = "pairwise"
    instruction: str = ""

    def id_params(self) -> dict[str, Any]:
        """The parameters that change judgements; with the name and instruction they make :attr:`id`."""
        return {}

    @property
    def id(self) -> str:
        """Stable identity of this judge's judgements, e.g. ``llm{"instruction": "helpful", "model": "..."}``:
        a cache of judgements is keyed on it, so it changes whenever a judgement could."""
        params = dict(self.id_params())
        if self.instruction:
            params["instruction"] = self.instruction
        return self.name + json.dumps(params, sort_keys=True, ensure_ascii=False) if params else self.name

    @abstractmethod
    def compare_batch(self, prompts: Sequence[Prompt], firsts: Sequence[str],
                      seconds: Sequence[str]) -> list[Comparison]:
        """For each i, P(``firsts[i]`` is better than ``seconds[i]`` as an answer to ``prompts[i]``)
        with the raw output it came from. Either every comparison succeeds or it raises."""

    def judge(self, prompts: Sequence[Prompt], answers_a: Sequence[str], answers_b: Sequence[str]) -> list[Verdict]:
        """Judge every pair as (a, b) and as (b, a) in one :meth:`compare_batch` call of 2N comparisons.

        Comparison ``i < N`` is pair ``i`` as (a, b); comparison ``N + i`` is pair ``i`` as (b, a).
        Raises :class:`JudgeError` (naming the pair and order) rather than return part of a batch.
        """
        prompts, answers_a, answers_b = list(prompts), list(answers_a), list(answers_b)
        n = len(prompts)
        if not n == len(answers_a) == len(answers_b):
            raise ValueError(
                f"prompts ({n}), answers_a ({len(answers_a)}) and answers_b ({len(answers_b)}) must have the same length"
            )
        if not n:
            return []
        try:
            comparisons = self.compare_batch(prompts + prompts, answers_a + answers_b, answers_b + answers_a)
        except JudgeError as err:
            if err.request_index is None:
                raise
            pair, order = err.request_index % n, ORDERS[err.request_index // n]
            raise JudgeError(f"{self.name} judge: pair {pair} in order {order}: {err}",
                             request_index=err.request_index, pair=pair, order=order) from err
        if len(comparisons) != 2 * n:
            raise JudgeError(f"{self.name} judge returned {len(comparisons)} comparisons for {2 * n} requests")
        return [Verdict.from_orders(comparisons[i], comparisons[n + i]) for i in range(n)]


class ScoreBasedJudge(PairwiseJudge):
    """A judge that scores each answer on its own; the higher score wins (equal scores tie).

    Its two orders always agree, so it never shows position bias. Each distinct
    (prompt, answer) is scored once per batch, though :meth:`judge` shows it in two orders.
    """

    @abstractmethod
    def score(self, prompt: Prompt, answer: str) -> float:
        """The answer's score; higher is better."""

    def score_batch(self, prompts: Sequence[Prompt], answers: Sequence[str]) -> list[float]:
        """Scores for many answers; override to batch (a reward model scores a batch in one pass)."""
        return [self.score(prompt, answer) for prompt, answer in zip(prompts, answers)]

    def compare_batch(self, prompts, firsts, seconds):
        all_prompts, all_answers = [*prompts, *prompts], [*firsts, *seconds]
        keys = [(json.dumps(p, sort_keys=True), answer) for p, answer in zip(all_prompts, all_answers)]
        first_seen: dict[tuple[str, str], int] = {}
        for i, key in enumerate(keys):
            first_seen.setdefault(key, i)
        scores = self.score_batch([all_prompts[i] for i in first_seen.values()],
                                  [all_answers[i] for i in first_seen.values()])
        if len(scores) != len(first_seen):
            raise JudgeError(f"{self.name} judge returned {len(scores)} scores for {len(first_seen)} answers")
        if any(math.isnan(float(s)) for s in scores):
            raise JudgeError(f"{self.name} judge returned a NaN score")
        by_key = dict(zip(first_seen, map(float, scores)))
        n = len(firsts)
        comparisons = []
        for first_key, second_key in zip(keys[:n], keys[n:]):
            s1, s2 = by_key[first_key], by_key[second_key]
            comparisons.append((1.0 if s1 > s2 else 0.0 if s1 < s2 else 0.5, f"scores {s1:.6g} vs {s2:.6g}"))
        return comparisons


class ScoreJudge(ScoreBasedJudge):
    """Any batch scorer as a judge, e.g. a reward model: ``score_fn(prompts, answers) -> scores``.

    ``name`` is the judge's whole identity (``id``), so it should name the scorer's version,
    e.g. ``"reward_model:v3"``.
    """

    def __init__(self, score_fn: Callable[[list[Prompt], list[str]], Sequence[float]], name: str):
        if not name:
            raise ValueError("a ScoreJudge needs a name that identifies its scorer")
        self.score_fn = score_fn
        self.name = name

    def score(self, prompt, answer):
        return float(self.score_fn([prompt], [answer])[0])

    def score_batch(self, prompts, answers):
        return [float(s) for s in self.score_fn(list(prompts), list(answers))]


class _ComparePerPair(PairwiseJudge):
    """The batch interface over a judge that only has ``compare(prompt, first, second) -> P(first better)``."""

    def __init__(self, inner):
        self.inner = inner
        self.name = getattr(inner, "name", type(inner).__name__)

    def compare_batch(self, prompts, firsts, seconds):
        return [(float(self.inner.compare(p, f, s)), "compare") for p, f, s in zip(prompts, firsts, seconds)]


def as_batch_judge(judge) -> Judge:
    """``judge`` itself if it has the batch interface; else a per-pair judge (``compare(prompt, first,
    second)`` or ``score(prompt, answer)``) wrapped in it, so callers need only the batch API."""
    if callable(getattr(judge, "judge", None)):
        return judge
    if callable(getattr(judge, "compare", None)):
        return _ComparePerPair(judge)
    if callable(getattr(judge, "score", None)):
        return ScoreJudge(lambda prompts, answers: [judge.score(p, a) for p, a in zip(prompts, answers)],
                          getattr(judge, "name", type(judge).__name__))
    raise TypeError(f"{type(judge).__name__} is not a judge: it has none of judge(), compare() or score()")


def judge_pair(judge, prompt: Prompt, answer_a: str, answer_b: str) -> float:
    """P(answer_a is better) in {0, 0.5, 1}, judged in both orders (a, b) and (b, a).

    ``1`` only if ``a`` wins in both orders, ``0`` only if ``b`` wins in both; a tie or an
    inconsistent verdict (the judge just preferred a position) gives ``0.5``. So
    ``judge_pair(j, p, a, b) == 1 - judge_pair(j, p, b, a)`` for any deterministic judge.
    """
    return as_batch_judge(judge).judge([prompt], [answer_a], [answer_b])[0].score_a
