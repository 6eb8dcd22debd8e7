"""A Bradley-Terry reward model (TRL ``RewardTrainer``) on preference pairs, started from the SFT model.

The start model loads as a sequence classifier with one label (role ``reward``): its trunk comes from the start
model, its score head is new (seeded by ``seed``). With LoRA the adapter's task type is ``SEQ_CLS``, which keeps
the score head trainable and saves it inside the adapter, so the adapter alone reloads to the same scores.

After training, the report scores pairs once more to say what a reward model is for: how often it prefers the
chosen answer (accuracy), by how much (mean margin), and a picture of the chosen and rejected score distributions
(``scores.png``). It scores the held-out pairs (the eval split: ``eval_accuracy``, ``eval_mean_margin``); without
one, the training pairs, under names that say so (``train_pairs_accuracy``, ``train_pairs_mean_margin``), never an
eval name. Every pair counts, long ones included: TRL 1.16 drops pairs longer than ``max_length`` from training
(``train_pairs_too_long`` counts them) rather than truncating them, but leaving them out of the report would measure
the model on the short pairs only, so the report keeps a long conversation's last ``max_length`` tokens (the
answer's end, which the model pools). A split of more than ``report_pairs`` pairs is sampled at random (seeded).
``<split>_pairs_scored``, ``_total``, ``_sampled`` and ``_truncated`` say what was scored.

The eval split goes to the report only, not to TRL's evaluation, which would drop the long pairs and report its
accuracy under the same ``eval_accuracy`` name.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from alignment_pipelines.methods.config import MemoryProfile, MethodConfig, option
from alignment_pipelines.methods.data import load_pairs, to_preference_dataset
from alignment_pipelines.methods.training import Datasets, Models, TRLMethod

SCORES_PLOT = "scores.png"


@dataclass
class RewardMethodConfig(MethodConfig):
    learning_rate: float = option(1e-4, "peak learning rate (constant schedule)", minimum=0, exclusive_minimum=True)
    center_rewards_coefficient: float = option(
        0.01, "weight of a penalty on the mean score's square, which keeps scores centred on 0 so that rewards of "
        "different runs compare (Eisenstein et al. 2023); 0 turns it off", minimum=0)
    report_pairs: int = option(
        2048, "most pairs the report scores after training: every pair of the eval split (else of the training "
        "pairs) when it has no more, otherwise a random sample of this many, drawn with seed", minimum=1)

    memory_profile: ClassVar[MemoryProfile] = MemoryProfile(sequences_per_example=2, logits="none")  # chosen + rejected


@dataclass
class ReportPairs:
    """The pairs the report scores and the names its metrics go under."""

    pairs: Any
    held_out: bool  # the eval split; else training pairs

    @property
    def stat_prefix(self) -> str:
        return "eval" if self.held_out else "train_pairs"

    @property
    def count_prefix(self) -> str:
        return "eval_pairs" if self.held_out else "train_pairs"


@dataclass
class RewardDatasets(Datasets):
    report: ReportPairs | None = None


def report_sample(pairs, limit: int, seed: int):
    """All of ``pairs`` when there are at most ``limit``, else ``limit`` of them drawn at random with ``seed``."""
    if len(pairs) <= limit:
        return pairs
    return pairs.select(sorted(random.Random(seed).sample(range(len(pairs)), limit)))


def pair_scores(model, tokenizer, pairs, batch_size: int = 8,
                max_length: int | None = None) -> tuple[list[float], list[float]]:
    """(chosen scores, rejected scores) of a conversational preference dataset, rendered as PPO and RLOO score a
    finished answer; ``max_length`` keeps a longer conversation's last tokens."""
    from alignment_pipelines.methods.rewards import reward_model_reward

    score = reward_model_reward(model.eval(), tokenizer, batch_size, max_length=max_length)
    prompts = list(pairs["prompt"])
    return (score(prompts=prompts, completions=list(pairs["chosen"])),
            score(prompts=prompts, completions=list(pairs["rejected"])))


def pairs_longer_than(pairs, tokenizer, max_length: int) -> int:
    """How many pairs have a chosen or rejected conversation longer than ``max_length`` tokens, as scored."""
    from alignment_pipelines.methods.rewards import completion_text, reward_model_text

    def length(prompt, answer) -> int:
        text = reward_model_text(tokenizer, prompt, completion_text(answer))
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return sum(max(length(p, c), length(p, r)) > max_length
               for p, c, r in zip(pairs["prompt"], pairs["chosen"], pairs["rejected"]))


def pairwise_stats(chosen: list[float], rejected: list[float]) -> dict[str, float]:
    """Share of pairs whose chosen answer scores higher (a tie counts half, so a constant model scores 0.5) and
    the mean score margin."""
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    if not margins:
        raise ValueError("no pairs to score")
    wins = sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins)
    return {"accuracy": wins / len(margins), "mean_margin": sum(margins) / len(margins)}


class RewardModel(TRLMethod):
    name = "reward"
    role = "reward"

    def datasets(self, config: RewardMethodConfig) -> RewardDatasets:
        """The training pairs for TRL; the report's pairs (the eval split, else the training pairs), sampled down to
        ``report_pairs``, for the report alone."""
        train = to_preference_dataset(load_pairs(config.data))
        held_out = bool(config.eval_data)
        pairs = to_preference_dataset(load_pairs(config.eval_data, field="eval_data")) if held_out else train
        report = ReportPairs(report_sample(pairs, config.report_pairs, config.seed), held_out)
        counts = {f"{report.count_prefix}_total": float(len(pairs)),
                  f"{report.count_prefix}_scored": float(len(report.pairs)),
                  f"{report.count_prefix}_sampled": float(len(report.pairs) < len(pairs))}
        return RewardDatasets(train, None, counts, report=report)

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

    def report(self, trainer, models: Models, data: RewardDatasets, folder: Path):
        from alignment_pipelines.evaluation.plots import score_histogram

        report, max_length = data.report, trainer.args.max_length
        model = trainer.accelerator.unwrap_model(trainer.model)
        chosen, rejected = pair_scores(model, models.tokenizer, report.pairs, trainer.args.per_device_eval_batch_size,
                                       max_length)
        split = "held-out" if report.held_out else "training"
        score_histogram(chosen, rejected, title=f"Reward-model scores on {len(chosen)} {split} pairs",
                        path=folder / SCORES_PLOT)
        stats = {f"{report.stat_prefix}_{name}": value for name, value in pairwise_stats(chosen, rejected).items()}
        metrics = stats | {
            f"{report.count_prefix}_truncated": float(pairs_longer_than(report.pairs, models.tokenizer, max_length)),
            "train_pairs_too_long": float(len(data.train) - len(trainer.train_dataset)),  # TRL dropped them
        }
        return metrics, {"score_distributions": SCORES_PLOT}


train = RewardModel().train
