"""Deterministic rule judges: no model, no network.

Used in tests, in the demo, as cheap rewards, and as sanity checks next to an LLM judge.
:class:`RuleJudge` scores "helpful and short"; the others each test one property, so a test
(or an online run) can steer towards it and check that the steering worked.
"""

from __future__ import annotations

import math
import re

from alignment_pipelines.data.schemas import last_user_turn
from typing import Literal

from alignment_pipelines.judges.base import PairwiseJudge, ScoreBasedJudge

_WORD = re.compile(r"[a-z0-9']+")

STOPWORDS = frozenset(
    "a an the and or but if then so of to in on at for with by from as is are was were be been it its this that "
    "these those i you he she we they me my your our their what which who whom how why when where do does did "
    "can could should would will shall may might must please tell give me about".split()
)

HEDGES = (
    "i think", "i believe", "i guess", "maybe", "perhaps", "possibly", "probably", "basically", "honestly",
    "actually", "really", "quite", "somewhat", "rather", "kind of", "sort of", "it depends", "i'm not sure",
    "i am not sure", "to be honest", "in my opinion", "as an ai", "needless to say", "it is important to note",
    "it's important to note",
)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def content_words(text: str) -> set[str]:
    return {w for w in words(text) if w not in STOPWORDS and len(w) > 1}


class RuleJudge(ScoreBasedJudge):
    """Scores an answer to a prompt; higher is better. Deterministic.

    The score is a sum of these terms (roughly in [-4, 2]):

    1. **Empty** (no word characters): score is ``-5`` and nothing else counts.
    2. **On topic**: ``+topic_weight * overlap``, where ``overlap`` is the share of the last user
       turn's content words (stopwords dropped) that the answer repeats, in [0, 1].
    3. **Concise**: ``+0.5`` when the answer has at most ``max_words`` words (default 60);
       beyond that ``-0.5`` per extra ``max_words`` words, capped at ``-2``.
    4. **Hedging / filler**: ``-0.25`` per occurrence of a phrase in :data:`HEDGES`
       ("i think", "basically", "it depends", ...), capped at ``-1.5``.
    5. **Repetition**: ``-2 * (1 - distinct word bigrams / word bigrams)`` for answers of at
       least 4 words (a looping answer scores near ``-2``).
    """

    name = "rule"

    def __init__(self, max_words: int = 60, topic_weight: float = 1.0):
        if max_words <= 0:
            raise ValueError(f"max_words={max_words!r}: must be positive")
        self.max_words = max_words
        self.topic_weight = topic_weight

    def id_params(self):
        return {"max_words": self.max_words, "topic_weight": self.topic_weight}

    def score(self, prompt, answer: str) -> float:
        ws = words(answer or "")
        if not ws:
            return -5.0
        score = 0.0
        asked = content_words(last_user_turn(prompt))
        if asked:
            score += self.topic_weight * len(asked & set(ws)) / len(asked)
        n = len(ws)
        if n <= self.max_words:
            score += 0.5
        else:
            score -= min(2.0, 0.5 * (n - self.max_words) / self.max_words)
        joined = " " + " ".join(ws) + " "
        hedges = sum(joined.count(" " + " ".join(words(h)) + " ") for h in HEDGES)
        score -= min(1.5, 0.25 * hedges)
        if n >= 4:
            bigrams = list(zip(ws, ws[1:]))
            score -= 2.0 * (1 - len(set(bigrams)) / len(bigrams))
        return float(score)


class ShorterJudge(ScoreBasedJudge):
    """Prefers the answer with fewer characters (ignoring surrounding whitespace).

    An empty answer loses to any non-empty one: otherwise a policy steered by this judge
    would learn to say nothing.
    """

    name = "shorter"

    def score(self, prompt, answer):
        text = (answer or "").strip()
        return -float(len(text)) if text else -math.inf


class RegexJudge(ScoreBasedJudge):
    """Prefers the answer that matches ``pattern`` (``re.search``; use ``(?i)`` for case-insensitive)."""

    name = "regex"

    def __init__(self, pattern: str):
        self.pattern = pattern
        self._compiled = re.compile(pattern)

    def id_params(self):
        return {"pattern": self.pattern}

    def score(self, prompt, answer):
        return 1.0 if self._compiled.search(answer or "") else 0.0


CODE_PATTERN = r"```|`[^`\n]+`|^[ \t]*(def|class|import|from|return|function|const|let|var|#include)\b"


class ContainsCodeJudge(RegexJudge):
    """Prefers the answer that contains code: a fenced or inline code span, or a line that starts
    with a lowercase keyword such as ``def``, ``import`` or ``return``."""

    name = "contains_code"

    def __init__(self):
        super().__init__("(?m)" + CODE_PATTERN)

    def id_params(self):
        return {}


class PositionJudge(PairwiseJudge):
    """Always prefers one position ("a": whichever answer is shown first), whatever the answers.

    The worst possible position bias: judged in both orders it must yield only ties, which
    tests use to check that position bias cancels.
    """

    name = "position"

    def __init__(self, position: Literal["a", "b"] = "a"):
        if position not in ("a", "b"):
            raise ValueError(f"position must be 'a' (first shown) or 'b' (second shown), got {position!r}")
        self.position = position

    def id_params(self):
        return {"position": self.position}

    def compare_batch(self, prompts, firsts, seconds):
        p_first = 1.0 if self.position == "a" else 0.0
        return [(p_first, f"always position {self.position.upper()}")] * len(firsts)
