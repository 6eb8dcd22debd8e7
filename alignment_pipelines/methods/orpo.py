"""Odds Ratio Preference Optimization (TRL ``trl.experimental.orpo.ORPOTrainer``) on preference pairs.

Reference-free: one model in memory, no SFT step (the registry says it starts from the base model).
Pairs whose chosen and rejected answers are equal after stripping whitespace, or where either is
empty, carry no preference and are removed before training; ``metrics["filtered_pairs"]`` says how
many. Pairs whose prompt alone fills ``max_length`` are removed too (``pairs_too_long``): TRL's ORPO
keeps the whole prompt and cuts the answers, so such a pair has no answer token left, and its mean
log-probability, 0/0, turns the loss and then every weight into NaN. Data with nothing left is a
:class:`ConfigError`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

import pandas as pd

from alignment_pipelines.methods.config import ConfigError, MemoryProfile, MethodConfig, option
from alignment_pipelines.methods.data import load_pairs, rendered_prompt_lengths, to_preference_dataset
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


def drop_prompts_that_fill(pairs: pd.DataFrame, tokenizer, max_length: int, source) -> tuple[pd.DataFrame, int]:
    """(pairs whose chat-rendered prompt leaves room for an answer token within ``max_length``, number removed).

    The room counts the BOS token TRL may add in front."""
    fits = [length + 2 <= max_length for length in rendered_prompt_lengths(tokenizer, pairs["prompt"])]
    kept = pairs.loc[fits].reset_index(drop=True)
    if len(kept) == 0:
        raise ConfigError("max_length", max_length, f"every prompt of {source} fills max_length on its own, "
                          "leaving no answer token to train on; raise --max-length")
    return kept, len(pairs) - len(kept)


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
        from alignment_pipelines.models.loading import load_tokenizer

        pairs, removed = load_orpo_pairs(config.data)  # the data's own errors first, before any loading
        eval_pairs = load_orpo_pairs(config.eval_data, "eval_data")[0] if config.eval_data else None
        tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
        pairs, too_long = drop_prompts_that_fill(pairs, tokenizer, config.max_length, config.data)
        eval_ds = None
        if eval_pairs is not None:
            eval_pairs, _ = drop_prompts_that_fill(eval_pairs, tokenizer, config.max_length, config.eval_data)
            eval_ds = to_preference_dataset(eval_pairs)
        return Datasets(to_preference_dataset(pairs), eval_ds,
                        {"filtered_pairs": float(removed), "pairs_too_long": float(too_long),
                         "train_pairs": float(len(pairs))})

    def trl_classes(self):
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOConfig, ORPOTrainer

    def trl_args(self, config: ORPOMethodConfig, data: Datasets) -> dict:
        return {"max_length": config.max_length, "beta": config.beta, "trust_remote_code": config.trust_remote_code}


train = ORPO().train
