"""Kahneman-Tversky Optimization (TRL ``KTOTrainer``) on binary feedback.

Data: one row per (prompt, completion) with a boolean ``label`` (True = desirable); see
:func:`~alignment_pipelines.methods.base.load_binary`. Both labels must occur. When the classes are
unbalanced, ``desirable_weight`` / ``undesirable_weight`` rescale their losses (the asset computes them
from the balance report so that the weighted classes are about 50/50).

Reference model: with LoRA (the default) no second model is loaded; TRL computes the reference
log-probs with the adapter disabled, i.e. the start (SFT) model. With full fine-tuning a frozen copy of
``config.model`` is loaded explicitly, as DPO does.

TRL 1.16 has KTO in its stable API (``from trl import KTOConfig, KTOTrainer``; the
``trl.experimental.kto`` path is a deprecated alias).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from alignment_pipelines.methods.base import (
    BINARY_COLUMNS,
    ConfigError,
    StagingDir,
    TrainingConfig,
    TrainResult,
    common_args,
    load_binary,
    load_model_and_tokenizer,
    lora_config,
    reference_model,
    quiet_progress,
    to_unpaired_dataset,
    train_and_save,
)

METHOD = "kto"

# Loss types TRL 1.16's KTOTrainer accepts.
LOSS_TYPES = ("kto", "apo_zero_unpaired")


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


@dataclass
class KTOMethodConfig(TrainingConfig):
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    loss_type: str = "kto"

    required_columns: ClassVar[tuple[str, ...]] = BINARY_COLUMNS

    def load_data(self, path):
        return load_binary(path)

    def _validate_method(self) -> None:
        for name in ("beta", "desirable_weight", "undesirable_weight"):
            if not _positive(getattr(self, name)):
                raise ConfigError(name, getattr(self, name), "must be a positive finite number")
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError("loss_type", self.loss_type, f"must be one of {list(LOSS_TYPES)}")
        if self.loss_type == "kto" and self.per_device_batch_size < 2:
            # TRL estimates the KL term from the other completions of the same batch
            raise ConfigError("per_device_batch_size", self.per_device_batch_size,
                              "must be at least 2 for loss_type 'kto' (the KL estimate uses the other rows of a batch)")


def _dataset(config: KTOMethodConfig, path: str):
    # TRL's KTO samples sequentially (the KL term pairs each row with its batch neighbour), so a file sorted by
    # label would give one-label batches: shuffle once, deterministically, so that a resumed run sees the same order.
    df = load_binary(path).sample(frac=1.0, random_state=config.seed).reset_index(drop=True)
    return to_unpaired_dataset(df)


def train(config: KTOMethodConfig, callbacks: list | None = None) -> TrainResult:
    """Train with KTO on ``config.data`` (binary feedback); save the merged model to ``output_dir``."""
    config.validate()
    quiet_progress(config)
    from trl import KTOConfig, KTOTrainer

    train_ds = _dataset(config, config.data)
    eval_ds = _dataset(config, config.eval_data) if config.eval_data else None
    model, tokenizer = load_model_and_tokenizer(config)
    peft_config = lora_config(config)
    ref_model = reference_model(config, peft_config, model.dtype)
    with StagingDir(config.output_dir) as staging:
        args = KTOConfig(
            **common_args(config, staging.trainer_dir),
            beta=float(config.beta),
            desirable_weight=float(config.desirable_weight),
            undesirable_weight=float(config.undesirable_weight),
            loss_type=config.loss_type,
            trust_remote_code=config.trust_remote_code,
        )
        trainer = KTOTrainer(
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
