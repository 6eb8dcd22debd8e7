"""Direct Preference Optimization (TRL ``DPOTrainer``) on preference pairs.

With LoRA (the default) no second model is loaded: the policy with its adapter disabled is
the reference. With full fine-tuning a frozen copy of ``config.model`` is the reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from alignment_pipelines.methods.base import (
    ConfigError,
    StagingDir,
    TrainingConfig,
    TrainResult,
    common_args,
    load_model_and_tokenizer,
    load_pairs,
    quiet_progress,
    lora_config,
    reference_model,
    train_and_save,
    to_preference_dataset,
)

METHOD = "dpo"

# Loss types TRL 1.16's DPOTrainer accepts.
LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
    "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)


@dataclass
class DPOMethodConfig(TrainingConfig):
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0

    def _validate_method(self) -> None:
        if not isinstance(self.beta, (int, float)) or isinstance(self.beta, bool) or not math.isfinite(self.beta) \
                or self.beta <= 0:
            raise ConfigError("beta", self.beta, "must be a positive finite number")
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError("loss_type", self.loss_type, f"must be one of {list(LOSS_TYPES)}")
        ls = self.label_smoothing
        if not isinstance(ls, (int, float)) or isinstance(ls, bool) or not 0 <= ls < 0.5:
            raise ConfigError("label_smoothing", ls, "must be in [0, 0.5)")


def train(config: DPOMethodConfig, callbacks: list | None = None) -> TrainResult:
    """Train with DPO on ``config.data``; save the merged model to ``output_dir``."""
    config.validate()
    quiet_progress(config)
    from trl import DPOConfig, DPOTrainer

    train_ds = to_preference_dataset(load_pairs(config.data))
    eval_ds = to_preference_dataset(load_pairs(config.eval_data)) if config.eval_data else None
    model, tokenizer = load_model_and_tokenizer(config)
    peft_config = lora_config(config)
    ref_model = reference_model(config, peft_config, model.dtype)
    with StagingDir(config.output_dir) as staging:
        args = DPOConfig(
            **common_args(config, staging.trainer_dir),
            beta=float(config.beta),
            loss_type=[config.loss_type],
            label_smoothing=float(config.label_smoothing),
            trust_remote_code=config.trust_remote_code,
        )
        trainer = DPOTrainer(
            model=model,
            ref_model=ref_model,
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=list(callbacks or []),
        )
        return train_and_save(trainer, tokenizer, config, staging, METHOD, evaluate=eval_ds is not None)
