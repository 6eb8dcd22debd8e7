"""Model specs, resolution to local safetensors folders, and loading. No Dagster here."""

from .loading import ModelFolderError, load_causal_lm, resolve_model, validate_model_folder
from .spec import DEFAULT_MODEL, TINY_MODEL, ModelSpec, ModelSpecError, parse_model_spec

__all__ = [
    "DEFAULT_MODEL",
    "TINY_MODEL",
    "ModelFolderError",
    "ModelSpec",
    "ModelSpecError",
    "load_causal_lm",
    "parse_model_spec",
    "resolve_model",
    "validate_model_folder",
]
