"""Checkpoints and resume, shared by every method: a killed run's retry continues where it stopped."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

CHECKPOINT_CONFIG_FILE = "alignment_checkpoint_config.json"


def checkpoint_args(config) -> dict[str, Any]:
    """With ``checkpoint_dir`` and ``save_steps`` > 0: the trainer writes ``checkpoint-<step>`` folders there."""
    if not config.checkpoint_dir or config.save_steps <= 0:
        return {}
    return {
        "output_dir": str(config.checkpoint_dir),
        "save_strategy": "steps",
        "save_steps": config.save_steps,
        "save_total_limit": 1,  # the newest is only rotated out once its successor is completely written
    }


def _checkpoint_step(path: Path) -> int | None:
    """The step of a complete checkpoint folder, or None (trainer_state.json is written last)."""
    try:
        return int(json.loads((path / "trainer_state.json").read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def latest_checkpoint(checkpoint_dir: str | os.PathLike | None) -> tuple[Path | None, int]:
    """(folder, step) of the newest complete ``checkpoint-<n>`` in ``checkpoint_dir``; (None, 0) if there is none."""
    if not checkpoint_dir or not Path(checkpoint_dir).is_dir():
        return None, 0
    found = []
    for child in Path(checkpoint_dir).iterdir():
        suffix = child.name[len("checkpoint-"):]
        if child.is_dir() and child.name.startswith("checkpoint-") and suffix.isdigit():
            step = _checkpoint_step(child)
            if step is not None:
                found.append((int(suffix), step, child))
    if not found:
        return None, 0
    _, step, path = max(found)
    return path, step


def prepare_resume(config) -> tuple[Path | None, int]:
    """Record the config beside the checkpoints, drop half-written ones, and return the newest (None, 0 if fresh).

    The recorded config makes a later run with a different config refuse to resume (``MethodConfig.validate``).
    """
    if not config.checkpoint_dir:
        return None, 0
    ckpt = Path(config.checkpoint_dir)
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / CHECKPOINT_CONFIG_FILE).write_text(json.dumps(config.checkpoint_fingerprint(), indent=2))
    for child in ckpt.iterdir():  # a run killed while saving leaves a checkpoint without trainer_state.json
        if child.is_dir() and child.name.startswith("checkpoint-") and _checkpoint_step(child) is None:
            shutil.rmtree(child, ignore_errors=True)
    return latest_checkpoint(ckpt)


def remove_checkpoints(config) -> None:
    if config.checkpoint_dir:
        shutil.rmtree(config.checkpoint_dir, ignore_errors=True)
