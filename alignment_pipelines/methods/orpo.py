"""Odds Ratio Preference Optimization (TRL ``trl.experimental.orpo.ORPOTrainer``) on preference pairs.

Reference-free: one model in memory, no SFT step (the registry says it starts from the base model).
Pairs whose chosen and rejected answers are equal after stripping whitespace, or where either is
empty, carry no preference and are removed before training; ``metrics["filtered_pairs"]`` says how
many. Data with nothing left is a :class:`ConfigError` at validation.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import pandas as pd

from alignment_pipelines.methods.base import (
    ConfigError,
    StagingDir,
    TrainingConfig,
    TrainResult,
    common_args,
    load_model_and_tokenizer,
    load_pairs,
    lora_config,
    quiet_progress,
    to_preference_dataset,
    train_and_save,
)

METHOD = "orpo"


def filter_pairs(df: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """(kept pairs, number removed): drop pairs with chosen == rejected (stripped) or an empty side."""
    chosen = df["chosen"].astype(str).str.strip()
    rejected = df["rejected"].astype(str).str.strip()
    keep = (chosen != rejected) & (chosen != "") & (rejected != "")
    return df[keep].reset_index(drop=True), int((~keep).sum())


def load_orpo_pairs(path: str | os.PathLike) -> tuple[pd.DataFrame, int]:
    df, removed = filter_pairs(load_pairs(path))
    if len(df) == 0:
        raise ConfigError("data", str(path), f"no usable pair left: all {removed} pair(s) have chosen == rejected"
                                              " or an empty answer")
    return df, removed


@dataclass
class ORPOMethodConfig(TrainingConfig):
    beta: float = 0.1  # λ in the ORPO paper: weight of the odds-ratio term next to the NLL on chosen answers

    def load_data(self, path):
        return load_orpo_pairs(path)[0]

    def _validate_method(self) -> None:
        b = self.beta
        if not isinstance(b, (int, float)) or isinstance(b, bool) or not math.isfinite(b) or b <= 0:
            raise ConfigError("beta", b, "must be a positive finite number")


def train(config: ORPOMethodConfig, callbacks: list | None = None) -> TrainResult:
    """Train with ORPO on ``config.data``; save the merged model to ``output_dir``."""
    config.validate()
    quiet_progress(config)
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    pairs, removed = load_orpo_pairs(config.data)
    train_ds = to_preference_dataset(pairs)
    eval_ds = to_preference_dataset(load_orpo_pairs(config.eval_data)[0]) if config.eval_data else None
    model, tokenizer = load_model_and_tokenizer(config)
    with StagingDir(config.output_dir) as staging:
        args = ORPOConfig(
            **common_args(config, staging.trainer_dir),
            beta=float(config.beta),
            trust_remote_code=config.trust_remote_code,
        )
        trainer = ORPOTrainer(
            model=model,
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=tokenizer,
            peft_config=lora_config(config),
            callbacks=list(callbacks or []),
        )
        return train_and_save(trainer, tokenizer, config, staging, METHOD, evaluate=eval_ds is not None,
                              extra_metrics={"filtered_pairs": float(removed), "train_pairs": float(len(pairs))})
