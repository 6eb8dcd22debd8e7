"""Direct Preference Optimization (TRL ``DPOTrainer``) on preference pairs.

With LoRA (the default) no second model is loaded: the policy with its adapter disabled is
the reference. With full fine-tuning a frozen copy of ``config.model`` is the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from alignment_pipelines.methods.config import (MemoryProfile, MethodConfig, answers_only_option, option,
                                                precompute_option)
from alignment_pipelines.methods.data import load_pairs, to_preference_dataset
from alignment_pipelines.methods.memory import precomputes_reference
from alignment_pipelines.methods.training import Datasets, TRLMethod

# Loss types TRL 1.16's DPOTrainer accepts.
DPOLoss = Literal["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]


@dataclass
class DPOMethodConfig(MethodConfig):
    beta: float = option(0.1, "strength of the KL constraint to the reference (higher: stay closer)",
                         minimum=0, exclusive_minimum=True)
    loss_type: DPOLoss = option("sigmoid", "DPO loss variant (sigmoid is the paper's)")
    label_smoothing: float = option(0.0, "assumed share of flipped labels (robust / cDPO)", minimum=0, maximum=0.5,
                                    exclusive_maximum=True)
    precompute_ref_log_probs: bool = precompute_option()
    score_answers_only: bool = answers_only_option()

    memory_profile: ClassVar[MemoryProfile] = MemoryProfile(sequences_per_example=2, reference=True)


class DPO(TRLMethod):
    name = "dpo"
    needs_reference = True

    def datasets(self, config: DPOMethodConfig) -> Datasets:
        return Datasets(to_preference_dataset(load_pairs(config.data)),
                        to_preference_dataset(load_pairs(config.eval_data, field="eval_data")) if config.eval_data else None)

    def trl_classes(self):
        from trl import DPOConfig, DPOTrainer

        return DPOConfig, DPOTrainer

    def trl_args(self, config: DPOMethodConfig, data: Datasets) -> dict:
        # TRL 1.16's DPO has no padding-free mode (it falls back to padding) and no use_logits_to_keep: its chunked
        # LM head already scores the answer positions without materialising the logits
        return {"max_length": config.max_length, "beta": config.beta, "loss_type": [config.loss_type],
                "label_smoothing": config.label_smoothing, "trust_remote_code": config.trust_remote_code,
                "precompute_ref_log_probs": precomputes_reference(config)}


train = DPO().train
