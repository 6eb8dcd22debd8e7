"""RLOO (TRL ``RLOOTrainer``) from the SFT model: ``num_generations`` answers per prompt, each one's baseline the
mean reward of the other k-1, the KL to the reference subtracted from the reward.

No critic: three models in full training (policy, reference, reward model), two with LoRA (PERL), where the
reference is the policy with its adapter disabled. The reward model keeps its own tokenizer
(``reward_processing_classes``); rule rewards come from ``rewards.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from alignment_pipelines.methods.config import ConfigError, MemoryProfile, option
from alignment_pipelines.methods.ppo import MODEL_REWARD, OnlineMethodConfig, fitting_prompts, load_reward_model
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
    """TRL's ``RLOOTrainer``, taking the full-training reference the platform loaded.

    TRL would load it from the policy's config path, which for a start model merged from an adapter chain (the SFT
    adapter on the base) names the root base model, not the start model.
    """
    from trl import RLOOTrainer
    from trl.trainer.utils import add_fused_lm_head

    class RLOOTrainerWithReference(RLOOTrainer):
        def __init__(self, *args, ref_model=None, **kwargs):
            if ref_model is None:  # LoRA (the disabled adapter is the reference) or no KL term
                super().__init__(*args, **kwargs)
                return
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
        if reward is not None:
            reward.config._name_or_path = "reward_model"  # TRL names its metrics after it, as PPO does
        return Models(policy=policy, tokenizer=tokenizer, reference=reference, reward=reward,
                      reward_tokenizer=reward_tokenizer)

    def trl_classes(self):
        from trl import RLOOConfig

        return RLOOConfig, trainer_class()

    def trl_args(self, config: RLOOMethodConfig, data: Datasets) -> dict:
        return {"num_generations": config.num_generations, "max_completion_length": config.max_new_tokens,
                "temperature": config.temperature, "beta": config.kl_coef,
                "normalize_advantages": config.normalize_advantages, "disable_dropout": True,
                "use_vllm": config.use_vllm, "vllm_mode": config.vllm_mode,
                "vllm_server_base_url": config.vllm_server_base_url, "trust_remote_code": config.trust_remote_code}

    def trainer_kwargs(self, config: RLOOMethodConfig, models: Models) -> dict:
        from alignment_pipelines.methods.rewards import build_reward_funcs

        funcs, tokenizers = [], []
        for entry in config.reward_funcs:
            if entry == MODEL_REWARD:  # TRL scores with the model itself, rendered by its own tokenizer
                funcs.append(models.reward)
                tokenizers.append(models.reward_tokenizer)
            else:
                funcs.extend(build_reward_funcs([entry]))
                tokenizers.append(None)
        return {"reward_funcs": funcs, "reward_processing_classes": tokenizers, "ref_model": models.reference}


train = RLOO().train
