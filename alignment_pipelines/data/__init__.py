"""Feedback data: schemas, importers, validation (Great Expectations), splits and demo data.

Importing this package is cheap: Great Expectations and pyarrow load only when used.
"""

from alignment_pipelines.data.demo import demo_feedback_path
from alignment_pipelines.data.importers import FeedbackFileError, ImportResult, read_feedback_file
from alignment_pipelines.data.schemas import PAIR_COLUMNS, QUARANTINE_COLUMNS, Message, ReasonCode
from alignment_pipelines.data.splits import (
    dataset_version,
    deduplicate_pairs,
    prompt_key,
    read_records,
    split_by_prompt,
    write_records,
)
from alignment_pipelines.data.validation import (
    SuiteReport,
    ValidationResult,
    ValidationRules,
    run_expectation_suite,
    validate_file,
    validate_records,
)

__all__ = [
    "PAIR_COLUMNS",
    "QUARANTINE_COLUMNS",
    "FeedbackFileError",
    "ImportResult",
    "Message",
    "ReasonCode",
    "SuiteReport",
    "ValidationResult",
    "ValidationRules",
    "dataset_version",
    "deduplicate_pairs",
    "demo_feedback_path",
    "prompt_key",
    "read_feedback_file",
    "read_records",
    "run_expectation_suite",
    "split_by_prompt",
    "validate_file",
    "validate_records",
    "write_records",
]
