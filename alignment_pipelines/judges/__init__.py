"""Judges (annotators): which of two answers to a prompt is better, judged in both orders.

Every judge has a ``name``, a stable ``id`` (for caching judgements) and
``judge(prompts, answers_a, answers_b) -> list[Verdict]``, which asks each pair as (a, b)
and as (b, a) in one batch; only a preference that survives the swap counts. Kinds:

- rule judges (:mod:`.rule`): ``RuleJudge`` ("helpful and short"), ``ShorterJudge``,
  ``ContainsCodeJudge``, ``RegexJudge``, ``PositionJudge`` (pure position bias, for tests);
- ``LocalLLMJudge``: a local causal LM, by the log-probabilities of "A" and "B";
- ``OpenAICompatibleJudge``: a chat-completions endpoint, with retries and bounded concurrency;
- ``ScoreJudge``: any batch scorer, such as a reward model.

:func:`build_judge` makes one from config; :func:`judge_pair` judges a single pair.
"""

from alignment_pipelines.judges.base import (
    Judge,
    JudgeError,
    PairwiseJudge,
    ScoreBasedJudge,
    ScoreJudge,
    Verdict,
    agreement_stats,
    as_batch_judge,
    judge_pair,
)
from alignment_pipelines.judges.factory import JUDGE_KINDS, build_judge
from alignment_pipelines.judges.local_llm import LocalLLMJudge
from alignment_pipelines.judges.openai_compatible import OpenAICompatibleJudge
from alignment_pipelines.judges.rule import ContainsCodeJudge, PositionJudge, RegexJudge, RuleJudge, ShorterJudge

__all__ = [
    "JUDGE_KINDS",
    "ContainsCodeJudge",
    "Judge",
    "JudgeError",
    "LocalLLMJudge",
    "OpenAICompatibleJudge",
    "PairwiseJudge",
    "PositionJudge",
    "RegexJudge",
    "RuleJudge",
    "ScoreBasedJudge",
    "ScoreJudge",
    "ShorterJudge",
    "Verdict",
    "agreement_stats",
    "as_batch_judge",
    "build_judge",
    "judge_pair",
]
