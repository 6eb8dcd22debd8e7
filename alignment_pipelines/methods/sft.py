"""Supervised fine-tuning on the chosen answers (TRL ``SFTTrainer``).

Input: preference pairs (only ``prompt`` and ``chosen`` are used). By default the loss is
on the answer tokens only (TRL's prompt-completion format); ``completion_only_loss=False``
trains on the whole conversation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

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
    train_and_save,
    to_sft_dataset,
)

METHOD = "sft"


@dataclass
class SFTMethodConfig(TrainingConfig):
    completion_only_loss: bool = True
    learning_rate: float = 2e-4

    required_columns: ClassVar[tuple[str, ...]] = ("prompt", "chosen")

    def _validate_method(self) -> None:
        if not isinstance(self.completion_only_loss, bool):
            raise ConfigError("completion_only_loss", self.completion_only_loss, "must be true or false")


def train(config: SFTMethodConfig, callbacks: list | None = None) -> TrainResult:
    """Fine-tune ``config.model`` on prompt → chosen answer; save the merged model to ``output_dir``."""
    config.validate()
    quiet_progress(config)
    from trl import SFTConfig, SFTTrainer

    train_ds = to_sft_dataset(load_pairs(config.data, SFTMethodConfig.required_columns), config.completion_only_loss)
    eval_ds = (
        to_sft_dataset(load_pairs(config.eval_data, SFTMethodConfig.required_columns), config.completion_only_loss)
        if config.eval_data
        else None
    )
    model, tokenizer = load_model_and_tokenizer(config)
    with StagingDir(config.output_dir) as staging:
        args = SFTConfig(
            **common_args(config, staging.trainer_dir),
            completion_only_loss=config.completion_only_loss,
            packing=False,
            trust_remote_code=config.trust_remote_code,
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=tokenizer,
            peft_config=lora_config(config),
            callbacks=list(callbacks or []),
        )
        return train_and_save(trainer, tokenizer, config, staging, METHOD, evaluate=eval_ds is not None)
