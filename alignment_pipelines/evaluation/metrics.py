"""Evaluation metrics: implicit DPO reward accuracy, generation, win rate, lengths.

Generation goes through a small backend boundary (:class:`GenerationBackend`): the
transformers implementation here is the default; a vLLM backend can implement the same
``generate`` method and be passed as ``backend=`` without touching callers.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Protocol, Sequence

from alignment_pipelines.data.schemas import normalize_prompt
from alignment_pipelines.evaluation.stats import win_rate_summary
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


def implicit_reward_metrics(policy_chosen: Sequence[float], policy_rejected: Sequence[float],
                            reference_chosen: Sequence[float], reference_rejected: Sequence[float],
                            beta: float = 0.1) -> dict:
    """How often the implicit DPO reward prefers the chosen answer, from sequence log-probabilities.

    ``r(answer) = beta * (logp_policy(answer | prompt) - logp_ref(answer | prompt))``. A pair counts
    as correct when ``r(chosen) > r(rejected)`` strictly (as TRL's ``rewards/accuracies``), so a
    policy equal to its reference scores 0 accuracy and 0 margin. Kept apart from model loading so
    one load of each model serves every policy that uses it as its reference.
    """
    n = len(policy_chosen)
    if n == 0:
        return {"preference_accuracy": math.nan, "reward_margin_mean": math.nan,
                "reward_chosen_mean": math.nan, "reward_rejected_mean": math.nan, "pairs": 0}
    r_c = [beta * (p - r) for p, r in zip(policy_chosen, reference_chosen)]
    r_r = [beta * (p - r) for p, r in zip(policy_rejected, reference_rejected)]
    margins = [c - r for c, r in zip(r_c, r_r)]
    return {
        "preference_accuracy": sum(m > 0 for m in margins) / n,
        "reward_margin_mean": statistics.fmean(margins),
        "reward_chosen_mean": statistics.fmean(r_c),
        "reward_rejected_mean": statistics.fmean(r_r),
        "pairs": n,
    }


def pair_logprobs(model, tokenizer, pairs_df, max_length: int = 512, batch_size: int = 8) -> tuple[list, list]:
    """Sequence log-probabilities of the chosen and of the rejected answers of ``pairs_df``."""
    prompts = list(pairs_df["prompt"])
    answers = [str(c) for c in pairs_df["chosen"]] + [str(r) for r in pairs_df["rejected"]]
    both = sequence_logprobs(model, tokenizer, prompts + prompts, answers, max_length, batch_size)
    return both[:len(prompts)], both[len(prompts):]


def preference_accuracy(policy_dir, reference_dir, pairs_df, beta: float = 0.1, max_length: int = 512,
                        batch_size: int = 8) -> dict:
    """:func:`implicit_reward_metrics` of a policy folder against its reference folder (loads both)."""
    logps = []
    for model_dir in (policy_dir, reference_dir):
        model, tokenizer = load_causal_lm(model_dir)
        logps.append(pair_logprobs(model, tokenizer, pairs_df, max_length, batch_size))
        del model
    (pol_c, pol_r), (ref_c, ref_r) = logps
    return implicit_reward_metrics(pol_c, pol_r, ref_c, ref_r, beta)


# --------------------------------------------------------------------------------------
# Generation (a backend boundary, so vLLM can replace transformers later)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """A generated answer: its text, how many tokens it took and whether it ended with EOS (a cut-off
    answer usually means a loop)."""

    text: str
    tokens: int
    finished: bool


class GenerationBackend(Protocol):
    def generate(self, prompts: list[list[dict]], max_new_tokens: int, seed: int) -> list[Answer]: ...


class TransformersBackend:
    """Greedy decoding with transformers on an already loaded model: chat template, left padding, batches."""

    def __init__(self, model, tokenizer, batch_size: int = 8):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size = batch_size

    def generate(self, prompts: list[list[dict]], max_new_tokens: int = 64, seed: int = 0) -> list[Answer]:
        import torch

        torch.manual_seed(seed)
        tok = self.tokenizer
        tok.padding_side = "left"
        device = next(self.model.parameters()).device
        answers: list[Answer] = []
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
            for row in out[:, batch["input_ids"].shape[1]:].tolist():
                finished = tok.eos_token_id in row
                kept = row[:row.index(tok.eos_token_id)] if finished else row
                answers.append(Answer(tok.decode(kept, skip_special_tokens=True).strip(), len(kept), finished))
        return answers


def generate_answers(model_dir, prompts: list[list[dict]], max_new_tokens: int = 64, batch_size: int = 8,
                     seed: int = 0, backend: GenerationBackend | None = None) -> list[str]:
    """One greedy answer per prompt (decoded new tokens only, special tokens dropped)."""
    if not prompts:
        return []
    backend = backend or TransformersBackend(*load_causal_lm(model_dir), batch_size=batch_size)
    return [answer.text for answer in backend.generate(list(prompts), max_new_tokens=max_new_tokens, seed=seed)]


# --------------------------------------------------------------------------------------
# Judged win rate and lengths
# --------------------------------------------------------------------------------------


def judge_answers(policy_answers: Sequence[str], baseline_answers: Sequence[str], prompts, judge) -> list:
    """The judge's verdict on each (policy, baseline) pair, every pair asked in both orders in one batch
    (see :mod:`alignment_pipelines.judges`); a pair whose two orders disagree is a tie."""
    from alignment_pipelines.judges import as_batch_judge

    if not (len(policy_answers) == len(baseline_answers) == len(prompts)):
        raise ValueError(
            f"policy_answers ({len(policy_answers)}), baseline_answers ({len(baseline_answers)}) and prompts "
            f"({len(prompts)}) must have the same length"
        )
    return as_batch_judge(judge).judge([normalize_prompt(p) for p in prompts], list(policy_answers),
                                       list(baseline_answers))


def summarize_verdicts(verdicts) -> dict:
    """Win-rate (ties count half) with its 95% Wilson interval, the counts, and how consistent the judge
    was across orders. With no pairs the rate is NaN and the interval [0, 1], so no gate passes on it."""
    from alignment_pipelines.judges import agreement_stats

    summary = win_rate_summary([v.score_a for v in verdicts])
    agreement = agreement_stats(verdicts)
    return {"win_rate": summary["win_rate"], "ci_low": summary["ci_low"], "ci_high": summary["ci_high"],
            "wins": summary["wins"], "losses": summary["losses"], "ties": summary["ties"], "judged": summary["n"],
            "judge_agreement_rate": agreement["agreement_rate"],
            "judge_position_bias_rate": agreement["position_bias_rate"]}


def win_rate(policy_answers: Sequence[str], baseline_answers: Sequence[str], prompts, judge) -> dict:
    """:func:`summarize_verdicts` of :func:`judge_answers`: the policy's win-rate against the baseline."""
    return summarize_verdicts(judge_answers(policy_answers, baseline_answers, prompts, judge))


__all__ = [
    "Answer",
    "GenerationBackend",
    "TransformersBackend",
    "encode_answer",
    "generate_answers",
    "implicit_reward_metrics",
    "judge_answers",
    "pair_logprobs",
    "preference_accuracy",
    "sequence_logprobs",
    "summarize_verdicts",
    "win_rate",
]
