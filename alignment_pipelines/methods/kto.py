"""Kahneman-Tversky Optimization (TRL ``KTOTrainer``) on binary feedback.

Data: one row per (prompt, completion) with a boolean ``label`` (True = desirable). Both labels must
occur. When the classes are unbalanced, ``desirable_weight`` / ``undesirable_weight`` rescale their
losses (the asset computes them from the balance report so that the weighted classes are about 50/50).
With LoRA the disabled adapter is the reference; in full a frozen copy of the start model is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from alignment_pipelines.methods.config import (ConfigError, MemoryProfile, MethodConfig, answers_only_option, option,
                                                precompute_option)
from alignment_pipelines.methods.data import BINARY_COLUMNS, load_binary, to_unpaired_dataset
from alignment_pipelines.methods.memory import precomputes_reference
from alignment_pipelines.methods.training import Datasets, TRLMethod


@dataclass
class KTOMethodConfig(MethodConfig):
    beta: float = option(0.1, "strength of the KL constraint to the reference", minimum=0, exclusive_minimum=True)
    desirable_weight: float | None = option(
        None, "loss weight of thumbs-up examples (unset: from the balance report, so classes weigh 50/50)",
        minimum=0, exclusive_minimum=True)
    undesirable_weight: float | None = option(
        None, "loss weight of thumbs-down examples (unset: from the balance report)", minimum=0,
        exclusive_minimum=True)
    loss_type: Literal["kto", "apo_zero_unpaired"] = option("kto", "KTO loss variant")
    precompute_ref_log_probs: bool = precompute_option()
    score_answers_only: bool = answers_only_option()

    required_columns: ClassVar[tuple[str, ...]] = BINARY_COLUMNS
    memory_profile: ClassVar[MemoryProfile] = MemoryProfile(reference=True)

    def _validate_method(self) -> None:
        if self.loss_type == "kto" and self.per_device_batch_size < 2:
            # TRL estimates the KL term from the other completions of the same batch
            raise ConfigError("per_device_batch_size", self.per_device_batch_size,
                              "must be at least 2 for loss_type 'kto' (the KL estimate uses the other rows of a batch)")

    def adapt_to_data(self, stats: dict) -> None:
        """Unset class weights come from the balance report, which brings the weighted classes to 50/50."""
        if self.desirable_weight is None:
            self.desirable_weight = float(stats.get("desirable_weight", 1.0))
        if self.undesirable_weight is None:
            self.undesirable_weight = float(stats.get("undesirable_weight", 1.0))


def _dataset(config: KTOMethodConfig, field: str):
    # TRL's KTO samples sequentially (the KL term pairs each row with its batch neighbour), so a file sorted by
    # label would give one-label batches: shuffle once, deterministically, so that a resumed run sees the same order.
    return to_unpaired_dataset(load_binary(getattr(config, field), field).sample(frac=1.0, random_state=config.seed).reset_index(drop=True))


class KTO(TRLMethod):
    name = "kto"
    needs_reference = True

    def datasets(self, config: KTOMethodConfig) -> Datasets:
        return Datasets(_dataset(config, "data"), _dataset(config, "eval_data") if config.eval_data else None)

    def trl_classes(self):
        from trl import KTOConfig, KTOTrainer

        return KTOConfig, KTOTrainer

    def trl_args(self, config: KTOMethodConfig, data: Datasets) -> dict:
        return {"max_length": config.max_length, "beta": config.beta, "loss_type": config.loss_type,
                "desirable_weight": config.desirable_weight or 1.0,
                "undesirable_weight": config.undesirable_weight or 1.0,
                "trust_remote_code": config.trust_remote_code,
                "precompute_ref_log_probs": precomputes_reference(config)}


train = KTO().train
