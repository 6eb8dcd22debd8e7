"""Evaluation metrics: implicit DPO reward accuracy, generation, win rate, lengths.

Generation goes through a small backend boundary (:class:`GenerationBackend`): the
transformers implementation here is the default; a vLLM backend can implement the same
``generate`` method and be passed as ``backend=`` without touching callers.
"""

from __future__ import annotations

import math
import statistics
from typing import Protocol, Sequence

from alignment_pipelines.data.schemas import normalize_prompt
from alignment_pipelines.models.loading import load_causal_lm

# --------------------------------------------------------------------------------------
# Log-probabilities and the implicit reward
# --------------------------------------------------------------------------------------


def encode_answer(tokenizer, prompt, answer: str, max_length: int) -> tuple[list[int], int]:
    """Token ids of prompt + answer under the chat template, and where the answer starts.

    The prompt is rendered with the generation prompt; the answer tokens are whatever the
    template adds for the assistant turn (its text and end-of-turn token). Prompt and answer
    are tokenized separately so the boundary is exact. Over ``max_length``, the answer is cut
    at the end and then the prompt from the left, keeping at least one answer token.
    """
    messages = normalize_prompt(prompt)
    prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": answer}], tokenize=False
    )
    if full_text.startswith(prompt_text):
        answer_text = full_text[len(prompt_text):]
    else:  # a template that renders the assistant turn differently from the generation prompt
        answer_text = answer + (tokenizer.eos_token or "")
    p_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    a_ids = tokenizer(answer_text, add_special_tokens=False)["input_ids"]
    if len(p_ids) + len(a_ids) > max_length:
        a_ids = a_ids[: max(1, max_length - len(p_ids))]
        p_ids = p_ids[-max(1, max_length - len(a_ids)):]
    return p_ids + a_ids, len(p_ids)


def sequence_logprobs(model, tokenizer, prompts, answers, max_length: int = 512, batch_size: int = 8) -> list[float]:
    """Sum of the answer tokens' log-probabilities given the prompt, one float per pair."""
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = [encode_answer(tokenizer, p, a, max_length) for p, a in zip(prompts, answers)]
    out: list[float] = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        answer_mask = torch.zeros((len(chunk), width), dtype=torch.bool)
        for i, (ids, n_prompt) in enumerate(chunk):  # right padding
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention[i, : len(ids)] = 1
            answer_mask[i, n_prompt: len(ids)] = True
        input_ids, attention, answer_mask = input_ids.to(device), attention.to(device), answer_mask.to(device)
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=attention).logits.float()
        logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        mask = answer_mask[:, 1:]
        out.extend((logps * mask).sum(-1).tolist())
    return out


def preference_accuracy(policy_dir, reference_dir, pairs_df, beta: float = 0.1, max_length: int = 512,
                        batch_size: int = 8) -> dict:
    """How often the policy's implicit DPO reward prefers the chosen answer.

    ``r(answer) = beta * (logp_policy(answer | prompt) - logp_ref(answer | prompt))``, summed
    over the answer tokens under the chat template. A pair counts as correct when
    ``r(chosen) > r(rejected)`` strictly (as TRL's ``rewards/accuracies``), so a policy equal
    to its reference scores 0 accuracy and 0 margin.

    Returns ``preference_accuracy``, ``reward_margin_mean``, ``reward_chosen_mean``,
    ``reward_rejected_mean`` and ``pairs``.
    """
    prompts = list(pairs_df["prompt"])
    chosen = [str(c) for c in pairs_df["chosen"]]
    rejected = [str(r) for r in pairs_df["rejected"]]
    n = len(prompts)
    if n == 0:
        return {"preference_accuracy": math.nan, "reward_margin_mean": math.nan,
                "reward_chosen_mean": math.nan, "reward_rejected_mean": math.nan, "pairs": 0}

    def logps(model_dir):
        model, tokenizer = load_causal_lm(model_dir)
        both = sequence_logprobs(model, tokenizer, prompts + prompts, chosen + rejected, max_length, batch_size)
        del model
        return both[:n], both[n:]

    pol_c, pol_r = logps(policy_dir)
    ref_c, ref_r = logps(reference_dir)
    r_c = [beta * (p - r) for p, r in zip(pol_c, ref_c)]
    r_r = [beta * (p - r) for p, r in zip(pol_r, ref_r)]
    margins = [c - r for c, r in zip(r_c, r_r)]
    return {
        "preference_accuracy": sum(m > 0 for m in margins) / n,
        "reward_margin_mean": statistics.fmean(margins),
        "reward_chosen_mean": statistics.fmean(r_c),
        "reward_rejected_mean": statistics.fmean(r_r),
        "pairs": n,
    }


# --------------------------------------------------------------------------------------
# Generation (a backend boundary, so vLLM can replace transformers later)
# --------------------------------------------------------------------------------------


class GenerationBackend(Protocol):
    def generate(self, prompts: list[list[dict]], max_new_tokens: int, seed: int) -> list[str]: ...


class TransformersBackend:
    """Greedy decoding with transformers: chat template, left padding, batches."""

    def __init__(self, model_dir, batch_size: int = 8, device: str | None = None):
        self.model, self.tokenizer = load_causal_lm(model_dir, device=device)
        self.batch_size = batch_size

    def generate(self, prompts: list[list[dict]], max_new_tokens: int = 64, seed: int = 0) -> list[str]:
        import torch

        torch.manual_seed(seed)
        tok = self.tokenizer
        tok.padding_side = "left"
        device = next(self.model.parameters()).device
        answers: list[str] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = [normalize_prompt(p) for p in prompts[start:start + self.batch_size]]
            texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in chunk]
            batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.no_grad():
                out = self.model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id,
                )
            new = out[:, batch["input_ids"].shape[1]:]
            answers.extend(t.strip() for t in tok.batch_decode(new, skip_special_tokens=True))
        return answers


def generate_answers(model_dir, prompts: list[list[dict]], max_new_tokens: int = 64, batch_size: int = 8,
                     seed: int = 0, backend: GenerationBackend | None = None) -> list[str]:
    """One greedy answer per prompt (decoded new tokens only, special tokens dropped)."""
    if not prompts:
        return []
    backend = backend or TransformersBackend(model_dir, batch_size=batch_size)
    return backend.generate(list(prompts), max_new_tokens=max_new_tokens, seed=seed)


# --------------------------------------------------------------------------------------
# Judged win rate and lengths
# --------------------------------------------------------------------------------------


def win_rate(policy_answers: Sequence[str], baseline_answers: Sequence[str], prompts, judge) -> dict:
    """Share of prompts where the judge prefers the policy's answer (ties count half).

    One batched call judges every pair in both orders (see :mod:`alignment_pipelines.judges`); a pair
    whose two orders disagree is a tie. With no pairs, ``win_rate`` is NaN (so a ``>=`` gate fails
    rather than passes). Also returns the judge's agreement and position-bias rates.
    """
    from alignment_pipelines.judges import agreement_stats, as_batch_judge

    if not (len(policy_answers) == len(baseline_answers) == len(prompts)):
        raise ValueError(
            f"policy_answers ({len(policy_answers)}), baseline_answers ({len(baseline_answers)}) and prompts "
            f"({len(prompts)}) must have the same length"
        )
    verdicts = as_batch_judge(judge).judge([normalize_prompt(p) for p in prompts], list(policy_answers),
                                           list(baseline_answers))
    wins = sum(v.preferred == "a" for v in verdicts)
    losses = sum(v.preferred == "b" for v in verdicts)
    ties = len(verdicts) - wins - losses
    judged = len(verdicts)
    stats = agreement_stats(verdicts)
    return {
        "win_rate": (wins + 0.5 * ties) / judged if judged else math.nan,
        "wins": wins,
        "losses": losses,
        "ties": ties,
        "judged": judged,
        "judge_agreement_rate": stats["agreement_rate"],
        "judge_position_bias_rate": stats["position_bias_rate"],
    }


def length_stats(answers: Sequence[str]) -> dict:
    """Lengths of answers in characters and words; ``empty_fraction`` of blank answers."""
    answers = [a or "" for a in answers]
    if not answers:
        return {"count": 0, "mean_chars": 0.0, "median_chars": 0.0, "max_chars": 0,
                "mean_words": 0.0, "empty_fraction": 0.0}
    chars = [len(a) for a in answers]
    nwords = [len(a.split()) for a in answers]
    return {
        "count": len(answers),
        "mean_chars": statistics.fmean(chars),
        "median_chars": float(statistics.median(chars)),
        "max_chars": max(chars),
        "mean_words": statistics.fmean(nwords),
        "empty_fraction": sum(1 for a in answers if not a.strip()) / len(answers),
    }


__all__ = [
    "GenerationBackend",
    "TransformersBackend",
    "encode_answer",
    "generate_answers",
    "length_stats",
    "preference_accuracy",
    "sequence_logprobs",
    "win_rate",
]
