"""The judge (annotator) the evaluation and the online methods use, chosen by config, not by code."""

from typing import Literal

import dagster as dg

from alignment_pipelines.judges.factory import build_judge


class JudgeResource(dg.ConfigurableResource):
    """Which judge compares two answers (in both orders). Secrets never live here: an endpoint's key is
    read from the environment variable named by ``api_key_env``."""

    kind: Literal["rule", "shorter", "contains_code", "regex", "llm", "openai"] = "rule"
    instruction: str | None = None  # what "better" means to an LLM judge, e.g. "helpful and very short"
    model_dir: str | None = None  # kind=llm: a local model folder
    base_url: str | None = None  # kind=openai: e.g. http://127.0.0.1:8000/v1
    model: str | None = None  # kind=openai: the served model's name
    api_key_env: str | None = None  # kind=openai: the variable holding the key
    pattern: str | None = None  # kind=regex

    def build(self):
        options = {k: v for k, v in self.model_dump().items() if v is not None}
        return build_judge(options)
