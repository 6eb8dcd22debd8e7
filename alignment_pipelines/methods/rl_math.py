"""The arithmetic of policy-gradient RL for language models, as pure torch functions.

Shared by the project's PPO trainer and anything else that needs the same numbers (RLOO
baselines, evaluation of KL). Conventions, the same everywhere in this module:

- per-token tensors are ``[batch, response_length]``; position ``t`` is the ``t``-th generated token;
- ``mask`` is 1 (or True) on real response tokens and 0 on padding. Where a function says so, the mask
  must mark a prefix of each row (right padding, the layout generation produces);
- log-probs are log-probabilities of the sampled tokens, already gathered (not full-vocabulary logits).

The formulas follow TRL's former PPO trainer (``masked_whiten``, GAE, the clipped losses), so numbers
stay comparable with runs made with TRL before its PPO trainer was removed.
"""

from __future__ import annotations

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None = None, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` over the positions where ``mask`` is set (all positions when ``mask`` is None)."""
    if mask is None:
        return values.mean() if dim is None else values.mean(dim)
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum()
    return (values * mask).sum(dim) / mask.sum(dim)


def masked_var(values: torch.Tensor, mask: torch.Tensor | None = None, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``values`` over the masked positions; ``unbiased`` applies Bessel's correction (as TRL did)."""
    if mask is None:
        mask = torch.ones_like(values)
    mask = mask.to(values.dtype)
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        count = mask.sum()
        if count < 2:
            raise ValueError(f"an unbiased variance needs at least 2 masked values, got {int(count)}")
        variance = variance * count / (count - 1)
    return variance


def whiten(
    values: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Scale ``values`` to unit (unbiased) variance over the masked positions; with ``shift_mean``, also to zero mean.

    ``shift_mean=False`` keeps the mean, which is how rewards are whitened: their sign still says good or bad.
    Positions outside the mask are transformed too; callers zero them where it matters.
    """
    mean = masked_mean(values, mask)
    variance = masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(variance + eps)
    return whitened if shift_mean else whitened + mean


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last set position of each row of ``mask`` (``[batch]``); every row needs at least one."""
    if not bool(mask.any(dim=-1).all()):
        raise ValueError("every row of the mask needs at least one response token")
    length = mask.size(-1)
    return length - 1 - mask.to(torch.long).flip(-1).argmax(-1)


def kl_penalty_rewards(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> torch.Tensor:
    """Per-token RLHF rewards: ``-kl_coef * (logp - ref_logp)`` on every response token, plus the sequence
    ``scores`` ``[batch]`` at each row's last response token; 0 on padding.

    The KL term is the sampled (k1) estimate of KL(policy || reference); summed over a sequence it is an
    unbiased estimate of the sequence KL, which keeps the policy near the reference while the score pulls it.
    """
    mask = mask.to(logprobs.dtype)
    rewards = -kl_coef * (logprobs - ref_logprobs) * mask
    rows = torch.arange(rewards.size(0), device=rewards.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype)
    return rewards


def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over the response tokens; returns ``(advantages, returns)``.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``, where the value
    after the last response token is 0 (the episode ends there). ``returns = advantages + values`` are the
    value targets. The mask must mark a prefix of each row (right padding); both outputs are 0 on padding.
    """
    mask = mask.to(values.dtype)
    rewards = rewards * mask
    values = values * mask
    length = rewards.size(1)
    advantages_reversed = []
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages_reversed.append(next_advantage)
    advantages = torch.stack(advantages_reversed[::-1], dim=1) * mask
    returns = (advantages + values) * mask
    return advantages, returns


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate objective, as a loss to minimise; returns ``(loss, clip_fraction, approx_kl)``.

    Per token: ``max(-A * ratio, -A * clip(ratio, 1 - clip_range, 1 + clip_range))`` with
    ``ratio = exp(logp - old_logp)``, averaged over the mask. The clip stops one batch of rollouts from
    moving the policy far. ``clip_fraction`` is the share of tokens where the clipped term was chosen;
    ``approx_kl`` is ``0.5 * mean((logp - old_logp)^2)``, a cheap gauge of how far the update went.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).to(logprobs.dtype), mask)
    approx_kl = 0.5 * masked_mean(log_ratio.detach() ** 2, mask)
    return loss, clip_fraction.detach(), approx_kl


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss; returns ``(loss, clip_fraction)``.

    ``0.5 * mean(max((V - R)^2, (V_clipped - R)^2))`` where ``V_clipped`` stays within ``clip_range_value``
    of the rollout's values, so the critic cannot jump on one batch either. ``clip_fraction`` is the share
    of tokens where the clipped error was the larger one.
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    clip_fraction = masked_mean((clipped_error > unclipped_error).to(values.dtype), mask)
    return loss, clip_fraction.detach()


def leave_one_out_baseline(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """RLOO advantages: each sample's reward minus the mean reward of the other ``k - 1`` samples of its prompt.

    Layout: ``rewards`` is ``[num_prompts * k]`` with the ``k`` samples of a prompt consecutive
    (``[p0, p0, p0, p1, p1, p1, ...]``), the order TRL's ``RLOOTrainer`` produces (its ``RepeatSampler``
    repeats each prompt ``num_generations`` times in a row and it reshapes with ``view(-1, num_generations)``).
    """
    if k < 2:
        raise ValueError(f"a leave-one-out baseline needs k >= 2 samples per prompt, got k={k}")
    if rewards.dim() != 1 or rewards.numel() % k:
        raise ValueError(f"rewards must be a flat tensor of num_prompts * k values, got shape {tuple(rewards.shape)}")
    grouped = rewards.view(-1, k)
    baselines = (grouped.sum(dim=1, keepdim=True) - grouped) / (k - 1)
    return (grouped - baselines).view(-1)


def logprobs_from_logits(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Log-probability of each of ``token_ids`` ``[batch, T]`` under ``logits`` ``[batch, T, vocab]``.

    Computed as ``logit - logsumexp`` to avoid materialising a second vocabulary-sized tensor.
    """
    logits = logits.float()
    picked = logits.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position of ``logits`` ``[..., vocab]`` (in nats)."""
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def explained_variance(predictions: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """``1 - Var(targets - predictions) / Var(targets)`` over the mask: 1 is a perfect critic, 0 one that
    predicts no better than the mean, negative worse than that. NaN when the targets do not vary."""
    target_variance = masked_var(targets, mask, unbiased=False)
    if float(target_variance) == 0.0:
        return float("nan")
    return float(1.0 - masked_var(targets - predictions, mask, unbiased=False) / target_variance)
