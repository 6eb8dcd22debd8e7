"""The judge (annotator) the evaluation and the online methods use, chosen by config, not by code."""

from typing import Literal

import dagster as dg

from alignment_pipelines.judges.factory import build_judge, judge_spec_from_environment


class JudgeResource(dg.ConfigurableResource):
    """Which judge compares two answers (in both orders). Secrets never live here, and no field names one: an
    endpoint's key comes only from ``ALIGNMENT_PIPELINES_JUDGE_API_KEY``, and ``base_url`` must pass the
    deployment's allow-list (loopback, or https on a host in ``ALIGNMENT_PIPELINES_JUDGE_ALLOWED_HOSTS``) or the
    judge is refused before any request is sent (``alignment_pipelines/judges/endpoints.py``)."""

    kind: Literal["rule", "shorter", "contains_code", "regex", "llm", "openai"] = "rule"
    instruction: str | None = None  # what "better" means to an LLM judge, e.g. "helpful and very short"
    model_dir: str | None = None  # kind=llm: a local model folder
    base_url: str | None = None  # kind=openai: e.g. http://127.0.0.1:8000/v1
    model: str | None = None  # kind=openai: the served model's name
    pattern: str | None = None  # kind=regex

    @classmethod
    def from_environment(cls, environ=None) -> "JudgeResource":
        """The deployment's judge: ``ALIGNMENT_PIPELINES_JUDGE`` (kind) and ``ALIGNMENT_PIPELINES_JUDGE_<OPTION>``
        (``BASE_URL``, ``MODEL``, ``INSTRUCTION``, ``MODEL_DIR``, ``PATTERN``); the rule judge when unset."""
        return cls(**judge_spec_from_environment(environ))

    def build(self):
        options = {k: v for k, v in self.model_dump().items() if v is not None}
        return build_judge(options)
