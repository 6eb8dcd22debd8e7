"""Evaluation: every model on the same held-out data, with intervals; the report with its plots."""

from alignment_pipelines.evaluation.compare import Evaluation, ModelResult, ModelUnderTest, evaluate_models
from alignment_pipelines.evaluation.metrics import (
    Answer,
    GenerationBackend,
    TransformersBackend,
    generate_answers,
    preference_accuracy,
    win_rate,
)
from alignment_pipelines.evaluation.report import evaluation_plots, render_report
from alignment_pipelines.evaluation.schema import EvaluationReport, JudgeIdentity, ReportSchemaError

__all__ = [
    "Answer",
    "Evaluation",
    "EvaluationReport",
    "GenerationBackend",
    "JudgeIdentity",
    "ModelResult",
    "ModelUnderTest",
    "ReportSchemaError",
    "TransformersBackend",
    "evaluate_models",
    "evaluation_plots",
    "generate_answers",
    "preference_accuracy",
    "render_report",
    "win_rate",
]
