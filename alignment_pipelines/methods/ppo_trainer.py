"""The project's PPO trainer for RLHF, in the shape of TRL's former ``PPOTrainer`` (removed from TRL in 2026).

One training step is one rollout batch:

1. take ``per_device_batch_size`` prompts (a fresh shuffle of all prompts per pass, from ``seed``);
2. sample one completion per prompt from the current policy with HF ``generate`` (chat template, left padding),
   cutting each completion after its first EOS;
3. score the completions with the reward function(s); subtract ``missing_eos_penalty`` from completions
   that never reached EOS;
4. compute, without gradients, the rollout's log-probs, the reference's log-probs and the critic's values;
5. per-token rewards = ``-kl_coef * (logp - ref_logp)`` plus the score at the last response token;
   GAE advantages and returns; whitening;
6. ``ppo_epochs`` passes over shuffled minibatches of ``per_device_batch_size / num_mini_batches`` completions,
   each an optimizer step on ``clipped policy loss + vf_coef * clipped value loss`` (the policy's and the critic's
   gradient norms each clipped to ``max_grad_norm``).

Sampling, the EOS cut, log-probs, the reference, the loop and checkpoints come from ``own_loop.py``, which online
DPO shares.

Models in memory:

- policy: a transformers causal LM (full fine-tuning) or a ``peft.PeftModel`` (LoRA);
- reference: with a ``PeftModel`` and no ``ref_policy``, the same model with its adapter disabled (PERL: memory
  stays close to one model); otherwise ``ref_policy``, or a frozen copy of the policy made at construction;
- critic: ``value_model``, a ``AutoModelForSequenceClassification(num_labels=1)``-style model (``ppo.py`` starts it
  from the reward model, as TRL does, or from the start model with ``value_model_start``, with its own LoRA
  adapter when the policy has one), its score head applied to every position's last hidden state. It is a
  separate module in its own optimizer group at ``value_learning_rate``: the value loss never reaches the policy's
  weights. The first ``value_warmup_steps`` steps train the critic alone, so the advantages of the first policy
  updates come from values that fit;
- rewards: whatever the reward functions hold (e.g. a reward model, see ``rewards.py``).

Log-probs of the policy and of the reference are taken at the sampling temperature, as TRL's old PPO did.
All models run in eval mode, also while training: dropout would make the log-probs of the update differ from
those of the rollout for reasons other than the update, and PPO's ratio must start at exactly 1. (With
``gradient_checkpointing``, which transformers applies only in training mode, the policy's updates run in training
mode with every dropout set to 0, which computes the same.)

Determinism and resuming: every step seeds torch from ``(seed, step)`` before sampling and shuffles minibatches
with a generator from the same seed, so a run resumed from ``checkpoint-<n>`` repeats the steps ``n+1, ...``
of an uninterrupted run with the same arguments.

Metrics (one dict per logged step, in ``state.log_history`` and to each callback's ``on_log``):

=============================  ====================================================================
``objective/scores``           mean sequence score (weighted reward sum, after the missing-EOS penalty)
``objective/kl``               mean per-sequence KL to the reference (sum over tokens of logp - ref_logp)
``objective/non_score_reward`` mean per-sequence KL penalty, ``-kl_coef * kl``
``objective/rlhf_reward``      ``scores + non_score_reward``: what PPO maximises
``objective/entropy``          mean per-token entropy of the policy on the rollout
``rewards/<name>/mean``        mean of each reward function before weighting
``policy/approxkl_avg``        mean ``0.5 * (logp - old_logp)^2`` over all minibatches of the step
``policy/clipfrac_avg``        share of tokens where the policy ratio was clipped
``loss/policy_avg``            mean clipped policy loss
``loss/value_avg``             mean clipped value loss
``loss``                       what the updates minimised: ``loss/policy_avg + vf_coef * loss/value_avg``
``val/clipfrac_avg``           share of tokens where the value was clipped
``val/explained_variance``     how much of the returns' variance the rollout's values explain
``completions/mean_length``    mean number of completion tokens (EOS included)
``completions/clipped_ratio``  share of completions that hit ``max_new_tokens`` without EOS
``learning_rate``              the policy's, after the step's last optimizer step
``episode`` / ``epoch``        completions sampled so far / passes over the prompts so far
=============================  ====================================================================
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from alignment_pipelines.methods.own_loop import (
    OwnLoop,
    PromptOrder,
    answer_logits,
    chat_prompt_ids,
    clip_and_step,
    cut_after_eos,
    derived_seed,
    disable_dropout,
    eos_token_ids,
    is_peft_model,
    left_pad,
    reference_model,
    sampling_config,
    warmup_scheduler,
)
from alignment_pipelines.methods.rl_math import (
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    explained_variance,
    gae_advantages,
    kl_penalty_rewards,
    logprobs_from_logits,
    masked_mean,
    whiten,
)


@dataclass
class Rollout:
    """One batch of sampled completions and everything computed on it without gradients."""

    query_responses: torch.Tensor  # [B, P+T] left-padded prompt, then the response (pad after EOS)
    attention_mask: torch.Tensor  # [B, P+T]
    response_ids: torch.Tensor  # [B, T]
    response_mask: torch.Tensor  # [B, T] 1 up to and including the first EOS
    logprobs: torch.Tensor  # [B, T] log-probs of the sampled tokens under the rollout policy
    ref_logprobs: torch.Tensor  # [B, T]
    values: torch.Tensor  # [B, T] the critic's value before each response token
    entropy: torch.Tensor  # [B, T]
    scores: torch.Tensor  # [B] sequence scores after the missing-EOS penalty
    reward_means: dict[str, float]  # mean of each reward function, before weighting
    has_eos: torch.Tensor  # [B] bool


def critic_values(value_model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  context_length: int) -> torch.Tensor:
    """The critic's score head on the last hidden state before each response token (TRL's old ``get_reward``)."""
    model = value_model.get_base_model() if is_peft_model(value_model) else value_model
    backbone = getattr(model, model.base_model_prefix)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    hidden = backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    return model.score(hidden[:, context_length - 1 : -1]).squeeze(-1).float()


class PPOTrainer(OwnLoop):
    """PPO with a per-token KL penalty, GAE and clipped policy/value losses (see the module docstring).

    ``config`` is a ``PPOMethodConfig`` (its hyperparameters; not validated here, ``ppo.train`` does). ``prompts``
    are lists of chat messages (a plain string is one user turn), each short enough to leave ``max_new_tokens`` of
    room (``ppo.fitting_prompts``). ``reward_fn`` is one reward function in TRL's convention,
    ``reward_fn(prompts=..., completions=list[str], **kwargs) -> list[float]``, or a list of them (their weighted
    sum, ``config.reward_weights``); they also receive ``completion_ids``, ``finished`` (which answers ended, by the
    policy's end ids) and ``trainer_state``. ``callbacks`` are ``transformers.TrainerCallback`` objects; they
    receive the method config as their ``args``.
    """

    def __init__(
        self,
        config: Any,
        policy: nn.Module,
        tokenizer: Any,
        prompts: Sequence[Any],
        reward_fn: Callable[..., list[float]] | Sequence[Callable[..., list[float]]],
        value_model: nn.Module,
        ref_policy: nn.Module | None = None,
        callbacks: Sequence[Any] | None = None,
    ):
        self.config = config
        self.policy = policy
        self.tokenizer = tokenizer
        self.device = next(policy.parameters()).device
        self.mini_batch_size = config.per_device_batch_size // config.num_mini_batches

        self.prompts = list(prompts)
        self.prompt_order = PromptOrder(len(self.prompts), config.seed)
        self.prompt_token_ids = chat_prompt_ids(tokenizer, self.prompts, config.max_length, config.max_new_tokens)

        self.reward_funcs = list(reward_fn) if isinstance(reward_fn, (list, tuple)) else [reward_fn]
        if not self.reward_funcs:
            raise ValueError("reward_fn is an empty list: give at least one reward function")
        weights = config.reward_weights if config.reward_weights is not None else [1.0] * len(self.reward_funcs)
        if len(weights) != len(self.reward_funcs):
            raise ValueError(
                f"reward_weights={weights!r}: needs one weight per reward function ({len(self.reward_funcs)})"
            )
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)
        self.reward_names = self._unique_reward_names()

        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs a pad token (models.loading.prepare_tokenizer sets one)")
        self.pad_token_id = tokenizer.pad_token_id
        self.eos_token_ids = eos_token_ids(tokenizer, policy)

        if ref_policy is None and not is_peft_model(policy):
            ref_policy = copy.deepcopy(policy)
        if ref_policy is not None:
            ref_policy.requires_grad_(False)
            ref_policy.eval()
        self.ref_policy = ref_policy

        self.value_model = value_model
        value_model.eval()
        disable_dropout(value_model)
        policy.eval()
        if config.gradient_checkpointing:
            # transformers checkpoints only in training mode: updates run in it, so dropout must be off to keep
            # the ratio at exactly 1 on the first minibatch, as in eval mode
            disable_dropout(policy)
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

        # two groups: the critic learns at its own rate, and each group's gradient is clipped on its own
        self.optimizer = torch.optim.AdamW([
            {"params": [p for p in policy.parameters() if p.requires_grad], "lr": config.learning_rate},
            {"params": [p for p in value_model.parameters() if p.requires_grad], "lr": config.value_learning_rate},
        ])
        self.lr_scheduler = warmup_scheduler(self.optimizer, warmup_steps=0)
        self.generation_config = sampling_config(config.max_new_tokens, config.temperature, self.eos_token_ids,
                                                 self.pad_token_id)
        self.trained = {"policy": policy, "value": value_model}
        self._start_loop(callbacks)
        self.trained_tokens = 0  # non-padding tokens of every update's forward pass, in this process

    def _unique_reward_names(self) -> list[str]:
        names = [getattr(f, "__name__", type(f).__name__) for f in self.reward_funcs]
        return [name if names.count(name) == 1 else f"{name}_{i}" for i, name in enumerate(names)]

    # ------------------------------------------------------------------ rollout

    def _policy_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, context_length: int):
        """The policy's logits for each response token at the sampling temperature: the distribution sampled."""
        return answer_logits(self.policy, input_ids, attention_mask, context_length, self.config.temperature)[0]

    def _score(self, prompts: list, completions: list[str], completion_ids: list[list[int]], finished: list[bool]):
        """Weighted sum of the reward functions (a ``None`` reward counts as absent) and each one's mean. Each
        function is told which answers ended (``finished``, by the policy's own end ids), so the reward model need
        not guess it from its tokenizer's EOS."""
        columns = []
        for func, name in zip(self.reward_funcs, self.reward_names):
            rewards = func(prompts=prompts, completions=completions, completion_ids=completion_ids,
                           finished=finished, trainer_state=self.state)
            if len(rewards) != len(completions):
                raise ValueError(f"reward function {name!r} returned {len(rewards)} rewards for {len(completions)} "
                                 "completions; it must return one per completion")
            columns.append([math.nan if r is None else float(r) for r in rewards])
        per_func = torch.tensor(columns, dtype=torch.float32).T  # [B, n_funcs]
        scores = (per_func * self.reward_weights).nansum(dim=1)
        means = {name: float(per_func[:, i].nanmean()) for i, name in enumerate(self.reward_names)}
        return scores.to(self.device), means

    @torch.no_grad()
    def _rollout(self, step: int) -> Rollout:
        batch = self.config.per_device_batch_size
        indices = self.prompt_order.indices((step - 1) * batch, batch)
        prompts = [self.prompts[i] for i in indices]
        prompt_ids, prompt_mask = left_pad([self.prompt_token_ids[i] for i in indices], self.pad_token_id,
                                           self.device)
        context_length = prompt_ids.size(1)

        sequences = self.policy.generate(
            input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=self.generation_config
        )
        response_ids, response_mask, has_eos = cut_after_eos(sequences[:, context_length:], self.eos_token_ids,
                                                             self.pad_token_id)
        query_responses = torch.cat([prompt_ids, response_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, response_mask], dim=1)

        logprobs, ref_logprobs, values, entropy = [], [], [], []
        for start in range(0, len(indices), self.mini_batch_size):
            rows = slice(start, start + self.mini_batch_size)
            logits = self._policy_logits(query_responses[rows], attention_mask[rows], context_length)
            logprobs.append(logprobs_from_logits(logits, response_ids[rows]))
            entropy.append(entropy_from_logits(logits))
            values.append(critic_values(self.value_model, query_responses[rows], attention_mask[rows],
                                        context_length))
            with reference_model(self.policy, self.ref_policy) as reference:
                ref_logits = answer_logits(reference, query_responses[rows], attention_mask[rows], context_length,
                                           self.config.temperature)[0]
            ref_logprobs.append(logprobs_from_logits(ref_logits, response_ids[rows]))

        completion_ids = [ids[mask.bool()].tolist() for ids, mask in zip(response_ids, response_mask)]
        completions = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        scores, reward_means = self._score(prompts, completions, completion_ids, has_eos.tolist())
        if self.config.missing_eos_penalty is not None:
            scores = scores - self.config.missing_eos_penalty * (~has_eos).float()

        mask = response_mask.float()
        return Rollout(
            query_responses=query_responses,
            attention_mask=attention_mask,
            response_ids=response_ids,
            response_mask=response_mask,
            logprobs=torch.cat(logprobs) * mask,
            ref_logprobs=torch.cat(ref_logprobs) * mask,
            values=torch.cat(values) * mask,
            entropy=torch.cat(entropy),
            scores=scores,
            reward_means=reward_means,
            has_eos=has_eos,
        )

    # ------------------------------------------------------------------ optimisation

    def _ppo_updates(self, rollout: Rollout, advantages: torch.Tensor, returns: torch.Tensor, step: int):
        """``ppo_epochs`` passes of clipped policy and value updates over shuffled minibatches; mean statistics.
        During the value warm-up only the value loss has a gradient: the policy does not move."""
        config = self.config
        trains_policy = step > config.value_warmup_steps
        context_length = rollout.query_responses.size(1) - rollout.response_ids.size(1)
        generator = torch.Generator().manual_seed(derived_seed(config.seed, step, "minibatch-order"))
        totals = {"policy_loss": 0.0, "value_loss": 0.0, "policy_clipfrac": 0.0, "value_clipfrac": 0.0,
                  "approx_kl": 0.0}
        updates = 0
        self.policy.train(config.gradient_checkpointing)
        for _ in range(config.ppo_epochs):
            order = torch.randperm(config.per_device_batch_size, generator=generator).to(self.device)
            for start in range(0, config.per_device_batch_size, self.mini_batch_size):
                rows = order[start : start + self.mini_batch_size]
                mask = rollout.response_mask[rows]
                ids, attention = rollout.query_responses[rows], rollout.attention_mask[rows]
                with torch.set_grad_enabled(trains_policy):
                    logits = self._policy_logits(ids, attention, context_length)
                    logprobs = logprobs_from_logits(logits, rollout.response_ids[rows]) * mask
                    policy_loss, policy_clipfrac, approx_kl = clipped_policy_loss(
                        logprobs, rollout.logprobs[rows], advantages[rows], mask, config.clip_range
                    )
                values = critic_values(self.value_model, ids, attention, context_length)
                value_loss, value_clipfrac = clipped_value_loss(
                    values, rollout.values[rows], returns[rows], mask, config.clip_range_value
                )
                loss = config.vf_coef * value_loss + (policy_loss if trains_policy else 0.0)
                loss.backward()
                self.trained_tokens += int(attention.sum())
                clip_and_step(self.optimizer, self.lr_scheduler, config.max_grad_norm)

                updates += 1
                totals["policy_loss"] += float(policy_loss.detach())
                totals["value_loss"] += float(value_loss.detach())
                totals["policy_clipfrac"] += float(policy_clipfrac)
                totals["value_clipfrac"] += float(value_clipfrac)
                totals["approx_kl"] += float(approx_kl)
        self.policy.eval()
        return {name: total / updates for name, total in totals.items()}

    def training_step(self, step: int) -> dict[str, float]:
        """Sample, score and learn from one rollout batch; the step's metrics."""
        config = self.config
        torch.manual_seed(derived_seed(config.seed, step, "sampling"))
        rollout = self._rollout(step)
        mask = rollout.response_mask
        rewards = kl_penalty_rewards(rollout.logprobs, rollout.ref_logprobs, rollout.scores, mask, config.kl_coef)
        if config.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False) * mask
        advantages, returns = gae_advantages(rewards, rollout.values, mask, config.gamma, config.lam)
        advantages = whiten(advantages, mask) * mask
        updates = self._ppo_updates(rollout, advantages, returns, step)

        sequence_kl = ((rollout.logprobs - rollout.ref_logprobs) * mask).sum(dim=1)
        non_score_reward = float((-config.kl_coef * sequence_kl).mean())
        scores = float(rollout.scores.mean())
        completions_seen = step * config.per_device_batch_size
        return {
            "objective/scores": scores,
            "objective/kl": float(sequence_kl.mean()),
            "objective/non_score_reward": non_score_reward,
            "objective/rlhf_reward": scores + non_score_reward,
            "objective/entropy": float(masked_mean(rollout.entropy, mask)),
            **{f"rewards/{name}/mean": mean for name, mean in rollout.reward_means.items()},
            "policy/approxkl_avg": updates["approx_kl"],
            "policy/clipfrac_avg": updates["policy_clipfrac"],
            "loss/policy_avg": updates["policy_loss"],
            "loss/value_avg": updates["value_loss"],
            "loss": updates["policy_loss"] + config.vf_coef * updates["value_loss"],
            "val/clipfrac_avg": updates["value_clipfrac"],
            "val/explained_variance": explained_variance(rollout.values, returns, mask),
            "completions/mean_length": float(mask.sum(dim=1).float().mean()),
            "completions/clipped_ratio": float((~rollout.has_eos).float().mean()),
            "learning_rate": float(self.lr_scheduler.get_last_lr()[0]),
            "episode": completions_seen,
            "epoch": completions_seen / len(self.prompts),
        }
