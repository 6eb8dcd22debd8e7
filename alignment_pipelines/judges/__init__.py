"""Judges (annotators): score an answer to a prompt, or compare two answers.

A judge is anything with a ``name`` and ``score(prompt, answer) -> float`` (higher is
better). A pairwise judge (e.g. an LLM asked "which answer is better?") may also define
``compare(prompt, first, second) -> float``, the probability that ``first`` is better;
:func:`judge_pair` then asks it in both orders to cancel position bias.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from alignment_pipelines.judges.rule import RuleJudge

__all__ = ["Judge", "RuleJudge", "judge_pair"]


@runtime_checkable
class Judge(Protocol):
    name: str

    def score(self, prompt: list[dict], answer: str) -> float: ...


def _prefers_first(judge, prompt, first: str, second: str) -> float:
    """P(first better) from one look at the pair: a pairwise ``compare`` if any, else scores."""
    compare = getattr(judge, "compare", None)
    if callable(compare):
        return float(compare(prompt, first, second))
    s1, s2 = judge.score(prompt, first), judge.score(prompt, second)
    return 1.0 if s1 > s2 else 0.0 if s1 < s2 else 0.5


def judge_pair(judge, prompt, answer_a: str, answer_b: str) -> float:
    """P(answer_a is better) in {0, 0.5, 1}, judged in both orders (a, b) and (b, a).

    ``1`` only if ``a`` wins in both orders, ``0`` only if ``b`` wins in both; a tie or an
    inconsistent verdict (the judge just preferred a position) gives ``0.5``. So
    ``judge_pair(j, p, a, b) == 1 - judge_pair(j, p, b, a)`` for any judge.
    """
    ab = _prefers_first(judge, prompt, answer_a, answer_b)
    ba = _prefers_first(judge, prompt, answer_b, answer_a)
    if ab > 0.5 and ba < 0.5:
        return 1.0
    if ab < 0.5 and ba > 0.5:
        return 0.0
    return 0.5
