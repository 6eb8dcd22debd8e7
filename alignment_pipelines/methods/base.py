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
CHECKPOINT_CONFIG_FILE = "alignment_checkpoint_config.json"


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
        from alignment_pipelines.data.splits import read_records

        return read_records(path)
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


BINARY_COLUMNS = ("prompt", "completion", "label")


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool) or type(v).__name__ == "bool_"  # numpy.bool_ from Parquet


def load_binary(path: str | os.PathLike) -> pd.DataFrame:
    """Read binary feedback (.parquet or .jsonl): ``row``, ``prompt`` (messages), ``completion`` (str), ``label`` (bool).

    ``label`` True means the completion is desirable. Raises :class:`ConfigError` (field ``data``) for a missing
    file or column, a non-boolean label, or data where one of the two labels never occurs (KTO needs both).
    """
    df = load_pairs(path, required=BINARY_COLUMNS)
    bad = [(r, v) for r, v in zip(df["row"], df["label"]) if not _is_bool(v)]
    if bad:
        row, value = bad[0]
        raise ConfigError(
            "data", str(path), f"column 'label' must be boolean (true = desirable); row {row} has {value!r}"
            f" ({len(bad)} non-boolean value(s))"
        )
    df["label"] = df["label"].astype(bool)
    n_true = int(df["label"].sum())
    n_false = len(df) - n_true
    if n_true == 0 or n_false == 0:
        raise ConfigError(
            "data", str(path), f"column 'label' must have both values; found {n_true} desirable, {n_false} undesirable"
        )
    return df


def to_unpaired_dataset(df: pd.DataFrame):
    """TRL conversational unpaired-preference dataset: prompt messages, one assistant turn, bool label."""
    from datasets import Dataset

    return Dataset.from_list([
        {"prompt": normalize_prompt(p), "completion": _answer(c), "label": bool(lab)}
        for p, c, lab in zip(df["prompt"], df["completion"], df["label"])
    ])


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
    # Checkpoints for resuming a killed run. ``checkpoint_dir`` must stay the same across retries (the asset keys
    # it by the config without ``output_dir``); it is removed after a successful run. ``save_steps`` > 0 writes a
    # checkpoint every that many optimizer steps (needs ``checkpoint_dir``); 0 writes none.
    checkpoint_dir: str | None = None
    save_steps: int = 0

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
        self._validate_checkpointing()
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
                self.load_data(p)
            except ConfigError as exc:
                raise ConfigError(name, str(path), exc.rule if exc.field == "data" else str(exc)) from exc

    def _validate_checkpointing(self) -> None:
        if not _is_int(self.save_steps) or self.save_steps < 0:
            raise ConfigError("save_steps", self.save_steps, "must be a non-negative integer (0 = no checkpoints)")
        if self.checkpoint_dir is None:
            if self.save_steps > 0:
                raise ConfigError("checkpoint_dir", None, "is required when save_steps > 0")
            return
        if not isinstance(self.checkpoint_dir, (str, os.PathLike)) or not str(self.checkpoint_dir).strip():
            raise ConfigError("checkpoint_dir", self.checkpoint_dir, "must be a non-empty path or null")
        ckpt, out, model = (Path(x).resolve() for x in (self.checkpoint_dir, self.output_dir, self.model))
        for other, name in ((out, "output_dir"), (model, "model")):
            if ckpt == other or other in ckpt.parents or ckpt in other.parents:
                raise ConfigError("checkpoint_dir", str(self.checkpoint_dir), f"must not overlap {name} ({other})")
        if ckpt.exists() and not ckpt.is_dir():
            raise ConfigError("checkpoint_dir", str(self.checkpoint_dir), "exists and is not a folder")
        saved = ckpt / CHECKPOINT_CONFIG_FILE
        if saved.is_file():
            try:
                previous = json.loads(saved.read_text())
            except (OSError, json.JSONDecodeError):
                previous = None
            if previous is not None and previous != self.checkpoint_fingerprint():
                changed = sorted(k for k in set(previous) | set(self.checkpoint_fingerprint())
                                 if previous.get(k) != self.checkpoint_fingerprint().get(k))
                raise ConfigError("checkpoint_dir", str(self.checkpoint_dir),
                                  f"holds checkpoints of a different config (differs in {changed}); "
                                  "use another checkpoint_dir or delete it")

    def checkpoint_fingerprint(self) -> dict[str, Any]:
        """What must not change between a run and its resumption: the config without paths that may move."""
        d = {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in self.to_dict().items()
             if k not in ("output_dir", "checkpoint_dir", "disable_tqdm")}
        d["__class__"] = type(self).__name__
        return json.loads(json.dumps(d, default=str))

    def load_data(self, path: str | os.PathLike) -> pd.DataFrame:
        """Read and check one data file for this method; subclasses override (e.g. binary feedback)."""
        return load_pairs(path, required=self.required_columns)

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
        **checkpoint_args(config),
    }


# --------------------------------------------------------------------------------------
# Checkpoints and resume
# --------------------------------------------------------------------------------------


def checkpoint_args(config: TrainingConfig) -> dict[str, Any]:
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
        if child.is_dir() and child.name.startswith("checkpoint-") and child.name[len("checkpoint-"):].isdigit():
            step = _checkpoint_step(child)
            if step is not None:
                found.append((int(child.name[len("checkpoint-"):]), step, child))
    if not found:
        return None, 0
    _, step, path = max(found)
    return path, step


def _remove_incomplete_checkpoints(checkpoint_dir: Path) -> None:
    """A run killed while saving leaves a checkpoint folder without trainer_state.json; it must not be resumed."""
    for child in checkpoint_dir.iterdir():
        if child.is_dir() and child.name.startswith("checkpoint-") and _checkpoint_step(child) is None:
            shutil.rmtree(child, ignore_errors=True)


def train_resumable(trainer, config: TrainingConfig) -> int:
    """``trainer.train()``, resuming from the newest complete checkpoint in ``config.checkpoint_dir`` if any.

    Returns the step resumed from (0 for a fresh run). Records the config in the checkpoint folder so a later run
    with a different config refuses to resume from it (see ``TrainingConfig.validate``).
    """
    resume, step = None, 0
    if config.checkpoint_dir:
        ckpt = Path(config.checkpoint_dir)
        ckpt.mkdir(parents=True, exist_ok=True)
        (ckpt / CHECKPOINT_CONFIG_FILE).write_text(json.dumps(config.checkpoint_fingerprint(), indent=2))
        _remove_incomplete_checkpoints(ckpt)
        resume, step = latest_checkpoint(ckpt)
    trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    trainer._alignment_resumed_from_step = step
    return step


def remove_checkpoints(config: TrainingConfig) -> None:
    if config.checkpoint_dir:
        shutil.rmtree(config.checkpoint_dir, ignore_errors=True)


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
    """The start model and its tokenizer: safetensors only, float32 on a CPU."""
    import torch

    from alignment_pipelines.models.loading import load_causal_lm

    return load_causal_lm(config.model, trust_remote_code=config.trust_remote_code,
                          dtype="auto" if torch.cuda.is_available() else "float32", padding_side="right")


def reference_model(config: TrainingConfig, peft_config, dtype):
    """The frozen reference for full fine-tuning; None with LoRA (the adapter switched off is the reference)."""
    if peft_config is not None:
        return None
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        config.model, dtype=dtype, trust_remote_code=config.trust_remote_code, use_safetensors=True
    )


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


def history_and_metrics(trainer, resumed_from_step: int | None = None) -> tuple[list[dict], dict[str, float]]:
    """Split ``trainer.state.log_history`` into per-step logs and final summary metrics.

    ``history``: every log entry of this run except the end-of-training summary (after a resume, the entries up
    to the checkpoint's step were logged by the killed run and are left out). ``metrics``: the last logged value
    of every numeric training metric, the summary (``train_loss``, ``train_runtime``, ...), ``steps`` and
    ``resumed_from_step`` (0 for a fresh run).
    """
    if resumed_from_step is None:
        resumed_from_step = getattr(trainer, "_alignment_resumed_from_step", 0)
    history: list[dict] = []
    metrics: dict[str, float] = {}
    for entry in trainer.state.log_history:
        if "train_runtime" not in entry and int(entry.get("step", 0)) <= resumed_from_step:
            continue
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
    metrics["resumed_from_step"] = float(resumed_from_step)
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


def finish(result: TrainResult, staging: StagingDir, config: TrainingConfig | None = None) -> TrainResult:
    """Write metrics.json into the staged model, rename it to ``output_dir``, then drop the checkpoints."""
    (staging.model_dir / METRICS_FILE).write_text(result.to_json())
    staging.commit()
    if config is not None:
        remove_checkpoints(config)
    return result


def train_and_save(trainer, tokenizer, config: TrainingConfig, staging: StagingDir, method: str,
                   evaluate: bool = False, extra_metrics: dict[str, float] | None = None) -> TrainResult:
    """What every method does once its trainer is built: train (resuming if possible), evaluate, save, commit."""
    prepare_trainer(trainer, config)
    resumed = train_resumable(trainer, config)
    if evaluate:
        trainer.evaluate()
    history, metrics = history_and_metrics(trainer, resumed)
    metrics.update(extra_metrics or {})
    save_merged(trainer, tokenizer, config, staging)
    result = TrainResult(method=method, output_dir=str(config.output_dir), metrics=metrics, history=history)
    return finish(result, staging, config)
