"""The generation backend: vLLM where it can run (installed, and a CUDA GPU visible), else HF ``generate``.

Two users:

- the online methods (RLOO through TRL's ``use_vllm``, online DPO through TRL's colocated vLLM engine): a config with
  ``use_vllm`` runs anywhere. Where vLLM cannot run, :func:`resolve_use_vllm` (called by ``MethodConfig.validate``
  on the machine that trains) turns the flag off and logs a warning on the ``alignment_pipelines.generation`` logger,
  which the training worker forwards to the Dagster run through Pipes;
- evaluation sampling: :func:`generation_backend` gives a :class:`VLLMBackend` for a full-weights model folder
  where vLLM can run, else the transformers backend, and logs which and why.

A judge or annotator served by ``vllm serve`` is reached through the OpenAI-compatible judge
(``judges/openai_compatible.py``, ``judge: openai``); nothing here is needed for it.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Literal

logger = logging.getLogger("alignment_pipelines.generation")

Preference = Literal["auto", "vllm", "hf"]


def vllm_availability() -> tuple[bool, str]:
    """(whether vLLM can generate here, why or why not)."""
    if importlib.util.find_spec("vllm") is None:
        return False, "vLLM is not installed (pip install 'alignment-pipelines[gpu]' on a GPU machine)"
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible"
    return True, "vLLM is installed and a CUDA GPU is visible"


def resolve_use_vllm(config) -> str | None:
    """Turn ``config.use_vllm`` off where vLLM cannot run, and say so; the message, or None when nothing changed."""
    if not getattr(config, "use_vllm", False):
        return None
    usable, reason = vllm_availability()
    if usable:
        logger.info("use_vllm: generating with vLLM (%s)", reason)
        return None
    config.use_vllm = False
    message = f"use_vllm is set but {reason}: falling back to HF generate (transformers) for sampling"
    logger.warning(message)
    return message


class VLLMBackend:
    """Greedy answers from vLLM's offline engine on a full-weights model folder (the evaluation's backend protocol:
    ``generate(prompts, max_new_tokens, seed) -> list[Answer]``)."""

    def __init__(self, model_dir: str | Path, gpu_memory_utilization: float = 0.5, trust_remote_code: bool = False):
        from vllm import LLM

        self.llm = LLM(model=str(model_dir), gpu_memory_utilization=gpu_memory_utilization,
                       trust_remote_code=trust_remote_code, seed=0)

    def generate(self, prompts: list[list[dict]], max_new_tokens: int = 64, seed: int = 0):
        from vllm import SamplingParams

        from alignment_pipelines.data.schemas import normalize_prompt
        from alignment_pipelines.evaluation.metrics import Answer

        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, seed=seed)
        outputs = self.llm.chat([normalize_prompt(p) for p in prompts], params, use_tqdm=False)
        return [Answer(out.outputs[0].text.strip(), len(out.outputs[0].token_ids), out.outputs[0].finish_reason == "stop")
                for out in outputs]


def generation_backend(model_dir: str | Path, batch_size: int = 8, prefer: Preference = "auto", loaded=None):
    """vLLM for a full-weights folder where it can run (``prefer`` "auto" or "vllm"), else transformers; logged.
    ``loaded``: the (model, tokenizer) already in memory, which the transformers backend then reuses."""
    from alignment_pipelines.evaluation.metrics import TransformersBackend
    from alignment_pipelines.models.loading import is_adapter_folder, load_causal_lm

    if prefer != "hf":
        usable, reason = vllm_availability()
        if usable and is_adapter_folder(Path(model_dir)):
            usable, reason = False, "the model is a LoRA adapter folder (`alignment-pipelines export` merges it)"
        if usable:
            logger.info("generating with vLLM: %s", reason)
            return VLLMBackend(model_dir)
        log = logger.warning if prefer == "vllm" else logger.info
        log("generating with HF generate (transformers) instead of vLLM: %s", reason)
    return TransformersBackend(*(loaded or load_causal_lm(model_dir)), batch_size=batch_size)
