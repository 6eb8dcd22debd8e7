"""Build a judge from config, so a run's config (not its code) chooses its annotator; and the deployment's judge
from its environment (:func:`judge_spec_from_environment`)."""

from __future__ import annotations

import inspect
import os
from typing import Any

from alignment_pipelines.judges.base import PairwiseJudge
from alignment_pipelines.judges.endpoints import JUDGE_API_KEY_ENV
from alignment_pipelines.judges.local_llm import LocalLLMJudge
from alignment_pipelines.judges.openai_compatible import OpenAICompatibleJudge
from alignment_pipelines.judges.reward_model import RewardModelJudge
from alignment_pipelines.judges.rule import ContainsCodeJudge, PositionJudge, RegexJudge, RuleJudge, ShorterJudge

JUDGE_KINDS: dict[str, type[PairwiseJudge]] = {
    "rule": RuleJudge,
    "shorter": ShorterJudge,
    "contains_code": ContainsCodeJudge,
    "regex": RegexJudge,
    "position": PositionJudge,
    "llm": LocalLLMJudge,
    "openai": OpenAICompatibleJudge,
    "reward_model": RewardModelJudge,
}

JUDGE_ENV = "ALIGNMENT_PIPELINES_JUDGE"
"""The deployment's judge kind (``openai`` for an OpenAI-compatible endpoint); with ``_BASE_URL``, ``_MODEL``,
``_INSTRUCTION`` and, for ``llm``, ``_MODEL_DIR``. The key: ``ALIGNMENT_PIPELINES_JUDGE_API_KEY``."""
JUDGE_ENV_OPTIONS = {"base_url": "BASE_URL", "model": "MODEL", "instruction": "INSTRUCTION", "model_dir": "MODEL_DIR",
                     "pattern": "PATTERN"}


def build_judge(spec: dict[str, Any] | str) -> PairwiseJudge:
    """A judge from ``{"kind": ..., **constructor arguments}``, or from a bare kind such as ``"rule"``.

    For example ``{"kind": "llm", "model_dir": "/models/smollm2", "instruction": "helpful and very short"}``
    or ``{"kind": "openai", "base_url": "http://127.0.0.1:8000/v1", "model": "judge"}``. Raises
    ``ValueError`` for an unknown kind or arguments the kind does not take; an API key in the config, or the name
    of a variable to read one from, is refused: the key comes only from ``ALIGNMENT_PIPELINES_JUDGE_API_KEY``.
    """
    params = {"kind": spec} if isinstance(spec, str) else dict(spec)
    kind = params.pop("kind", None)
    if kind not in JUDGE_KINDS:
        raise ValueError(f"judge kind {kind!r} is not one of {sorted(JUDGE_KINDS)}")
    if "api_key" in params:
        raise ValueError(f"a judge config must not hold an API key; the deployment sets it in the environment variable "
                         f"{JUDGE_API_KEY_ENV}")
    if "api_key_env" in params:
        raise ValueError(f"a judge config cannot name the variable its key is read from: the key comes only from "
                         f"{JUDGE_API_KEY_ENV}")
    judge_class = JUDGE_KINDS[kind]
    signature = inspect.signature(judge_class)
    try:
        signature.bind(**params)
    except TypeError as exc:
        raise ValueError(f"judge kind {kind!r} takes {list(signature.parameters)}; got {sorted(params)} ({exc})") from None
    return judge_class(**params)


def judge_spec_from_environment(environ=None) -> dict[str, str]:
    """The deployment's judge as a :func:`build_judge` spec: ``{"kind": $ALIGNMENT_PIPELINES_JUDGE, ...}`` with
    the options set in ``ALIGNMENT_PIPELINES_JUDGE_<OPTION>``; ``{"kind": "rule"}`` when the kind is unset."""
    environ = os.environ if environ is None else environ
    kind = environ.get(JUDGE_ENV) or "rule"
    if kind not in JUDGE_KINDS:
        raise ValueError(f"{JUDGE_ENV}={kind!r} is not one of {sorted(JUDGE_KINDS)}")
    return {"kind": kind, **{option: environ[f"{JUDGE_ENV}_{name}"] for option, name in JUDGE_ENV_OPTIONS.items()
                             if environ.get(f"{JUDGE_ENV}_{name}")}}
