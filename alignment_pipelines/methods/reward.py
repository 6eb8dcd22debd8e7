"""A Bradley-Terry reward model (TRL ``RewardTrainer``) on preference pairs, started from the SFT model.

The start model loads as a sequence classifier with one label (role ``reward``): its trunk comes from the start
model, its score head is new (seeded by ``seed``). With LoRA the adapter's task type is ``SEQ_CLS``, which keeps
the score head trainable and saves it inside the adapter, so the adapter alone reloads to the same scores.

After training, the held-out pairs (the eval split, else the training pairs) are scored once more to
report what a reward model is for: how often it prefers the chosen answer (``pairwise_accuracy``), by how much
(``mean_margin``), and a picture of the chosen and rejected score distributions (``scores.png``). Like training,
the report keeps to pairs whose both conversations fit ``max_length`` tokens (``report_pairs_too_long`` counts
the others): a pair thousands of tokens long would cost more to score than the whole training run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from typing import ClassVar

from alignment_pipelines.methods.config import MemoryProfile, MethodConfig, option
from alignment_pipelines.methods.data import load_pairs, to_preference_dataset
from alignment_pipelines.methods.training import Datasets, Models, TRLMethod

SCORES_PLOT = "scores.png"
REPORT_PAIRS = 512  # at most this many pairs are scored for the report (the eval split is usually smaller)


@dataclass
class RewardMethodConfig(MethodConfig):
    learning_rate: float = option(1e-4, "peak learning rate (constant schedule)", minimum=0, exclusive_minimum=True)
    center_rewards_coefficient: float = option(
        0.01, "weight of a penalty on the mean score's square, which keeps scores centred on 0 so that rewards of "
        "different runs compare (Eisenstein et al. 2023); 0 turns it off", minimum=0)

    memory_profile: ClassVar[MemoryProfile] = MemoryProfile(sequences_per_example=2, logits="none")  # chosen + rejected


def pair_scores(model, tokenizer, pairs, batch_size: int = 8) -> tuple[list[float], list[float]]:
    """(chosen scores, rejected scores) of a conversational preference dataset, rendered as PPO and RLOO score."""
    from alignment_pipelines.methods.rewards import reward_model_reward

    score = reward_model_reward(model.eval(), tokenizer, batch_size)
    prompts = list(pairs["prompt"])
    return (score(prompts=prompts, completions=list(pairs["chosen"])),
            score(prompts=prompts, completions=list(pairs["rejected"])))


def fitting_pairs(pairs, tokenizer, max_length: int, limit: int = REPORT_PAIRS):
    """At most ``limit`` pairs whose chosen and rejected conversations both fit ``max_length`` tokens, shortest
    first (batches then hold similar lengths), and how many did not fit."""
    def length(prompt, answer) -> int:
        text = tokenizer.apply_chat_template(list(prompt) + list(answer), tokenize=False)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    lengths = [max(length(p, c), length(p, r)) for p, c, r in zip(pairs["prompt"], pairs["chosen"], pairs["rejected"])]
    fitting = sorted((n, i) for i, n in enumerate(lengths) if n <= max_length)
    return pairs.select([i for _, i in fitting[:limit]]), len(lengths) - len(fitting)


def pairwise_stats(chosen: list[float], rejected: list[float]) -> dict[str, float]:
    """Share of pairs whose chosen answer scores higher (a tie counts half, so a constant model scores 0.5) and
    the mean score margin."""
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    if not margins:  # no held-out pair fits max_length
        return {"report_pairs": 0.0}
    wins = sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins)
    return {"pairwise_accuracy": wins / len(margins), "mean_margin": sum(margins) / len(margins),
            "report_pairs": float(len(margins))}


class RewardModel(TRLMethod):
    name = "reward"
    role = "reward"

    def datasets(self, config: RewardMethodConfig) -> Datasets:
        return Datasets(to_preference_dataset(load_pairs(config.data)),
                        to_preference_dataset(load_pairs(config.eval_data, field="eval_data")) if config.eval_data else None)

    def load_models(self, config: RewardMethodConfig) -> Models:
        from transformers import set_seed

        set_seed(config.seed)  # the score head is new and random: the same seed gives the same start
        return super().load_models(config)

    def trl_classes(self):
        from trl import RewardConfig, RewardTrainer

        return RewardConfig, RewardTrainer

    def trl_args(self, config: RewardMethodConfig, data: Datasets) -> dict:
        return {"max_length": config.max_length, "trust_remote_code": config.trust_remote_code,
                "center_rewards_coefficient": config.center_rewards_coefficient or None}

    def report(self, trainer, models: Models, data: Datasets, folder: Path):
        from alignment_pipelines.evaluation.plots import score_histogram

        held_out, too_long = fitting_pairs(data.eval if data.eval is not None else data.train, models.tokenizer,
                                           trainer.args.max_length)
        model = trainer.accelerator.unwrap_model(trainer.model)
        chosen, rejected = pair_scores(model, models.tokenizer, held_out, trainer.args.per_device_eval_batch_size)
        split = "eval" if data.eval is not None else "train"
        score_histogram(chosen, rejected, title=f"Reward-model scores on {len(chosen)} {split} pairs",
                        path=folder / SCORES_PLOT)
        # TRL drops pairs longer than max_length from training; say how many
        metrics = pairwise_stats(chosen, rejected) | {"report_pairs_too_long": float(too_long),
                                                      "train_pairs_too_long": float(len(data.train) - len(trainer.train_dataset))}
        return metrics, {"score_distributions": SCORES_PLOT}


train = RewardModel().train
