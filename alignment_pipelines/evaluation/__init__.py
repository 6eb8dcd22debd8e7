"""Evaluation: implicit-reward accuracy, generation, judged win rate, lengths, report."""

from alignment_pipelines.evaluation.metrics import (
    GenerationBackend,
    TransformersBackend,
    generate_answers,
    length_stats,
    preference_accuracy,
    win_rate,
)
from alignment_pipelines.evaluation.report import build_report

__all__ = [
    "GenerationBackend",
    "TransformersBackend",
    "build_report",
    "generate_answers",
    "length_stats",
    "preference_accuracy",
    "win_rate",
]
