"""The RL arithmetic against small examples worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from alignment_pipelines.methods.rl_math import (
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    explained_variance,
    gae_advantages,
    kl_penalty_rewards,
    last_token_index,
    leave_one_out_baseline,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    whiten,
)


def t(values):
    return torch.tensor(values, dtype=torch.float32)


def test_masked_mean_and_var_ignore_padding():
    values, mask = t([1, 2, 3, 100]), t([1, 1, 1, 0])
    assert masked_mean(values, mask).item() == pytest.approx(2.0)
    assert masked_var(values, mask).item() == pytest.approx(1.0)  # (1 + 0 + 1) / (3 - 1)
    assert masked_var(values, mask, unbiased=False).item() == pytest.approx(2 / 3)
    assert masked_mean(t([[1, 3], [5, 100]]), t([[1, 1], [1, 0]]), dim=1).tolist() == pytest.approx([2.0, 5.0])
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(values, t([0, 1, 0, 0]))


def test_whiten_to_unit_variance_with_and_without_the_mean():
    values = t([2, 4, 6, 1000])
    mask = t([1, 1, 1, 0])  # mean 4, unbiased variance 4 over the first three
    assert whiten(values, mask)[:3].tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-6)
    assert whiten(values, mask, shift_mean=False)[:3].tolist() == pytest.approx([3.0, 4.0, 5.0], abs=1e-6)
    assert whiten(t([2, 4, 6])).tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-6)


def test_gae_with_lambda_and_a_padded_row():
    rewards = t([[0, 0, 1], [0, 2, 0]])
    values = t([[0.5, 0.5, 0.5], [1, 1, 9]])  # the 9 sits on padding: it must not leak in
    mask = t([[1, 1, 1], [1, 1, 0]])
    advantages, returns = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.5)
    # row 0: delta = [0, 0, 0.5]; A2 = 0.5, A1 = 0 + 0.5 * 0.5, A0 = 0 + 0.5 * 0.25
    # row 1: V after the last token is 0; delta = [0, 1, 0]; A1 = 1, A0 = 0.5 * 1
    assert advantages.tolist() == [pytest.approx([0.125, 0.25, 0.5]), pytest.approx([0.5, 1.0, 0.0])]
    assert returns.tolist() == [pytest.approx([0.625, 0.75, 1.0]), pytest.approx([1.5, 2.0, 0.0])]


def test_gae_discounts_with_gamma():
    advantages, returns = gae_advantages(t([[0, 0, 1]]), t([[0, 0, 0]]), t([[1, 1, 1]]), gamma=0.5, lam=1.0)
    assert advantages.tolist() == [pytest.approx([0.25, 0.5, 1.0])]
    assert returns.tolist() == [pytest.approx([0.25, 0.5, 1.0])]


def test_gae_with_lambda_zero_is_the_one_step_td_error():
    rewards, values, mask = t([[1, 2, 3]]), t([[4, 5, 6]]), t([[1, 1, 1]])
    advantages, _ = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.0)
    assert advantages.tolist() == [pytest.approx([1 + 5 - 4, 2 + 6 - 5, 3 + 0 - 6])]


def test_clipped_policy_loss_by_hand():
    old = t([[0, 0, 0, 0]])
    logprobs = t([[math.log(1.5), math.log(0.5), math.log(1.1), 5.0]])  # ratios 1.5, 0.5, 1.1, (padding)
    advantages = t([[1, 1, -1, 100]])
    mask = t([[1, 1, 1, 0]])
    loss, clip_fraction, approx_kl = clipped_policy_loss(logprobs, old, advantages, mask, clip_range=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(-0.5, -0.8) = -0.5; token 2: max(1.1, 1.1) = 1.1
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.1) / 3)
    assert clip_fraction.item() == pytest.approx(1 / 3)
    expected_kl = 0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2 + math.log(1.1) ** 2) / 3
    assert approx_kl.item() == pytest.approx(expected_kl)


def test_clipped_policy_loss_gradient_vanishes_where_clipped():
    logprobs = t([[math.log(1.5), math.log(1.0)]]).requires_grad_()
    loss, _, _ = clipped_policy_loss(logprobs, t([[0, 0]]), t([[1, 1]]), t([[1, 1]]), clip_range=0.2)
    loss.backward()
    # d/dlogp of -A * ratio / 2 is -ratio / 2 where unclipped, 0 where the clip holds the ratio at 1.2
    assert logprobs.grad.tolist() == [pytest.approx([0.0, -0.5])]


def test_clipped_value_loss_by_hand():
    values, old_values, returns = t([[0.5, -0.1, 7]]), t([[0, 0, 0]]), t([[1, 1, 0]])
    mask = t([[1, 1, 0]])
    loss, clip_fraction = clipped_value_loss(values, old_values, returns, mask, clip_range_value=0.2)
    # token 0: clipped value 0.2 -> max((0.5-1)^2, (0.2-1)^2) = 0.64; token 1: within the clip -> 1.21
    assert loss.item() == pytest.approx(0.5 * (0.64 + 1.21) / 2)
    assert clip_fraction.item() == pytest.approx(0.5)


def test_kl_penalty_rewards_put_the_score_on_the_last_response_token():
    logprobs = t([[-1, -2, -3], [-1, -1, 0]])
    ref_logprobs = t([[-1.5, -2, -2], [-2, -1, -7]])
    rewards = kl_penalty_rewards(logprobs, ref_logprobs, t([10, 20]), t([[1, 1, 1], [1, 1, 0]]), kl_coef=0.1)
    # row 0: kl = [0.5, 0, -1]; row 1: kl = [1, 0] and the last position is padding
    assert rewards.tolist() == [pytest.approx([-0.05, 0.0, 10.1]), pytest.approx([-0.1, 20.0, 0.0])]


def test_last_token_index():
    assert last_token_index(t([[1, 1, 1], [1, 0, 0], [1, 1, 0]])).tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match="at least one"):
        last_token_index(t([[1, 0], [0, 0]]))


def test_leave_one_out_baseline_by_hand():
    rewards = t([1, 2, 3, 10, 10, 40])  # prompt 0: samples 0-2, prompt 1: samples 3-5
    # prompt 0 baselines: (2+3)/2, (1+3)/2, (1+2)/2; prompt 1: (10+40)/2, (10+40)/2, (10+10)/2
    assert leave_one_out_baseline(rewards, k=3).tolist() == pytest.approx([-1.5, 0.0, 1.5, -15.0, -15.0, 30.0])
    assert leave_one_out_baseline(t([3, 1]), k=2).tolist() == pytest.approx([2.0, -2.0])
    with pytest.raises(ValueError, match="k >= 2"):
        leave_one_out_baseline(rewards, k=1)
    with pytest.raises(ValueError, match="num_prompts \\* k"):
        leave_one_out_baseline(rewards, k=4)


def test_leave_one_out_layout_is_trl_rloo_grouping():
    """TRL's RLOOTrainer samples with RepeatSampler: the k generations of a prompt are consecutive."""
    from trl.trainer.utils import RepeatSampler

    order = list(RepeatSampler(["p0", "p1"], mini_repeat_count=3, batch_size=2, shuffle=False))
    assert order == [0, 0, 0, 1, 1, 1]
    prompt_reward = {0: torch.tensor([1.0, 2.0, 3.0]), 1: torch.tensor([10.0, 10.0, 40.0])}
    seen = {0: 0, 1: 0}
    rewards = []
    for prompt in order:
        rewards.append(prompt_reward[prompt][seen[prompt]])
        seen[prompt] += 1
    assert leave_one_out_baseline(torch.stack(rewards), k=3).tolist() == pytest.approx(
        [-1.5, 0.0, 1.5, -15.0, -15.0, 30.0]
    )


def test_entropy_and_logprobs_from_logits():
    assert entropy_from_logits(t([[0, 0, 0, 0]])).tolist() == pytest.approx([math.log(4)])
    skewed = entropy_from_logits(t([math.log(0.25), math.log(0.75)])).item()
    assert skewed == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    logits = t([[[math.log(0.2), math.log(0.8)], [0.0, 0.0]]])
    expected = [math.log(0.8), math.log(0.5)]
    assert logprobs_from_logits(logits, torch.tensor([[1, 0]])).tolist() == [pytest.approx(expected)]


def test_explained_variance():
    targets, mask = t([[1, 2, 3, 50]]), t([[1, 1, 1, 0]])
    assert explained_variance(targets, targets, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(targets, 2.0), targets, mask) == pytest.approx(0.0)
    # residuals [2, 0, -2] (variance 8/3) against the targets' variance 2/3: 1 - 4
    assert explained_variance(t([[-1, 2, 5, 0]]), targets, mask) == pytest.approx(-3.0)
    assert math.isnan(explained_variance(t([1, 2]), t([3, 3])))
