"""What every training method shares: config, result, data loading, and the output folder.

A method module (``sft.py``, ``dpo.py``, ...) defines a config dataclass that extends
:class:`TrainingConfig` and a ``train(config, callbacks=None) -> TrainResult`` function.
Everything here is importable without torch/TRL being imported at module import time, so
that validating a config at launch is instant.

Output contract: ``config.output_dir`` ends up as a plain safetensors folder (merged model +
tokenizer + ``metrics.json``) that loads with ``AutoModelForCausalLM.from_pretrained`` on its
own. Training happens in a hidden staging folder next to it, and the folder is renamed into
place only after the model and ``metrics.json`` are written, so a failed run never leaves
something that looks like a finished model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd

PAIR_COLUMNS = ("prompt", "chosen", "rejected")
DATA_SUFFIXES = (".parquet", ".jsonl")
METRICS_FILE = "metrics.json"
CONFIG_FILE = "alignment_config.json"


class ConfigError(ValueError):
    """A training config (or its data) is invalid. The message names the field, the value and the rule."""

    def __init__(self, field_name: str, value: Any, rule: str):
        self.field = field_name
        self.value = value
        self.rule = rule
        shown = repr(value)
        if len(shown) > 200:
            shown = shown[:197] + "..."
        super().__init__(f"{field_name}={shown}: {rule}")


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def _read_table(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:  # the data layer's reader, once it exists (handles remote roots, schemas)
            from alignment_pipelines.data.splits import read_records  # type: ignore

            return read_records(path)
        except ImportError:
            return pd.read_parquet(path)
    if suffix == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ConfigError("data", str(path), f"line {lineno} is not valid JSON ({exc.msg})") from exc
        return pd.DataFrame(rows)
    raise ConfigError("data", str(path), f"must be a file ending in one of {DATA_SUFFIXES}")


def normalize_prompt(prompt: Any, row: Any = None) -> list[dict[str, str]]:
    """A prompt as a list of {"role","content"} messages ending with a user turn.

    A plain string means one user turn. Parquet gives lists of dicts back as numpy arrays;
    those are accepted too.
    """
    where = f" (row {row})" if row is not None else ""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ConfigError("prompt", prompt, f"must not be empty{where}")
        return [{"role": "user", "content": prompt}]
    if hasattr(prompt, "tolist"):
        prompt = prompt.tolist()
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise ConfigError("prompt", prompt, f"must be a string or a non-empty list of messages{where}")
    messages = []
    for message in prompt:
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ConfigError("prompt", prompt, f"every message needs 'role' and 'content'{where}")
        messages.append({"role": str(message["role"]), "content": str(message["content"])})
    if messages[-1]["role"] != "user":
        raise ConfigError("prompt", prompt, f"the last message must be a user turn{where}")
    return messages


def load_pairs(path: str | os.PathLike, required: tuple[str, ...] = PAIR_COLUMNS) -> pd.DataFrame:
    """Read preference pairs (.parquet or .jsonl) into a DataFrame with normalized prompts.

    Columns: ``row`` (added from the line index when missing), ``prompt`` (list of messages),
    ``chosen``, ``rejected`` (str). Raises :class:`ConfigError` for a missing file, an unknown
    suffix, missing columns or an empty table.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError("data", str(path), "file does not exist")
    df = _read_table(path)
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ConfigError("data", str(path), f"missing column(s) {missing}; found {list(df.columns)}")
    if len(df) == 0:
        raise ConfigError("data", str(path), "has no rows")
    df = df.copy()
    if "row" not in df.columns:
        df.insert(0, "row", range(len(df)))
    df["prompt"] = [normalize_prompt(p, r) for p, r in zip(df["prompt"], df["row"])]
    for col in ("chosen", "rejected", "completion"):
        if col in df.columns and col in required:
            df[col] = [str(v) if v is not None else "" for v in df[col]]
    return df.reset_index(drop=True)


def _answer(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def to_preference_dataset(df: pd.DataFrame):
    """TRL conversational preference dataset: prompt messages, chosen/rejected assistant turns."""
    from datasets import Dataset

    return Dataset.from_list(
        [
            {"prompt": normalize_prompt(p), "chosen": _answer(c), "rejected": _answer(r)}
            for p, c, r in zip(df["prompt"], df["chosen"], df["rejected"])
        ]
    )


def to_sft_dataset(df: pd.DataFrame, completion_only: bool = True):
    """TRL conversational SFT dataset from the chosen answers.

    ``completion_only=True`` gives the prompt-completion format (``prompt`` messages +
    ``completion`` assistant turn), on which TRL computes the loss on the answer only;
    ``False`` gives ``messages`` = prompt + chosen (loss on every token).
    """
    from datasets import Dataset

    rows = []
    for p, c in zip(df["prompt"], df["chosen"]):
        prompt = normalize_prompt(p)
        if completion_only:
            rows.append({"prompt": prompt, "completion": _answer(c)})
        else:
            rows.append({"messages": prompt + _answer(c)})
    return Dataset.from_list(rows)


# --------------------------------------------------------------------------------------
# Config and result
# --------------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


@dataclass
class TrainingConfig:
    """Settings every method shares. Validated (``validate()``) before any model is loaded."""

    model: str  # a LOCAL folder of safetensors weights + tokenizer
    data: str  # path to the training data (.parquet or .jsonl)
    output_dir: str  # where the merged safetensors model + metrics.json go
    eval_data: str | None = None
    max_steps: int = 30
    learning_rate: float = 5e-5
    per_device_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_length: int = 512
    lora: bool = True  # LoRA (PEFT) by default; False = full fine-tuning
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    seed: int = 0
    logging_steps: int = 1
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    disable_tqdm: bool = True

    # Columns the training data must have; methods override.
    required_columns: ClassVar[tuple[str, ...]] = PAIR_COLUMNS

    # ---- validation -------------------------------------------------------------------
    def _check_positive_int(self, name: str) -> None:
        v = getattr(self, name)
        if not _is_int(v) or v <= 0:
            raise ConfigError(name, v, "must be a positive integer")

    def _check_bool(self, name: str) -> None:
        v = getattr(self, name)
        if not isinstance(v, bool):
            raise ConfigError(name, v, "must be true or false")

    def validate(self) -> None:
        """Raise :class:`ConfigError` for the first bad field. Loads no model."""
        for name in ("model", "data", "output_dir"):
            v = getattr(self, name)
            if not isinstance(v, (str, os.PathLike)) or not str(v).strip():
                raise ConfigError(name, v, "must be a non-empty path")
        model = Path(self.model)
        if not model.is_dir():
            raise ConfigError(
                "model", str(self.model), "must be an existing local model folder (names are resolved before training)"
            )
        if not (model / "config.json").is_file():
            raise ConfigError("model", str(self.model), "folder has no config.json (not a transformers model folder)")
        for name in ("max_steps", "per_device_batch_size", "gradient_accumulation_steps", "max_length",
                     "logging_steps", "lora_r", "lora_alpha"):
            self._check_positive_int(name)
        if not _is_number(self.learning_rate) or self.learning_rate <= 0:
            raise ConfigError("learning_rate", self.learning_rate, "must be a positive finite number")
        if not _is_number(self.lora_dropout) or not 0 <= self.lora_dropout < 1:
            raise ConfigError("lora_dropout", self.lora_dropout, "must be in [0, 1)")
        if not _is_int(self.seed) or self.seed < 0:
            raise ConfigError("seed", self.seed, "must be a non-negative integer")
        for name in ("lora", "trust_remote_code", "gradient_checkpointing", "disable_tqdm"):
            self._check_bool(name)
        out = Path(self.output_dir)
        if out.exists() and not out.is_dir():
            raise ConfigError("output_dir", str(out), "exists and is not a folder")
        if out.resolve() == model.resolve():
            raise ConfigError("output_dir", str(out), "must differ from the input model folder")
        self._validate_method()
        # data last: it reads the file
        for name in ("data", "eval_data"):
            path = getattr(self, name)
            if path is None:
                continue
            p = Path(path)
            if p.suffix.lower() not in DATA_SUFFIXES:
                raise ConfigError(name, str(path), f"must end in one of {DATA_SUFFIXES}")
            if not p.is_file():
                raise ConfigError(name, str(path), "file does not exist")
            try:
                load_pairs(p, required=self.required_columns)
            except ConfigError as exc:
                raise ConfigError(name, str(path), exc.rule if exc.field == "data" else str(exc)) from exc

    def _validate_method(self) -> None:
        """Method-specific checks; subclasses override."""

    # ---- (de)serialisation ------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        if not isinstance(d, dict):
            raise ConfigError("config", d, "must be a mapping of field names to values")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError("config", unknown, f"unknown key(s) for {cls.__name__}; known: {sorted(names)}")
        required = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
        ]
        missing = [n for n in required if n not in d]
        if missing:
            raise ConfigError("config", missing, f"required key(s) missing for {cls.__name__}")
        values = dict(d)
        # ints are fine where floats are expected (e.g. "learning_rate: 1" in YAML)
        for f in dataclasses.fields(cls):
            if f.name in values and f.type in ("float", float) and _is_int(values[f.name]):
                values[f.name] = float(values[f.name])
        return cls(**values)


@dataclass
class TrainResult:
    method: str
    output_dir: str
    metrics: dict[str, float] = field(default_factory=dict)  # final / summary metrics
    history: list[dict] = field(default_factory=list)  # per logging step

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True, default=_json_default)

    @classmethod
    def from_json(cls, text: str) -> "TrainResult":
        return cls(**json.loads(text))


def _json_default(o: Any):
    if hasattr(o, "item"):
        return o.item()
    return str(o)


# --------------------------------------------------------------------------------------
# Shared training plumbing (imports torch/transformers lazily)
# --------------------------------------------------------------------------------------


def device_kwargs() -> dict[str, Any]:
    """TrainingArguments that depend on the hardware: CPU-only when there is no CUDA."""
    import torch

    cuda = torch.cuda.is_available()
    return {
        "use_cpu": not cuda,
        "bf16": bool(cuda and torch.cuda.is_bf16_supported()),
        "fp16": False,
    }


def common_args(config: TrainingConfig, trainer_dir: Path) -> dict[str, Any]:
    """Keyword arguments for any TRL config class (they all extend TrainingArguments)."""
    return {
        "output_dir": str(trainer_dir),
        "max_steps": config.max_steps,
        "learning_rate": config.learning_rate,
        "per_device_train_batch_size": config.per_device_batch_size,
        "per_device_eval_batch_size": config.per_device_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "logging_steps": config.logging_steps,
        "seed": config.seed,
        "data_seed": config.seed,
        "report_to": [],
        "save_strategy": "no",
        "push_to_hub": False,
        "disable_tqdm": config.disable_tqdm,
        # transformers 5 renamed gradient_checkpointing; setting the new name avoids a FutureWarning
        # and overrides TRL's default (True), which only slows tiny/CPU runs.
        "activation_checkpointing": config.gradient_checkpointing,
        "lr_scheduler_type": "constant",
        "dataloader_num_workers": 0,
        "max_length": config.max_length,
        **device_kwargs(),
    }


def quiet_progress(config: TrainingConfig) -> None:
    """With ``disable_tqdm``: no progress bars from transformers/datasets (weights, tokenizing)."""
    if not config.disable_tqdm:
        return
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def prepare_trainer(trainer, config: TrainingConfig):
    """With ``disable_tqdm``, transformers prints every log dict instead of a bar; drop that printer too.

    Metrics still reach ``trainer.state.log_history`` and any callbacks passed in.
    """
    if config.disable_tqdm:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    return trainer


def load_model_and_tokenizer(config: TrainingConfig):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.model, trust_remote_code=config.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = "auto" if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        config.model, dtype=dtype, trust_remote_code=config.trust_remote_code
    )
    return model, tokenizer


def lora_config(config: TrainingConfig):
    if not config.lora:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )


class StagingDir:
    """A hidden sibling of ``output_dir`` to train into; ``commit()`` renames it into place.

    Layout: ``<staging>/trainer`` (trainer scratch: logs, checkpoints) and
    ``<staging>/model`` (the merged model). On exit without commit, everything is removed.
    """

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = Path(output_dir)
        self.output_dir.parent.mkdir(parents=True, exist_ok=True)
        self.root = self.output_dir.parent / f".{self.output_dir.name}.staging-{uuid.uuid4().hex[:8]}"
        self.trainer_dir = self.root / "trainer"
        self.model_dir = self.root / "model"
        self.committed = False

    def __enter__(self) -> "StagingDir":
        self.trainer_dir.mkdir(parents=True)
        return self

    def commit(self) -> Path:
        old = None
        if self.output_dir.exists():
            old = self.output_dir.parent / f".{self.output_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.output_dir, old)
        os.replace(self.model_dir, self.output_dir)
        self.committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.output_dir

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _floatable(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def history_and_metrics(trainer) -> tuple[list[dict], dict[str, float]]:
    """Split ``trainer.state.log_history`` into per-step logs and final summary metrics.

    ``history``: every log entry except the end-of-training summary. ``metrics``: the last
    logged value of every numeric training metric, the summary (``train_loss``,
    ``train_runtime``, ...) and ``steps``.
    """
    history: list[dict] = []
    metrics: dict[str, float] = {}
    for entry in trainer.state.log_history:
        clean = {k: (float(v) if _floatable(v) and k != "step" else v) for k, v in entry.items()}
        if "train_runtime" in entry:
            metrics.update({k: float(v) for k, v in entry.items() if _floatable(v) and k != "step"})
            continue
        clean["step"] = int(entry.get("step", 0))
        history.append(clean)
        for k, v in entry.items():
            if _floatable(v) and k not in ("step", "epoch"):
                metrics[k] = float(v)
    metrics["steps"] = float(trainer.state.global_step)
    return history, metrics


def save_merged(trainer, tokenizer, config: TrainingConfig, staging: StagingDir) -> None:
    """Merge LoRA into the base weights (if any) and save a plain safetensors folder."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "merge_and_unload"):  # a PeftModel
        model = model.merge_and_unload()
    model = model.to("cpu")
    model.save_pretrained(staging.model_dir, safe_serialization=True)
    tokenizer.save_pretrained(staging.model_dir)
    (staging.model_dir / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2, default=str))


def finish(result: TrainResult, staging: StagingDir) -> TrainResult:
    """Write metrics.json into the staged model, then rename it to ``output_dir``."""
    (staging.model_dir / METRICS_FILE).write_text(result.to_json())
    staging.commit()
    return result
