"""Build a judge from config, so a run's config (not its code) chooses its annotator."""

from __future__ import annotations

import inspect
from typing import Any

from alignment_pipelines.judges.base import PairwiseJudge
from alignment_pipelines.judges.local_llm import LocalLLMJudge
from alignment_pipelines.judges.openai_compatible import OpenAICompatibleJudge
from alignment_pipelines.judges.rule import ContainsCodeJudge, PositionJudge, RegexJudge, RuleJudge, ShorterJudge

JUDGE_KINDS: dict[str, type[PairwiseJudge]] = {
    "rule": RuleJudge,
    "shorter": ShorterJudge,
    "contains_code": ContainsCodeJudge,
    "regex": RegexJudge,
    "position": PositionJudge,
    "llm": LocalLLMJudge,
    "openai": OpenAICompatibleJudge,
}


def build_judge(spec: dict[str, Any] | str) -> PairwiseJudge:
    """A judge from ``{"kind": ..., **constructor arguments}``, or from a bare kind such as ``"rule"``.

    For example ``{"kind": "llm", "model_dir": "/models/smollm2", "instruction": "helpful and very short"}``
    or ``{"kind": "openai", "base_url": "http://127.0.0.1:8000/v1", "model": "judge"}``. Raises
    ``ValueError`` for an unknown kind or arguments the kind does not take; an API key in the
    config is refused, since secrets come only from the environment (``api_key_env``).
    """
    params = {"kind": spec} if isinstance(spec, str) else dict(spec)
    kind = params.pop("kind", None)
    if kind not in JUDGE_KINDS:
        raise ValueError(f"judge kind {kind!r} is not one of {sorted(JUDGE_KINDS)}")
    if "api_key" in params:
        raise ValueError("a judge config must not hold an API key; put it in an environment variable and name "
                         "that variable with 'api_key_env'")
    judge_class = JUDGE_KINDS[kind]
    signature = inspect.signature(judge_class)
    try:
        signature.bind(**params)
    except TypeError as exc:
        raise ValueError(f"judge kind {kind!r} takes {list(signature.parameters)}; got {sorted(params)} ({exc})") from None
    return judge_class(**params)
