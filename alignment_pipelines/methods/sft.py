"""Supervised fine-tuning on the chosen answers (TRL ``SFTTrainer``).

Input: preference pairs (only ``prompt`` and ``chosen`` are used). By default the loss is
on the answer tokens only (TRL's prompt-completion format); ``completion_only_loss=False``
trains on the whole conversation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from alignment_pipelines.methods.config import MethodConfig, answers_only_option, option
from alignment_pipelines.methods.data import load_pairs, to_sft_dataset
from alignment_pipelines.methods.training import Datasets, TRLMethod

@dataclass
class SFTMethodConfig(MethodConfig):
    learning_rate: float = option(2e-4, "peak learning rate (constant schedule)", minimum=0, exclusive_minimum=True)
    completion_only_loss: bool = option(True, "loss on the answer tokens only (false: on the whole conversation)")
    packing: bool = option(
        True, "pack whole examples into rows of max_length tokens (best fit; attention stays within each example): "
        "no compute or memory spent on padding. A row then holds several examples, so per_device_batch_size counts "
        "rows; an example longer than max_length is truncated as without packing")
    score_answers_only: bool = answers_only_option()

    required_columns: ClassVar[tuple[str, ...]] = ("prompt", "chosen")


class SFT(TRLMethod):
    name = "sft"

    def datasets(self, config: SFTMethodConfig) -> Datasets:
        def load(field):
            pairs = load_pairs(getattr(config, field), SFTMethodConfig.required_columns, field)
            return to_sft_dataset(pairs, config.completion_only_loss)

        return Datasets(load("data"), load("eval_data") if config.eval_data else None)

    def trl_classes(self):
        from trl import SFTConfig, SFTTrainer

        return SFTConfig, SFTTrainer

    def trl_args(self, config: SFTMethodConfig, data: Datasets) -> dict:
        return {"max_length": config.max_length, "completion_only_loss": config.completion_only_loss,
                "packing": config.packing, "packing_strategy": "bfd", "trust_remote_code": config.trust_remote_code}


train = SFT().train
