"""Training methods: one module per method, and this registry, which drives the asset graph.

A new method is one module (a config dataclass and a ``train(config, callbacks)`` function, usually a
:class:`~alignment_pipelines.methods.training.TRLMethod`) plus one line in ``METHODS`` saying what data
it trains on, what it starts from and which other models it needs. The training assets, the CLI's
``train <method>`` flags and the evaluation's inputs are all generated from this registry.

Method modules import torch/TRL inside their hooks only, so importing this package (to validate a
config at launch, or to build the Dagster definitions) stays fast.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from alignment_pipelines.methods import dpo, kto, online_dpo, orpo, sft
from alignment_pipelines.methods import ppo, reward, rloo
from alignment_pipelines.methods.config import ConfigError, MethodConfig
from alignment_pipelines.methods.training import METRICS_FILE, TrainResult

DataKind = Literal["pairs", "binary", "prompts"]
StartPoint = Literal["base", "sft"]


@dataclass(frozen=True)
class MethodSpec:
    """What the graph needs to know about a method."""

    name: str
    config_cls: type[MethodConfig]
    train: Callable[..., TrainResult]
    data: DataKind  # the dataset asset it trains on
    starts_from: StartPoint  # the base model, or the SFT model
    description: str
    needs: tuple[str, ...] = ()  # other model assets it loads, e.g. ("reward_model",)
    produces: Literal["policy", "reward"] = "policy"
    asset_name: str = ""  # default: policy_<name>

    @property
    def asset(self) -> str:
        return self.asset_name or f"policy_{self.name}"


METHODS: dict[str, MethodSpec] = {
    "sft": MethodSpec("sft", sft.SFTMethodConfig, sft.train, "pairs", "base", asset_name="sft_model",
                      description="Supervised fine-tuning of the base model on the chosen answers (TRL SFTTrainer)."),
    "dpo": MethodSpec("dpo", dpo.DPOMethodConfig, dpo.train, "pairs", "sft",
                      description="Direct Preference Optimization from the SFT model on the offline pairs."),
    "kto": MethodSpec("kto", kto.KTOMethodConfig, kto.train, "binary", "sft",
                      description="Kahneman-Tversky Optimization from the SFT model on thumbs up/down feedback, "
                                  "with class weights that balance desirable and undesirable examples."),
    "orpo": MethodSpec("orpo", orpo.ORPOMethodConfig, orpo.train, "pairs", "base",
                       description="Odds-Ratio Preference Optimization straight from the base model: no SFT step, "
                                   "no reference model."),
    "reward": MethodSpec("reward", reward.RewardMethodConfig, reward.train, "pairs", "sft", produces="reward",
                         asset_name="reward_model",
                         description="Bradley-Terry reward model from the SFT model on the pairs (TRL RewardTrainer): "
                                     "one score per answer; pairwise accuracy, margin and score plot on the eval split."),
    "ppo": MethodSpec("ppo", ppo.PPOMethodConfig, ppo.train, "prompts", "sft", needs=("reward_model",),
                      description="PPO (RLHF) from the SFT model on fresh samples scored by the reward model: KL "
                                  "penalty to the reference, GAE, clipped policy and value losses; the critic is a "
                                  "value model started from the reward model, trained at its own learning rate. "
                                  "LoRA by default (PERL)."),
    "rloo": MethodSpec("rloo", rloo.RLOOMethodConfig, rloo.train, "prompts", "sft", needs=("reward_model",),
                       description="RLOO (TRL RLOOTrainer) from the SFT model: k samples per prompt, each one's "
                                   "baseline the mean reward of the others; no critic. LoRA by default (PERL)."),
    "online_dpo": MethodSpec("online_dpo", online_dpo.OnlineDPOMethodConfig, online_dpo.train, "prompts", "sft",
                             description="Online DPO from AI feedback: two fresh samples per prompt from the current "
                                         "policy, judged in both orders by an annotator steered by an instruction; "
                                         "ties dropped, down-weighted or trained as soft labels (OAIF)."),
}


METHOD_PLUGINS_ENV = "ALIGNMENT_PIPELINES_METHOD_PLUGINS"


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method defined outside this package (its module's one registry line)."""
    METHODS[spec.name] = spec
    return spec


def load_plugins() -> None:
    """Import the modules named in ``ALIGNMENT_PIPELINES_METHOD_PLUGINS`` (comma-separated); each calls
    :func:`register`. The training worker inherits the variable, so it knows the same methods."""
    for module in filter(None, (m.strip() for m in os.environ.get(METHOD_PLUGINS_ENV, "").split(","))):
        importlib.import_module(module)


load_plugins()


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ConfigError("method", name, f"unknown method; known: {sorted(METHODS)}") from None


def config_from_dict(method: str, values: dict[str, Any]) -> MethodConfig:
    """Build and validate the config of ``method`` from a plain dict (JSON, CLI, Dagster config)."""
    return get_method(method).config_cls.from_dict(values).validate()


def run_training(method: str, config: MethodConfig, callbacks: list | None = None) -> TrainResult:
    """Train, and write ``output_dir/metrics.json`` (the result as JSON)."""
    spec = get_method(method)
    if not isinstance(config, spec.config_cls):
        raise ConfigError("config", type(config).__name__, f"method {method!r} needs a {spec.config_cls.__name__}")
    result = spec.train(config, callbacks=callbacks)
    if not (Path(config.output_dir) / METRICS_FILE).is_file():
        raise RuntimeError(f"method {method!r} finished without writing {METRICS_FILE} to {config.output_dir}")
    return result


__all__ = ["METHODS", "ConfigError", "MethodConfig", "MethodSpec", "TrainResult", "config_from_dict", "get_method",
           "load_plugins", "register", "run_training"]
