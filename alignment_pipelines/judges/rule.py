"""A deterministic, rule-based judge: "helpful and short".

No model, no network: used in tests, in the demo, and as a cheap sanity check next to an
LLM judge.
"""

from __future__ import annotations

import re

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


class RuleJudge:
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

    @staticmethod
    def _prompt_text(prompt) -> str:
        if isinstance(prompt, str):
            return prompt
        users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
        return users[-1] if users else " ".join(m.get("content", "") for m in prompt)

    def score(self, prompt, answer: str) -> float:
        ws = words(answer or "")
        if not ws:
            return -5.0
        score = 0.0
        asked = content_words(self._prompt_text(prompt))
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
