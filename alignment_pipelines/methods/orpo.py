"""Odds Ratio Preference Optimization (TRL ``trl.experimental.orpo.ORPOTrainer``) on preference pairs.

Reference-free: one model in memory, no SFT step (the registry says it starts from the base model).
Pairs whose chosen and rejected answers are equal after stripping whitespace, or where either is
empty, carry no preference and are removed before training; ``metrics["filtered_pairs"]`` says how
many. Data with nothing left is a :class:`ConfigError`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

import pandas as pd

from alignment_pipelines.methods.config import ConfigError, MemoryProfile, MethodConfig, option
from alignment_pipelines.methods.data import load_pairs, to_preference_dataset
from alignment_pipelines.methods.training import Datasets, TRLMethod


def filter_pairs(df: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """(kept pairs, number removed): drop pairs with chosen == rejected (stripped) or an empty side."""
    chosen = df["chosen"].astype(str).str.strip()
    rejected = df["rejected"].astype(str).str.strip()
    keep = (chosen != rejected) & (chosen != "") & (rejected != "")
    return df[keep].reset_index(drop=True), int((~keep).sum())


def load_orpo_pairs(path: str | os.PathLike, field: str = "data") -> tuple[pd.DataFrame, int]:
    df, removed = filter_pairs(load_pairs(path, field=field))
    if len(df) == 0:
        raise ConfigError(field, str(path), f"no usable pair left: all {removed} pair(s) have chosen == rejected"
                                              " or an empty answer")
    return df, removed


@dataclass
class ORPOMethodConfig(MethodConfig):
    learning_rate: float = option(1e-4, "peak learning rate (constant schedule)", minimum=0, exclusive_minimum=True)
    beta: float = option(0.1, "λ in the ORPO paper: weight of the odds-ratio term next to the NLL on chosen answers",
                         minimum=0, exclusive_minimum=True)

    # TRL's experimental ORPO computes every logit of chosen and rejected at once: often its peak
    memory_profile: ClassVar[MemoryProfile] = MemoryProfile(sequences_per_example=2, logits="full")


class ORPO(TRLMethod):
    name = "orpo"
    token_keys = ("chosen_input_ids", "rejected_input_ids")  # each includes the prompt

    def datasets(self, config: ORPOMethodConfig) -> Datasets:
        pairs, removed = load_orpo_pairs(config.data)
        eval_ds = to_preference_dataset(load_orpo_pairs(config.eval_data, "eval_data")[0]) if config.eval_data else None
        return Datasets(to_preference_dataset(pairs), eval_ds,
                        {"filtered_pairs": float(removed), "train_pairs": float(len(pairs))})

    def trl_classes(self):
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOConfig, ORPOTrainer

    def trl_args(self, config: ORPOMethodConfig, data: Datasets) -> dict:
        return {"max_length": config.max_length, "beta": config.beta, "trust_remote_code": config.trust_remote_code}


train = ORPO().train
