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
6. ``ppo_epochs`` passes over shuffled minibatches of ``mini_batch_size`` completions, each an optimizer step
   on ``clipped policy loss + vf_coef * clipped value loss``.

Models in memory:

- policy: a transformers causal LM (full fine-tuning) or a ``peft.PeftModel`` (LoRA);
- reference: with a ``PeftModel`` and no ``ref_policy``, the same model with its adapter disabled (PERL: memory
  stays close to one model); otherwise ``ref_policy``, or a frozen copy of the policy made at construction;
- critic: with ``value_model`` (a ``AutoModelForSequenceClassification(num_labels=1)``-style model, usually
  initialised from the reward model), its score head applied to every position's last hidden state, as TRL's
  old PPO did; it must share the policy's tokenizer and device. Without ``value_model``, a linear value head on the
  policy's last hidden state, owned by the trainer: the critic then shares the policy's trunk (its gradients
  reach the policy's trainable weights, the LoRA adapter with LoRA), which costs no extra model;
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
``learning_rate``              after the step's last optimizer step
``episode`` / ``epoch``        completions sampled so far / passes over the prompts so far
=============================  ====================================================================
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alignment_pipelines.methods.rewards import prompt_messages
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

POLICY_WEIGHTS_FILE = "policy_trainable.safetensors"
VALUE_WEIGHTS_FILE = "value_trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_STATE_FILE = "rng_state.pth"
TRAINER_STATE_FILE = "trainer_state.json"
CHECKPOINT_PREFIX = "checkpoint-"


@dataclass
class PPOTrainingArguments:
    """Hyperparameters of :class:`PPOTrainer`. The PPO defaults (epochs, clip ranges, ``kl_coef``, ``vf_coef``,
    ``gamma``, ``lam``, whitening) are those of TRL's former ``PPOConfig``."""

    learning_rate: float = field(default=1e-5, metadata={"help": "AdamW learning rate for the policy and the critic."})
    per_device_batch_size: int = field(
        default=8, metadata={"help": "Prompts per rollout batch (one completion each); one training step per batch."}
    )
    mini_batch_size: int = field(
        default=4,
        metadata={"help": "Completions per optimizer step; must divide per_device_batch_size."},
    )
    ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout batch before sampling the next."})
    kl_coef: float = field(
        default=0.05, metadata={"help": "Weight of the per-token KL penalty to the reference in the reward."}
    )
    clip_range: float = field(default=0.2, metadata={"help": "PPO clip range of the policy ratio (1 ± clip_range)."})
    clip_range_value: float = field(
        default=0.2, metadata={"help": "How far the critic's values may move from the rollout's values per batch."}
    )
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss in the total loss."})
    gamma: float = field(default=1.0, metadata={"help": "Discount factor over response tokens (1: no discount)."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda: bias (0) versus variance (1) of advantages."})
    whiten_advantages: bool = field(
        default=True, metadata={"help": "Normalise advantages to zero mean, unit variance per rollout batch."}
    )
    whiten_rewards: bool = field(
        default=False, metadata={"help": "Scale per-token rewards to unit variance (mean kept) before GAE."}
    )
    max_new_tokens: int = field(default=64, metadata={"help": "Longest completion sampled, in tokens."})
    temperature: float = field(
        default=1.0,
        metadata={
            "help": "Sampling temperature; log-probs use the same temperature so the samples stay on-policy. "
            "No top-k/top-p: truncated sampling would make the rollouts off-policy for PPO's ratio."
        },
    )
    missing_eos_penalty: float | None = field(
        default=None,
        metadata={"help": "Subtracted from the score of completions that never reach EOS; None: no penalty."},
    )
    reward_weights: list[float] | None = field(
        default=None,
        metadata={"help": "Weight of each reward function in the score (their weighted sum); None: all 1."},
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Recompute the policy's activations in the backward pass of each update: less memory, one "
                  "more forward pass. The policy then runs in training mode during updates, with dropout off."},
    )
    max_grad_norm: float | None = field(
        default=1.0, metadata={"help": "Clip the gradient norm of each optimizer step to this; None: no clipping."}
    )
    lr_scheduler_type: str = field(
        default="linear",
        metadata={"help": "transformers scheduler name ('linear', 'constant', 'cosine', ...), no warmup."},
    )
    max_steps: int = field(default=100, metadata={"help": "Number of rollout batches (training steps)."})
    seed: int = field(default=42, metadata={"help": "Seed of the prompt order, sampling and minibatch order."})
    logging_steps: int = field(default=1, metadata={"help": "Log the metrics of every n-th step."})
    checkpoint_dir: str | None = field(
        default=None, metadata={"help": "Folder for checkpoint-<step>/ folders; None: no checkpoints."}
    )
    save_steps: int = field(default=0, metadata={"help": "Write a checkpoint every n steps; 0: never."})
    save_total_limit: int | None = field(
        default=1,
        metadata={"help": "Keep the newest n checkpoints (older ones go once a newer one is complete); None: all."},
    )

    def __post_init__(self) -> None:
        positive_ints = ("per_device_batch_size", "mini_batch_size", "ppo_epochs", "max_new_tokens", "max_steps",
                         "logging_steps")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}={value!r}: must be a positive integer")
        if self.per_device_batch_size % self.mini_batch_size:
            raise ValueError(
                f"mini_batch_size={self.mini_batch_size!r}: must divide per_device_batch_size="
                f"{self.per_device_batch_size}"
            )
        for name in ("learning_rate", "clip_range", "clip_range_value", "temperature"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name}={value!r}: must be a positive finite number")
        for name in ("kl_coef", "vf_coef"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}={value!r}: must be a non-negative finite number")
        for name in ("gamma", "lam"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value!r}: must be in [0, 1]")
        if self.missing_eos_penalty is not None and not (
            math.isfinite(self.missing_eos_penalty) and self.missing_eos_penalty >= 0
        ):
            raise ValueError(f"missing_eos_penalty={self.missing_eos_penalty!r}: must be None or a non-negative number")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm={self.max_grad_norm!r}: must be None or positive")
        if not isinstance(self.save_steps, int) or self.save_steps < 0:
            raise ValueError(f"save_steps={self.save_steps!r}: must be a non-negative integer")
        if self.save_steps > 0 and not self.checkpoint_dir:
            raise ValueError(f"save_steps={self.save_steps}: needs checkpoint_dir")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ValueError(f"save_total_limit={self.save_total_limit!r}: must be None or at least 1")


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


def derived_seed(seed: int, index: int, purpose: str) -> int:
    """A seed for one (run seed, step or pass, purpose): distinct runs and steps never share a random stream."""
    digest = hashlib.sha256(f"{seed}:{index}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def is_peft_model(model: Any) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that training changes (LoRA weights with LoRA, all weights otherwise), by name, on CPU."""
    return {name: p.detach().cpu().contiguous() for name, p in module.named_parameters() if p.requires_grad}


def load_trainable_state(module: nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    saved = load_file(str(path))
    params = {name: p for name, p in module.named_parameters() if p.requires_grad}
    if set(saved) != set(params):
        missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise ValueError(
            f"checkpoint {path} does not match the model's trainable parameters "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}): was it written with another model or LoRA setup?"
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(saved[name])


def disable_dropout(model: nn.Module) -> None:
    """Zero every dropout of ``model``: ``nn.Dropout`` modules and attention modules' own dropout rate."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def checkpoint_step(path: Path) -> int | None:
    """The step of a complete checkpoint folder (its trainer_state.json is written last), else None."""
    try:
        return int(json.loads((path / TRAINER_STATE_FILE).read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def complete_checkpoints(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete ``checkpoint-<n>`` folder, oldest first."""
    if not checkpoint_dir.is_dir():
        return []
    found = []
    for child in checkpoint_dir.iterdir():
        if child.is_dir() and child.name.startswith(CHECKPOINT_PREFIX):
            step = checkpoint_step(child)
            if step is not None:
                found.append((step, child))
    return sorted(found)


class PPOTrainer:
    """PPO with a per-token KL penalty, GAE and clipped policy/value losses (see the module docstring).

    ``prompts`` are lists of chat messages (a plain string is one user turn). ``reward_fn`` is one reward
    function in TRL's convention, ``reward_fn(prompts=..., completions=list[str], **kwargs) -> list[float]``,
    or a list of them (their weighted sum, ``args.reward_weights``); they also receive ``completion_ids`` and
    ``trainer_state``. ``callbacks`` are ``transformers.TrainerCallback`` objects; they receive these
    arguments (not ``TrainingArguments``), so callbacks that read ``TrainingArguments`` fields do not fit.
    """

    def __init__(
        self,
        args: PPOTrainingArguments,
        policy: nn.Module,
        tokenizer: Any,
        prompts: Sequence[Any],
        reward_fn: Callable[..., list[float]] | Sequence[Callable[..., list[float]]],
        ref_policy: nn.Module | None = None,
        value_model: nn.Module | None = None,
        callbacks: Sequence[Any] | None = None,
    ):
        from transformers import TrainerControl, TrainerState, get_scheduler

        self.args = args
        self.policy = policy
        self.tokenizer = tokenizer
        self.callbacks = list(callbacks or [])
        self.device = next(policy.parameters()).device

        self.prompts = [prompt_messages(p) for p in prompts]
        if not self.prompts:
            raise ValueError("prompts is empty: PPO needs at least one prompt")
        self.prompt_token_ids = [self._tokenize_prompt(p) for p in self.prompts]

        self.reward_funcs = list(reward_fn) if isinstance(reward_fn, (list, tuple)) else [reward_fn]
        if not self.reward_funcs:
            raise ValueError("reward_fn is an empty list: give at least one reward function")
        weights = args.reward_weights if args.reward_weights is not None else [1.0] * len(self.reward_funcs)
        if len(weights) != len(self.reward_funcs):
            raise ValueError(
                f"reward_weights={weights!r}: needs one weight per reward function ({len(self.reward_funcs)})"
            )
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)
        self.reward_names = self._unique_reward_names()

        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs a pad token (models.loading.prepare_tokenizer sets one)")
        self.pad_token_id = tokenizer.pad_token_id
        self.eos_token_ids = self._eos_token_ids()

        self.uses_adapter_as_reference = ref_policy is None and is_peft_model(policy)
        if ref_policy is None and not self.uses_adapter_as_reference:
            ref_policy = copy.deepcopy(policy)
        if ref_policy is not None:
            ref_policy.requires_grad_(False)
            ref_policy.eval()
        self.ref_policy = ref_policy

        self.value_model = value_model
        if value_model is not None:
            value_model.eval()
            self.value_head = None
            critic_params = [p for p in value_model.parameters() if p.requires_grad]
        else:
            hidden_size = policy.config.get_text_config().hidden_size
            # Zero-initialised: the critic starts by predicting 0 everywhere instead of noise.
            self.value_head = nn.Linear(hidden_size, 1).to(self.device)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
            critic_params = list(self.value_head.parameters())
        policy.eval()
        if args.gradient_checkpointing:
            # transformers checkpoints only in training mode: updates run in it, so dropout must be off to keep
            # the ratio at exactly 1 on the first minibatch, as in eval mode
            disable_dropout(policy)
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

        self.trainable_params = [p for p in policy.parameters() if p.requires_grad] + critic_params
        self.optimizer = torch.optim.AdamW(self.trainable_params, lr=args.learning_rate)
        optimizer_steps_per_batch = args.ppo_epochs * (args.per_device_batch_size // args.mini_batch_size)
        self.lr_scheduler = get_scheduler(
            args.lr_scheduler_type,
            self.optimizer,
            num_warmup_steps=0,
            num_training_steps=args.max_steps * optimizer_steps_per_batch,
        )
        self.generation_config = self._sampling_config()

        self.state = TrainerState(
            max_steps=args.max_steps, logging_steps=args.logging_steps, save_steps=args.save_steps
        )
        self.control = TrainerControl()
        self.trained_tokens = 0  # non-padding tokens of every update's forward pass, in this process
        self._prompt_orders: dict[int, list[int]] = {}

    # ------------------------------------------------------------------ setup helpers

    def _tokenize_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # The chat template already holds the special tokens it needs (BOS, turn markers).
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _unique_reward_names(self) -> list[str]:
        names = [getattr(f, "__name__", type(f).__name__) for f in self.reward_funcs]
        return [name if names.count(name) == 1 else f"{name}_{i}" for i, name in enumerate(names)]

    def _eos_token_ids(self) -> list[int]:
        """Every token that ends a completion: the tokenizer's EOS and the model's generation EOS ids."""
        ids = {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        configured = getattr(getattr(self.policy, "generation_config", None), "eos_token_id", None)
        if configured is not None:
            ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
        if not ids:
            raise ValueError("neither the tokenizer nor the model's generation config names an EOS token")
        return sorted(ids)

    def _sampling_config(self):
        """Plain multinomial sampling at ``temperature``.

        ``generate`` fills every field left unset from the model's own generation config (SmolLM2's sets
        top_p, for one), so each field that reshapes the distribution is set to its neutral value here:
        PPO's ratio needs samples from exactly the distribution whose log-probs it computes.
        """
        from transformers import GenerationConfig

        return GenerationConfig(
            do_sample=True,
            max_new_tokens=self.args.max_new_tokens,
            temperature=self.args.temperature,
            top_k=0,
            top_p=1.0,
            min_p=0.0,
            typical_p=1.0,
            epsilon_cutoff=0.0,
            eta_cutoff=0.0,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            min_new_tokens=0,
            num_beams=1,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
        )

    # ------------------------------------------------------------------ rollout

    def _prompt_indices(self, step: int) -> list[int]:
        """The prompts of rollout batch ``step`` (1-based): consecutive slices of a fresh shuffle per pass."""
        batch = self.args.per_device_batch_size
        indices = []
        for position in range((step - 1) * batch, step * batch):
            epoch, offset = divmod(position, len(self.prompts))
            if epoch not in self._prompt_orders:
                generator = torch.Generator().manual_seed(derived_seed(self.args.seed, epoch, "prompt-order"))
                self._prompt_orders[epoch] = torch.randperm(len(self.prompts), generator=generator).tolist()
            indices.append(self._prompt_orders[epoch][offset])
        return indices

    def _left_pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            ids[row, width - len(sequence):] = torch.tensor(sequence, dtype=torch.long)
            mask[row, width - len(sequence):] = 1
        return ids.to(self.device), mask.to(self.device)

    def _forward(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, context_length: int,
        with_values: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Temperature-scaled logits predicting each response token, and (optionally) the critic's values.

        Position ``context_length - 1 + t`` predicts response token ``t``; the value there is the value of the
        state before that token is chosen.
        """
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
        use_value_head = with_values and self.value_head is not None
        outputs = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_hidden_states=use_value_head,
            use_cache=False,
        )
        logits = outputs.logits[:, context_length - 1 : -1].float() / self.args.temperature
        if not with_values:
            return logits, None
        if use_value_head:
            hidden = outputs.hidden_states[-1][:, context_length - 1 : -1].float()
            return logits, self.value_head(hidden).squeeze(-1)
        return logits, self._value_model_values(input_ids, attention_mask, position_ids, context_length)

    def _value_model_values(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, context_length: int
    ) -> torch.Tensor:
        """The value model's score head on every position's last hidden state (TRL's old ``get_reward``)."""
        model = self.value_model.get_base_model() if is_peft_model(self.value_model) else self.value_model
        backbone = getattr(model, model.base_model_prefix)
        hidden = backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        return model.score(hidden[:, context_length - 1 : -1]).squeeze(-1).float()

    def _reference_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, context_length: int):
        if self.uses_adapter_as_reference:
            with self.policy.disable_adapter():
                return self._forward(self.policy, input_ids, attention_mask, context_length, with_values=False)[0]
        return self._forward(self.ref_policy, input_ids, attention_mask, context_length, with_values=False)[0]

    def _score(self, prompts: list, completions: list[str], completion_ids: list[list[int]]):
        """Weighted sum of the reward functions (a ``None`` reward counts as absent) and each one's mean."""
        columns = []
        for func, name in zip(self.reward_funcs, self.reward_names):
            rewards = func(prompts=prompts, completions=completions, completion_ids=completion_ids,
                           trainer_state=self.state)
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
        indices = self._prompt_indices(step)
        prompts = [self.prompts[i] for i in indices]
        prompt_ids, prompt_mask = self._left_pad([self.prompt_token_ids[i] for i in indices])
        context_length = prompt_ids.size(1)

        sequences = self.policy.generate(
            input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=self.generation_config
        )
        response_ids = sequences[:, context_length:]
        is_eos = torch.isin(response_ids, torch.tensor(self.eos_token_ids, device=self.device))
        has_eos = is_eos.any(dim=1)
        length = response_ids.size(1)
        first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, length, dtype=torch.long))
        response_mask = (torch.arange(length, device=self.device)[None, :] <= first_eos[:, None]).long()
        response_ids = response_ids.masked_fill(response_mask == 0, self.pad_token_id)
        query_responses = torch.cat([prompt_ids, response_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, response_mask], dim=1)

        logprobs, ref_logprobs, values, entropy = [], [], [], []
        for start in range(0, len(indices), self.args.mini_batch_size):
            rows = slice(start, start + self.args.mini_batch_size)
            logits, chunk_values = self._forward(
                self.policy, query_responses[rows], attention_mask[rows], context_length, with_values=True
            )
            logprobs.append(logprobs_from_logits(logits, response_ids[rows]))
            entropy.append(entropy_from_logits(logits))
            values.append(chunk_values)
            ref_logits = self._reference_logits(query_responses[rows], attention_mask[rows], context_length)
            ref_logprobs.append(logprobs_from_logits(ref_logits, response_ids[rows]))

        completion_ids = [ids[mask.bool()].tolist() for ids, mask in zip(response_ids, response_mask)]
        completions = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        scores, reward_means = self._score(prompts, completions, completion_ids)
        if self.args.missing_eos_penalty is not None:
            scores = scores - self.args.missing_eos_penalty * (~has_eos).float()

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
        """``ppo_epochs`` passes of clipped policy + value updates over shuffled minibatches; mean statistics."""
        args = self.args
        context_length = rollout.query_responses.size(1) - rollout.response_ids.size(1)
        generator = torch.Generator().manual_seed(derived_seed(args.seed, step, "minibatch-order"))
        totals = {"policy_loss": 0.0, "value_loss": 0.0, "policy_clipfrac": 0.0, "value_clipfrac": 0.0,
                  "approx_kl": 0.0}
        updates = 0
        self.policy.train(args.gradient_checkpointing)
        for _ in range(args.ppo_epochs):
            order = torch.randperm(args.per_device_batch_size, generator=generator).to(self.device)
            for start in range(0, args.per_device_batch_size, args.mini_batch_size):
                rows = order[start : start + args.mini_batch_size]
                mask = rollout.response_mask[rows]
                logits, values = self._forward(
                    self.policy, rollout.query_responses[rows], rollout.attention_mask[rows], context_length,
                    with_values=True,
                )
                logprobs = logprobs_from_logits(logits, rollout.response_ids[rows]) * mask
                policy_loss, policy_clipfrac, approx_kl = clipped_policy_loss(
                    logprobs, rollout.logprobs[rows], advantages[rows], mask, args.clip_range
                )
                value_loss, value_clipfrac = clipped_value_loss(
                    values, rollout.values[rows], returns[rows], mask, args.clip_range_value
                )
                loss = policy_loss + args.vf_coef * value_loss
                loss.backward()
                self.trained_tokens += int(rollout.attention_mask[rows].sum())
                if args.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(self.trainable_params, args.max_grad_norm)
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)

                updates += 1
                totals["policy_loss"] += float(policy_loss.detach())
                totals["value_loss"] += float(value_loss.detach())
                totals["policy_clipfrac"] += float(policy_clipfrac)
                totals["value_clipfrac"] += float(value_clipfrac)
                totals["approx_kl"] += float(approx_kl)
        self.policy.eval()
        return {name: total / updates for name, total in totals.items()}

    def _training_step(self, step: int) -> dict[str, float]:
        """Sample, score and learn from one rollout batch; the step's metrics."""
        args = self.args
        torch.manual_seed(derived_seed(args.seed, step, "sampling"))
        rollout = self._rollout(step)
        mask = rollout.response_mask
        rewards = kl_penalty_rewards(rollout.logprobs, rollout.ref_logprobs, rollout.scores, mask, args.kl_coef)
        if args.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False) * mask
        advantages, returns = gae_advantages(rewards, rollout.values, mask, args.gamma, args.lam)
        if args.whiten_advantages:
            advantages = whiten(advantages, mask) * mask
        updates = self._ppo_updates(rollout, advantages, returns, step)

        sequence_kl = ((rollout.logprobs - rollout.ref_logprobs) * mask).sum(dim=1)
        non_score_reward = float((-args.kl_coef * sequence_kl).mean())
        scores = float(rollout.scores.mean())
        completions_seen = step * args.per_device_batch_size
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
            "loss": updates["policy_loss"] + args.vf_coef * updates["value_loss"],
            "val/clipfrac_avg": updates["value_clipfrac"],
            "val/explained_variance": explained_variance(rollout.values, returns, mask),
            "completions/mean_length": float(mask.sum(dim=1).float().mean()),
            "completions/clipped_ratio": float((~rollout.has_eos).float().mean()),
            "learning_rate": float(self.lr_scheduler.get_last_lr()[0]),
            "episode": completions_seen,
            "epoch": completions_seen / len(self.prompts),
        }

    # ------------------------------------------------------------------ the loop

    def _callback(self, event: str, **kwargs: Any) -> None:
        for callback in self.callbacks:
            result = getattr(callback, event)(
                self.args, self.state, self.control, model=self.policy, processing_class=self.tokenizer,
                optimizer=self.optimizer, lr_scheduler=self.lr_scheduler, **kwargs,
            )
            if result is not None:
                self.control = result

    def train(self, resume_from_checkpoint: str | os.PathLike | bool | None = None) -> None:
        """Run ``max_steps`` rollout batches; with ``resume_from_checkpoint`` (a ``checkpoint-<n>`` folder, or
        True for the newest complete one in ``checkpoint_dir``), continue after step ``n``."""
        if resume_from_checkpoint is True:
            found = complete_checkpoints(Path(self.args.checkpoint_dir or ""))
            if not found:
                raise ValueError(f"resume_from_checkpoint=True: no complete checkpoint in {self.args.checkpoint_dir!r}")
            resume_from_checkpoint = found[-1][1]
        if resume_from_checkpoint:
            self._load_checkpoint(Path(resume_from_checkpoint))

        self._callback("on_train_begin")
        for step in range(self.state.global_step + 1, self.args.max_steps + 1):
            self._callback("on_step_begin")
            metrics = self._training_step(step)
            self.state.global_step = step
            self.state.epoch = metrics["epoch"]
            self._callback("on_step_end")
            if step % self.args.logging_steps == 0:
                self.state.log_history.append({**metrics, "step": step})
                self._callback("on_log", logs=metrics)
            if self.args.save_steps and step % self.args.save_steps == 0:
                self._save_checkpoint(step)
                self._callback("on_save")
            if self.control.should_training_stop:
                break
        self._callback("on_train_end")

    # ------------------------------------------------------------------ checkpoints

    def _critic(self) -> nn.Module:
        return self.value_head if self.value_head is not None else self.value_model

    def _save_checkpoint(self, step: int) -> None:
        """Write ``checkpoint-<step>`` atomically: a hidden staging folder, ``trainer_state.json`` last, a rename."""
        from safetensors.torch import save_file

        root = Path(self.args.checkpoint_dir)
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f".{CHECKPOINT_PREFIX}*.tmp-*"):  # left by a run killed while saving
            shutil.rmtree(stale, ignore_errors=True)
        final = root / f"{CHECKPOINT_PREFIX}{step}"
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
        try:
            save_file(trainable_state(self.policy), str(staging / POLICY_WEIGHTS_FILE))
            save_file(trainable_state(self._critic()), str(staging / VALUE_WEIGHTS_FILE))
            torch.save(self.optimizer.state_dict(), staging / OPTIMIZER_FILE)
            torch.save(self.lr_scheduler.state_dict(), staging / SCHEDULER_FILE)
            torch.save(self._rng_state(), staging / RNG_STATE_FILE)
            self.state.save_to_json(str(staging / TRAINER_STATE_FILE))
            if final.exists():
                shutil.rmtree(final)
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if self.args.save_total_limit is not None:
            for _, older in complete_checkpoints(root)[: -self.args.save_total_limit]:
                shutil.rmtree(older, ignore_errors=True)

    def _load_checkpoint(self, path: Path) -> None:
        from transformers import TrainerState

        if checkpoint_step(path) is None:
            raise ValueError(f"{path} is not a complete checkpoint (no readable {TRAINER_STATE_FILE})")
        load_trainable_state(self.policy, path / POLICY_WEIGHTS_FILE)
        load_trainable_state(self._critic(), path / VALUE_WEIGHTS_FILE)
        self.optimizer.load_state_dict(torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True))
        self.lr_scheduler.load_state_dict(torch.load(path / SCHEDULER_FILE, weights_only=True))
        self._restore_rng_state(torch.load(path / RNG_STATE_FILE, weights_only=True))
        self.state = TrainerState.load_from_json(str(path / TRAINER_STATE_FILE))
        self.state.max_steps = self.args.max_steps

    @staticmethod
    def _rng_state() -> dict[str, Any]:
        state = {"python": random.getstate(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    @staticmethod
    def _restore_rng_state(state: dict[str, Any]) -> None:
        random.setstate(state["python"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
