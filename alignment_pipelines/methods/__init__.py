"""Training methods: one module per method, registered here.

A new method plugs in with one line in ``METHODS``::

    "kto": MethodSpec("kto", kto.KTOMethodConfig, kto.train, needs="binary", starts_from="sft"),

Method modules import torch/TRL inside ``train`` only, so importing this package (e.g. to
validate a config at launch) stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from alignment_pipelines.methods.base import (
    METRICS_FILE,
    ConfigError,
    TrainingConfig,
    TrainResult,
    load_binary,
    load_pairs,
)
from alignment_pipelines.methods import dpo, kto, orpo, sft
from alignment_pipelines.methods.dpo import DPOMethodConfig
from alignment_pipelines.methods.kto import KTOMethodConfig
from alignment_pipelines.methods.orpo import ORPOMethodConfig
from alignment_pipelines.methods.sft import SFTMethodConfig

__all__ = [
    "METHODS",
    "ConfigError",
    "DPOMethodConfig",
    "KTOMethodConfig",
    "MethodSpec",
    "ORPOMethodConfig",
    "SFTMethodConfig",
    "TrainResult",
    "TrainingConfig",
    "config_from_dict",
    "get_method",
    "load_binary",
    "load_pairs",
    "run_training",
]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type[TrainingConfig]
    train_fn: Callable[..., TrainResult]
    needs: Literal["pairs", "binary", "prompts"]
    starts_from: Literal["sft", "base"]


METHODS: dict[str, MethodSpec] = {
    "sft": MethodSpec("sft", SFTMethodConfig, sft.train, needs="pairs", starts_from="base"),
    "dpo": MethodSpec("dpo", DPOMethodConfig, dpo.train, needs="pairs", starts_from="sft"),
    "kto": MethodSpec("kto", KTOMethodConfig, kto.train, needs="binary", starts_from="sft"),
    "orpo": MethodSpec("orpo", ORPOMethodConfig, orpo.train, needs="pairs", starts_from="base"),
}


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ConfigError("method", name, f"unknown method; known: {sorted(METHODS)}") from None


def config_from_dict(method: str, d: dict[str, Any]) -> TrainingConfig:
    """Build and validate the config of ``method`` from a plain dict (YAML, CLI, Dagster config)."""
    config = get_method(method).config_cls.from_dict(d)
    config.validate()
    return config


def run_training(method: str, config: TrainingConfig, callbacks: list | None = None) -> TrainResult:
    """Validate, train, and write ``output_dir/metrics.json`` (the result as JSON)."""
    spec = get_method(method)
    if not isinstance(config, spec.config_cls):
        raise ConfigError(
            "config", type(config).__name__, f"method {method!r} needs a {spec.config_cls.__name__}"
        )
    config.validate()
    result = spec.train_fn(config, callbacks=callbacks)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / METRICS_FILE).write_text(result.to_json())
    return result
