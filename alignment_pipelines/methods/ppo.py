"""PPO (RLHF) from the SFT model, with the project's own trainer (``ppo_trainer.py``: TRL 1.16 has none).

Models by role:

- LoRA (PERL, the default): the policy is a LoRA adapter on the start model; the reference is the same model with
  its adapter disabled; the critic is a value model started from the reward model (as TRL does) with its own LoRA
  adapter and score head, trained at its own learning rate: three models in memory with the reward model (the
  critic's frozen trunk is the third).
- Full: the policy, a frozen copy of it as the reference, the reward model, and a value model started from the
  reward model, trainable: four models.

Without a reward model (rule rewards only), or when the reward model reads another vocabulary, the critic starts
from the start model with a zeroed score head. The critic is never the policy's own trunk: its loss would then move
the policy, and a head on a trunk tuned for the next token barely learns values.

This module also holds :class:`OnlineMethodConfig`, what every method that learns from rewards on fresh samples
shares (RLOO extends it): the reward sources, the KL weight and the generation settings.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar, Literal

from alignment_pipelines.methods import memory
from alignment_pipelines.methods.config import ConfigError, MemoryProfile, MethodConfig, option, wiring
from alignment_pipelines.methods.own_loop import max_grad_norm_option
from alignment_pipelines.methods.training import (
    StagingDir,
    TrainResult,
    finish,
    history_and_metrics,
    load_frozen,
    load_start_model,
    lora_config,
    memory_metrics,
    quiet_progress,
    save_trained,
    training_dtype,
)

MODEL_REWARD = "model"  # the reward_funcs entry that stands for the reward model
CriticStart = Literal["reward_model", "start_model"]


@dataclass
class OnlineMethodConfig(MethodConfig):
    """Reward sources and sampling, shared by the methods that learn from rewards on their own samples."""

    reward_model: str | None = wiring(
        "reward model folder (role reward): the 'model' reward source; full-training PPO also starts its value "
        "model from it", kind="model")
    reward_funcs: list[str] = option(
        [MODEL_REWARD], "reward sources, summed: 'model' (the reward model), 'length[:max_chars]' (shorter is "
        "better), 'regex:<pattern>' (1 when it matches), 'contains_code' (1 for a fenced code block)")
    kl_coef: float = option(0.05, "weight of the KL penalty to the reference in the reward (higher: stay closer)",
                            minimum=0)
    max_new_tokens: int = option(64, "longest sampled answer in tokens; prompts longer than max_length minus this "
                                 "are left out", minimum=1)
    reward_weights: list[float] | None = option(
        None, "weight of each reward_funcs entry in the summed score, in the same order; unset: every source "
        "weighs 1")
    missing_eos_penalty: float | None = option(
        1.0, "subtracted from the score of answers that stop at max_new_tokens without EOS, so a truncated "
        "answer never scores like a finished one (1.0: about one standard deviation of a reward model's "
        "scores, and the whole range of a 0/1 rule); unset: no penalty", minimum=0)
    temperature: float = option(1.0, "sampling temperature; log-probs use the same one, so samples stay on-policy",
                                minimum=0, exclusive_minimum=True)
    use_vllm: bool = option(False, "generate with vLLM (the gpu extra, on a GPU); off: transformers generate")

    required_columns: ClassVar[tuple[str, ...]] = ("prompt",)  # a pairs file serves as prompts too

    def _validate_method(self) -> None:
        from alignment_pipelines.methods.rewards import build_reward_funcs

        if not self.reward_funcs:
            raise ConfigError("reward_funcs", self.reward_funcs, "name at least one reward source")
        rules = [entry for entry in self.reward_funcs if entry != MODEL_REWARD]
        try:
            if rules:
                build_reward_funcs(rules)
        except ValueError as error:
            raise ConfigError("reward_funcs", self.reward_funcs, str(error)) from None
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ConfigError("reward_weights", self.reward_weights,
                              f"needs one weight per reward source: reward_funcs has {len(self.reward_funcs)} "
                              f"({self.reward_funcs})")
        if MODEL_REWARD in self.reward_funcs and not self.reward_model:
            raise ConfigError("reward_model", self.reward_model,
                              "is required while reward_funcs includes 'model' (or drop 'model' from reward_funcs)")
        if self.max_new_tokens >= self.max_length:
            raise ConfigError("max_new_tokens", self.max_new_tokens,
                              f"must be below max_length={self.max_length}, which holds prompt and answer")


def fitting_prompts(config: OnlineMethodConfig, tokenizer):
    """The training prompts (deduplicated) whose chat rendering leaves ``max_new_tokens`` of room within
    ``max_length``, and metrics saying how many were used and left out."""
    from alignment_pipelines.methods.data import load_prompts, rendered_prompt_lengths

    prompts = load_prompts(config.data)
    budget = config.max_length - config.max_new_tokens
    lengths = rendered_prompt_lengths(tokenizer, prompts["prompt"])
    fits = [length <= budget for length in lengths]
    if not any(fits):
        raise ConfigError("max_length", config.max_length, f"leaves no prompt room for max_new_tokens="
                          f"{config.max_new_tokens}: the shortest prompt has {min(lengths)} tokens")
    kept = prompts.loc[fits].reset_index(drop=True)
    return kept, {"prompts": float(len(kept)), "prompts_too_long": float(len(prompts) - len(kept))}


def load_reward_model(config: OnlineMethodConfig):
    """(reward model, its tokenizer), frozen, when reward_funcs names it; else (None, None)."""
    if MODEL_REWARD not in config.reward_funcs:
        return None, None
    return load_frozen(config.reward_model, "reward", config)


@dataclass
class PPOMethodConfig(OnlineMethodConfig):
    ppo_epochs: int = option(4, "passes over each rollout batch before sampling the next", minimum=1)
    num_mini_batches: int = option(1, "optimizer steps per pass: each rollout batch of per_device_batch_size "
                                   "answers is split into this many minibatches", minimum=1)
    clip_range: float = option(0.2, "clip range of the policy ratio (1 +- clip_range)", minimum=0,
                               exclusive_minimum=True)
    clip_range_value: float = option(0.2, "how far the critic's values may move from the rollout's per batch",
                                     minimum=0, exclusive_minimum=True)
    vf_coef: float = option(0.1, "weight of the value loss in the total loss", minimum=0)
    gamma: float = option(1.0, "discount over answer tokens (1: none)", minimum=0, maximum=1)
    lam: float = option(0.95, "GAE lambda: bias (0) against variance (1) of the advantages", minimum=0, maximum=1)
    whiten_rewards: bool = option(False, "scale per-token rewards to unit variance before GAE")
    value_learning_rate: float = option(
        5e-4, "the critic's learning rate (its own optimizer group): values must follow the returns faster than "
        "the policy moves", minimum=0, exclusive_minimum=True)
    value_model_start: CriticStart = option(
        "reward_model", "what the critic starts from: 'reward_model' (TRL's choice: a trunk and score head that "
        "already read answers) or 'start_model' (the policy's start weights with a zeroed score head: flat values "
        "at first, none of the reward model's token-to-token swings on a half-written answer to unlearn; it "
        "explained less of the returns on HH with SmolLM2, benchmarks/results/rlhf.md)")
    value_warmup_steps: int = option(
        0, "steps at the start that train the critic alone (the policy stays put), so the first policy updates "
        "see values that fit the returns", minimum=0)
    max_grad_norm: float = max_grad_norm_option()

    steps_only: ClassVar[bool] = True  # its own loop counts rollout steps: no epochs over the prompts
    # a frozen reference in full training; the trainer takes every logit of the answer tokens at once; the critic
    # is a trained copy of the reward model (of the start model without one)
    memory_profile: ClassVar[MemoryProfile] = MemoryProfile(
        reference=True, logits="full", frozen_models=("reward_model",), trained_copy_of="reward_model")

    def _validate_method(self) -> None:
        super()._validate_method()
        if self.per_device_batch_size % self.num_mini_batches:
            raise ConfigError("num_mini_batches", self.num_mini_batches,
                              f"must divide per_device_batch_size={self.per_device_batch_size}")
        if self.gradient_accumulation_steps != 1:
            raise ConfigError("gradient_accumulation_steps", self.gradient_accumulation_steps,
                              "must be 1 for PPO, which takes one optimizer step per minibatch (see num_mini_batches)")
        if self.use_vllm:
            raise ConfigError("use_vllm", True, "PPO samples with transformers generate for now; vLLM serves RLOO")
        if self.value_warmup_steps >= self.max_steps:
            raise ConfigError("value_warmup_steps", self.value_warmup_steps,
                              f"must be below max_steps={self.max_steps}: the policy would never be trained")


def value_model_for(config: PPOMethodConfig, tokenizer):
    """The critic: a sequence classifier whose score head gives every position's value, started from the reward
    model (TRL's choice: it already reads answers for quality), or from the start model with a zeroed head when
    ``value_model_start`` asks for it, there is no reward model, or it reads another vocabulary than the policy (the
    critic reads the policy's tokens). With LoRA it trains its own adapter and score head; otherwise every weight."""
    from alignment_pipelines.models.loading import load_tokenizer, load_weights

    source = config.reward_model if config.value_model_start == "reward_model" else None
    if not source or load_tokenizer(source).get_vocab() != tokenizer.get_vocab():
        source = config.model
    model = load_weights(source, "value", trust_remote_code=config.trust_remote_code, dtype=training_dtype())
    model.config.pad_token_id = tokenizer.pad_token_id
    if source == config.model:  # a fresh head: values start at 0 instead of noise
        for param in model.score.parameters():
            param.data.zero_()
    if config.lora:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(config, "value"))
    return model


def train(config: PPOMethodConfig, callbacks: list | None = None) -> TrainResult:
    """Load the prompts and models, run PPO (resuming from the newest checkpoint), save the policy, commit."""
    import torch
    from transformers import set_seed

    from alignment_pipelines.methods.checkpoints import prepare_resume
    from alignment_pipelines.methods.ppo_trainer import PPOTrainer
    from alignment_pipelines.methods.rewards import build_reward_funcs

    config.validate()
    estimate = memory.estimate(config, memory.machine().kind)
    quiet_progress(config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    policy, tokenizer = load_start_model(config, "policy")
    prompts, prompt_metrics = fitting_prompts(config, tokenizer)
    reward_model, reward_tokenizer = load_reward_model(config)
    set_seed(config.seed)  # LoRA's A matrices start random
    value_model = value_model_for(config, tokenizer)
    if config.lora:
        from peft import get_peft_model

        policy = get_peft_model(policy, lora_config(config, "policy"))
    for model in (policy, reward_model, value_model):
        if model is not None:
            model.to(device)
    reward_funcs = build_reward_funcs(config.reward_funcs, reward_model, reward_tokenizer,
                                      config.per_device_batch_size)
    trainer = PPOTrainer(config, policy, tokenizer, list(prompts["prompt"]), reward_funcs, value_model,
                         callbacks=callbacks)
    with StagingDir(config.output_dir) as staging:
        resume, resumed_step = prepare_resume(config)
        started = time.perf_counter()
        trainer.train(resume_from_checkpoint=resume)
        wall = time.perf_counter() - started
        history, metrics = history_and_metrics(trainer.state.log_history, trainer.state.global_step, resumed_step)
        metrics |= prompt_metrics | memory_metrics(estimate, trainer.trained_tokens, wall) | {
            "wall_seconds": wall,
            "samples_per_second": (trainer.state.global_step - resumed_step) * config.per_device_batch_size / wall}
        save_trained(trainer.policy, tokenizer, config, staging.model_dir, "policy", "ppo")
        return finish(TrainResult(method="ppo", output_dir=str(config.output_dir), metrics=metrics, history=history),
                      staging, config)
