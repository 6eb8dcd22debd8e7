"""The demo feedback shipped with the package (written for this project, layout (a))."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

DEMO_FILE = "feedback.jsonl"


def demo_feedback_path() -> Path:
    """Path of the shipped `demo/feedback.jsonl` (a real file inside the installed package)."""
    path = Path(str(resources.files("alignment_pipelines.data").joinpath("demo", DEMO_FILE)))
    if not path.is_file():  # pragma: no cover - broken installation
        raise FileNotFoundError(f"demo feedback missing from the package: {path}")
    return path
