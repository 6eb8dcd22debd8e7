"""A local causal LM as a judge: which letter, A or B, is it more likely to answer?

Reading the next-token log-probabilities of "A" and "B" needs no free-text parsing, never
fails to produce a verdict, and gives a calibrated-looking probability for the confidence.
"""

from __future__ import annotations

from pathlib import Path

from alignment_pipelines.judges.base import PairwiseJudge
from alignment_pipelines.judges.prompt import check_instruction, render_judge_prompt


def letter_token_ids(tokenizer, letter: str) -> list[int]:
    """Token ids that spell ``letter`` on their own ("A" and " A" are different tokens in most
    vocabularies); a spelling that needs several tokens says nothing about the first one."""
    ids = []
    for spelling in (letter, " " + letter):
        encoded = tokenizer.encode(spelling, add_special_tokens=False)
        if len(encoded) == 1 and encoded[0] not in ids:
            ids.append(encoded[0])
    if not ids:
        raise ValueError(f"the tokenizer has no single token for {letter!r}; it cannot serve as an A/B judge")
    return ids


class LocalLLMJudge(PairwiseJudge):
    """Judges with a local causal LM (a safetensors folder), steered by ``instruction``.

    Comparisons run in batches of ``batch_size`` prompts, left-padded; prompts longer than
    ``max_length`` tokens (or the model's context) lose their beginning, keeping the question.
    The model loads on first use, so building the judge from config is cheap.
    """

    name = "llm"

    def __init__(self, model_dir: str | Path, instruction: str = "helpful", batch_size: int = 8, *,
                 max_length: int = 2048, device: str | None = None, dtype: str = "auto"):
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size!r}: must be positive")
        if max_length <= 0:
            raise ValueError(f"max_length={max_length!r}: must be positive")
        self.model_dir = str(model_dir)
        self.instruction = check_instruction(instruction)
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = device
        self.dtype = dtype
        self._loaded = None

    def id_params(self):
        return {"model": self.model_dir}

    def _load(self):
        if self._loaded is None:
            from alignment_pipelines.models.loading import load_causal_lm

            model, tokenizer = load_causal_lm(self.model_dir, padding_side="left", device=self.device, dtype=self.dtype)
            tokenizer.truncation_side = "left"
            context = getattr(model.config, "max_position_embeddings", None) or self.max_length
            self._loaded = (model, tokenizer, letter_token_ids(tokenizer, "A"), letter_token_ids(tokenizer, "B"),
                            min(self.max_length, context))
        return self._loaded

    @property
    def model(self):
        """The loaded model (loading it if needed)."""
        return self._load()[0]

    def compare_batch(self, prompts, firsts, seconds):
        import torch

        model, tokenizer, a_ids, b_ids, max_length = self._load()
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": render_judge_prompt(self.instruction, prompt, first, second)}],
                tokenize=False, add_generation_prompt=True,
            )
            for prompt, first, second in zip(prompts, firsts, seconds)
        ]
        comparisons = []
        for start in range(0, len(texts), self.batch_size):
            batch = tokenizer(texts[start:start + self.batch_size], add_special_tokens=False, padding=True,
                              truncation=True, max_length=max_length, return_tensors="pt").to(model.device)
            # Positions count real tokens only, so a left-padded prompt is read as if unpadded.
            position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            with torch.inference_mode():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               position_ids=position_ids, logits_to_keep=1).logits[:, -1, :]
            logprobs = logits.float().log_softmax(-1)
            logp_a = logprobs[:, a_ids].logsumexp(-1)
            logp_b = logprobs[:, b_ids].logsumexp(-1)
            p_first = torch.sigmoid(logp_a - logp_b)
            comparisons.extend(
                (float(p), f"logp(A)={float(la):.4f} logp(B)={float(lb):.4f}")
                for p, la, lb in zip(p_first, logp_a, logp_b)
            )
        return comparisons
