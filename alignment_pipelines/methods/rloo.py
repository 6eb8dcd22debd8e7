"""RLOO (TRL ``RLOOTrainer``) from the SFT model: ``num_generations`` answers per prompt, each one's baseline the
mean reward of the other k-1, the KL to the reference subtracted from the reward.

No critic: three models in full training (policy, reference, reward model), two with LoRA (PERL), where the
reference is the policy with its adapter disabled. Every reward source is a function from ``rewards.py``, the reward
model too: TRL would score it on the chat template's rendering, which closes the assistant turn even when the answer
was cut off at ``max_new_tokens``; ours leaves a cut-off answer open, and ``missing_eos_penalty`` (which TRL's RLOO
lacks) is one more reward function. ``reward_weights`` weigh the sources as configured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from alignment_pipelines.methods.config import ConfigError, MemoryProfile, option
from alignment_pipelines.methods.ppo import OnlineMethodConfig, fitting_prompts, load_reward_model
from alignment_pipelines.methods.training import Datasets, Models, TRLMethod, load_frozen, load_start_model


@dataclass
class RLOOMethodConfig(OnlineMethodConfig):
    num_generations: int = option(4, "answers sampled per prompt (k); each one's baseline is the mean reward of the "
                                  "other k-1", minimum=2)
    normalize_advantages: bool = option(False, "scale the advantages of each step to zero mean, unit variance")
    vllm_mode: Literal["colocate", "server"] = option(
        "colocate", "with use_vllm: 'colocate' shares the training GPU, 'server' asks a `trl vllm-serve` on another "
        "GPU")
    vllm_server_base_url: str | None = option(None, "with vllm_mode 'server': its URL, e.g. http://10.0.0.2:8000")
    mask_truncated_completions: bool = option(
        False, "leave answers cut off at max_new_tokens (no EOS) out of the loss (DAPO): their rewards still set "
        "the other answers' baselines, but they are neither pushed up nor down, so missing_eos_penalty then acts "
        "only through the baselines")

    # a frozen reference in full training, and the reward model
    memory_profile: ClassVar[MemoryProfile] = MemoryProfile(reference=True, frozen_models=("reward_model",))

    def _validate_method(self) -> None:
        super()._validate_method()
        answers = self.per_device_batch_size * self.gradient_accumulation_steps
        if answers % self.num_generations:
            raise ConfigError("num_generations", self.num_generations,
                              f"must divide per_device_batch_size x gradient_accumulation_steps = {answers}: "
                              "a step holds whole groups of k answers")


def trainer_class():
    """TRL's ``RLOOTrainer``, taking the full-training reference the platform loaded, and the reward model that a
    reward function scores with, which it moves to its device.

    TRL would load the reference from the policy's config path, which for a start model merged from an adapter chain
    (the SFT adapter on the base) names the root base model, not the start model.
    """
    from trl import RLOOTrainer
    from trl.trainer.utils import add_fused_lm_head

    class RLOOTrainerWithReference(RLOOTrainer):
        def __init__(self, *args, ref_model=None, reward_model=None, **kwargs):
            if ref_model is None:  # LoRA (the disabled adapter is the reference) or no KL term
                super().__init__(*args, **kwargs)
            else:
                self._init_with_reference(ref_model, *args, **kwargs)
            if reward_model is not None:  # scored by a reward function, which TRL does not place: put it beside us
                reward_model.to(self.accelerator.device)

        def _init_with_reference(self, ref_model, *args, **kwargs):
            trl_args = kwargs["args"]
            beta, trl_args.beta = trl_args.beta, 0.0  # with beta 0 TRL loads no reference of its own
            try:
                super().__init__(*args, **kwargs)
            finally:
                trl_args.beta = beta
            self.beta = beta
            add_fused_lm_head(ref_model, temperature=self.temperature)  # as TRL prepares its own reference
            self.ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)

    return RLOOTrainerWithReference


class RLOO(TRLMethod):
    name = "rloo"

    def datasets(self, config: RLOOMethodConfig) -> Datasets:
        """The prompts only: the evaluation asset measures every policy, so no eval split is sampled here."""
        from alignment_pipelines.methods.data import to_prompt_dataset
        from alignment_pipelines.models.loading import load_tokenizer

        prompts, metrics = fitting_prompts(config, load_tokenizer(config.model))
        return Datasets(to_prompt_dataset(prompts), None, metrics)

    def load_models(self, config: RLOOMethodConfig) -> Models:
        policy, tokenizer = load_start_model(config, self.role)
        reference = None
        if not config.lora and config.kl_coef > 0:
            reference, _ = load_frozen(config.model, self.role, config)
        reward, reward_tokenizer = load_reward_model(config)
        return Models(policy=policy, tokenizer=tokenizer, reference=reference, reward=reward,
                      reward_tokenizer=reward_tokenizer)

    def trl_classes(self):
        from trl import RLOOConfig

        return RLOOConfig, trainer_class()

    def trl_args(self, config: RLOOMethodConfig, data: Datasets) -> dict:
        return {"num_generations": config.num_generations, "max_completion_length": config.max_new_tokens,
                "temperature": config.temperature, "beta": config.kl_coef,
                "normalize_advantages": config.normalize_advantages, "disable_dropout": True,
                "reward_weights": reward_weights(config),
                "mask_truncated_completions": config.mask_truncated_completions,
                "use_vllm": config.use_vllm, "vllm_mode": config.vllm_mode,
                "vllm_server_base_url": config.vllm_server_base_url, "trust_remote_code": config.trust_remote_code}

    def trainer_kwargs(self, config: RLOOMethodConfig, models: Models) -> dict:
        from alignment_pipelines.methods.own_loop import eos_token_ids
        from alignment_pipelines.methods.rewards import build_reward_funcs, missing_eos_reward

        ends = eos_token_ids(models.tokenizer, models.policy)
        funcs = build_reward_funcs(config.reward_funcs, models.reward, models.reward_tokenizer,
                                   config.per_device_batch_size, ends)
        if config.missing_eos_penalty is not None:
            funcs.append(missing_eos_reward(config.missing_eos_penalty, ends))
        return {"reward_funcs": funcs, "ref_model": models.reference, "reward_model": models.reward}


def reward_weights(config: RLOOMethodConfig) -> list[float] | None:
    """TRL's weights, one per reward function: ``reward_weights`` (else 1 each) for the configured sources, then 1
    for the missing-EOS penalty when it is on (its size is the penalty itself)."""
    if config.missing_eos_penalty is None:
        return config.reward_weights
    return list(config.reward_weights or [1.0] * len(config.reward_funcs)) + [1.0]


train = RLOO().train
