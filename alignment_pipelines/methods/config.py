"""One config definition per method: a dataclass whose fields carry help text and their rules.

The same dataclass is the Dagster launchpad config (generated in ``alignment_pipelines.assets``),
the ``alignment-pipelines train <method>`` flags (generated here, for argparse) and the worker's
config (a JSON file). ``validate()`` checks the fields and that the paths exist, without reading
the data, so a bad config fails before any model loads; the worker reads the data once.

A field is declared with :func:`option` (a tunable knob: launchpad + CLI) or :func:`wiring`
(a path the asset fills in from its upstream assets: CLI only).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

ModelRole = Literal["policy", "reference", "reward", "value"]
LoraOutput = Literal["adapter", "merged"]
MixedPrecision = Literal["auto", "bf16", "fp16", "no"]
LearningRateSchedule = Literal["constant", "linear", "cosine"]
DATA_SUFFIXES = (".parquet", ".jsonl")


@dataclass(frozen=True)
class MemoryProfile:
    """What a method holds in memory beside the policy's weights and activations (see ``methods/memory.py``)."""

    sequences_per_example: int = 1  # 2 for pairs that go through the model together (chosen + rejected)
    reference: bool = False  # a frozen copy of the start model when training in full (unless precomputed)
    # The LM head: TRL's chunked log-prob head (never all logits at once), every logit at once, or a score head
    logits: Literal["chunked", "full", "none"] = "chunked"
    # Config fields naming other models kept frozen beside the policy while they are set (a reward model, an
    # annotator), and the one whose model is copied and trained in full beside a fully trained policy (PPO's critic)
    frozen_models: tuple[str, ...] = ()
    trained_copy_of: str | None = None


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


def option(default: Any, help: str, *, minimum: float | None = None, maximum: float | None = None,
           exclusive_minimum: bool = False, exclusive_maximum: bool = False, path: bool = False) -> Any:
    """A tunable field: shown in the launchpad and as a CLI flag, validated against its bounds. ``path``: it may
    name a file, which travels to the worker relative to the data root (``alignment_pipelines.launch``)."""
    metadata = {"help": help, "minimum": minimum, "maximum": maximum,
                "exclusive_minimum": exclusive_minimum, "exclusive_maximum": exclusive_maximum, "path": path}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def answers_only_option() -> Any:
    """The ``score_answers_only`` field of the methods whose TRL trainer uses the chunked LM head (SFT, DPO, KTO)."""
    return option(True, "compute logits only where there is a label (the answer tokens), as TRL's former "
                        "use_logits_to_keep did: TRL 1.16 does so on a GPU but scores every position on a CPU, where "
                        "answers are often under a tenth of a padded batch's positions")


def precompute_option() -> Any:
    """The ``precompute_ref_log_probs`` field of the methods with a frozen reference (DPO, KTO)."""
    return option(True, "with full fine-tuning (lora false): compute the frozen reference's log-probabilities over "
                        "the whole dataset once before training, so no second model stays in memory (one reference "
                        "forward per example, up front). With LoRA the reference is the policy with its adapter off, "
                        "which costs no memory, and this is not used")


def wiring(help: str, *, required: bool = False, kind: Literal["model", "data", "output", "dir", "store"] = "data",
           aliases: tuple[str, ...] = ()) -> Any:
    """A path the training asset fills in from its inputs; a CLI flag (and ``aliases``), never a launchpad field."""
    metadata = {"help": help, "wiring": True, "kind": kind, "required": required, "aliases": aliases}
    return dataclasses.field(default=None, metadata=metadata)


def _unwrap_optional(hint: Any) -> tuple[Any, bool]:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return hint, False


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _sign_word(meta: dict) -> str:
    """'positive' or 'non-negative' for fields bounded below by zero, else ''."""
    if meta.get("minimum") == 0:
        return "positive" if meta.get("exclusive_minimum") else "non-negative"
    return "positive" if meta.get("minimum") == 1 else ""


def _check_type(name: str, value: Any, hint: Any, sign: str = "") -> Any:
    """The value coerced to the field's type (an int where a float is expected), or a ConfigError."""
    inner, optional = _unwrap_optional(hint)
    if value is None:
        if optional:
            return None
        raise ConfigError(name, value, "is required")
    origin = typing.get_origin(inner)
    if origin is Literal:
        choices = typing.get_args(inner)
        if value not in choices:
            raise ConfigError(name, value, f"must be one of {list(choices)}")
        return value
    if origin is list:
        item = typing.get_args(inner)[0]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(name, value, "must be a list")
        return [_check_type(f"{name}[{i}]", v, item) for i, v in enumerate(value)]
    if inner is bool:
        if not isinstance(value, bool):
            raise ConfigError(name, value, "must be true or false")
        return value
    if inner is int:
        if not _is_int(value):
            raise ConfigError(name, value, "must be an integer")
        return value
    if inner is float:
        if not (_is_int(value) or isinstance(value, float)) or not math.isfinite(value):
            raise ConfigError(name, value, f"must be a {sign} finite number" if sign else "must be a finite number")
        return float(value)
    if inner is str:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if not isinstance(value, str):
            raise ConfigError(name, value, "must be a string")
        return value
    return value


def _check_bounds(name: str, value: Any, meta: dict) -> None:
    if value is None or isinstance(value, (bool, str, list)):
        return
    low, high = meta.get("minimum"), meta.get("maximum")
    if low is not None and (value < low or (meta.get("exclusive_minimum") and value == low)):
        bound = f"{'>' if meta.get('exclusive_minimum') else '>='} {low}"
        sign = _sign_word(meta)
        raise ConfigError(name, value, f"must be {sign} ({bound})" if sign else f"must be {bound}")
    if high is not None and (value > high or (meta.get("exclusive_maximum") and value == high)):
        raise ConfigError(name, value, f"must be {'<' if meta.get('exclusive_maximum') else '<='} {high}")


def _columns(path: Path) -> set[str]:
    """Column names from the Parquet schema or the first JSONL row: no data is read."""
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return set(pq.read_schema(path).names)
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                try:
                    first = json.loads(line)
                except json.JSONDecodeError:
                    return set()  # the loader reports the bad line with its number
                return set(first) if isinstance(first, dict) else set()
    return set()


@dataclass
class MethodConfig:
    """Settings every method shares. Subclasses add their own fields with :func:`option`."""

    model: str = wiring("start model: a local safetensors folder (plain or LoRA adapter)", required=True,
                        kind="model")
    data: str = wiring("training data: .parquet or .jsonl", required=True)
    output_dir: str = wiring("where the trained model folder and metrics.json go", required=True, kind="output",
                             aliases=("--output",))
    eval_data: str | None = wiring("held-out data, same format as --data")
    checkpoint_dir: str | None = wiring(
        "where checkpoints go; a rerun with the same folder and config resumes from the newest one", kind="dir")

    max_steps: int = option(
        30, "optimizer steps to train for; -1: as many as num_train_epochs passes over the data take, so the run "
        "grows with the data (methods on a TRL trainer; PPO and online DPO count steps)", minimum=-1)
    num_train_epochs: float = option(
        1.0, "passes over the training data when max_steps is -1 (a fraction stops part-way)", minimum=0,
        exclusive_minimum=True)
    learning_rate: float = option(5e-5, "peak learning rate, reached after the warm-up", minimum=0,
                                  exclusive_minimum=True)
    warmup_ratio: float = option(0.0, "share of the run's steps over which the learning rate rises linearly from 0 "
                                      "to its peak", minimum=0, maximum=1, exclusive_maximum=True)
    warmup_steps: int = option(0, "steps of linear warm-up; above 0 it replaces warmup_ratio", minimum=0)
    lr_scheduler_type: LearningRateSchedule = option(
        "constant", "the learning rate after the warm-up: held at its peak (constant), or decayed to 0 by the run's "
        "last step (linear, cosine)")
    per_device_batch_size: int = option(4, "examples per device and step", minimum=1)
    gradient_accumulation_steps: int = option(1, "micro-batches summed into one optimizer step", minimum=1)
    max_length: int = option(512, "tokens per example (prompt + answer); longer ones are truncated", minimum=8)
    lora: bool = option(True, "train LoRA adapters (PEFT) instead of every weight")
    lora_r: int = option(16, "LoRA rank", minimum=1)
    lora_alpha: int = option(32, "LoRA scaling numerator (alpha / r scales the update)", minimum=1)
    lora_dropout: float = option(0.0, "dropout on the LoRA input", minimum=0, maximum=1, exclusive_maximum=True)
    lora_output: LoraOutput = option(
        "adapter", "what a LoRA run writes: the adapter alone (small; loads onto its start model) or a "
        "merged copy of the full weights")
    gradient_checkpointing: bool = option(
        True, "keep only each layer's input and recompute its activations in the backward pass: a fraction of the "
        "activation memory for one more forward pass (TRL's default)")
    mixed_precision: MixedPrecision = option(
        "auto", "compute precision: auto = bf16 on a GPU that supports it, else float32 (a CPU without bf16 units "
        "runs bf16 several times slower); fp16 needs a CUDA GPU")
    liger_kernels: bool = option(
        False, "Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU) on a CUDA GPU: less activation memory; needs "
        "the liger-kernel package")
    memory_budget_gb: float | None = option(
        None, "refuse to start when the estimated peak memory exceeds this many GB (1e9 bytes); unset: the "
        "training machine's memory (the GPU's when CUDA is visible, else RAM or the container limit); 0: no check",
        minimum=0)
    seed: int = option(0, "seed for data order, dropout and sampling", minimum=0)
    evaluate_at_end: bool = option(
        True, "score eval_data once training ends (the trainer's eval_* metrics); off saves that pass, and the "
        "evaluation_report measures every model on the held-out split anyway")
    logging_steps: int = option(1, "log metrics every this many steps", minimum=1)
    save_steps: int = option(10, "write a checkpoint every this many steps (needs checkpoint_dir); 0 writes none",
                             minimum=0)
    num_processes: int = option(
        1, "training processes (data parallel, through accelerate launch): one per GPU; the global batch is "
        "num_processes x per_device_batch_size x gradient_accumulation_steps. Without CUDA the processes share the "
        "CPU over gloo. Methods with their own loop (PPO, online DPO) take 1", minimum=1)
    deepspeed: str | None = option(
        None, "DeepSpeed through accelerate launch: 'zero2' (optimizer state and gradients sharded across the "
        "processes), 'zero3' (the weights too), or a DeepSpeed JSON config file (a path under the data root "
        "travels relative to it); needs CUDA GPUs and the deepspeed package (the gpu extra). Unset: plain DDP",
        path=True)
    trust_remote_code: bool = option(False, "run Python code shipped with the model folder (off: safer)")
    disable_tqdm: bool = option(True, "no progress bars (logs stay readable in Dagster)")

    # Columns every data file must have; checked from the file's schema (Parquet) or first row (JSONL).
    required_columns: ClassVar[tuple[str, ...]] = ("prompt", "chosen", "rejected")
    # True for a method whose own loop counts optimizer steps (not a TRL trainer's): max_steps -1 is refused.
    steps_only: ClassVar[bool] = False
    # What the method keeps in memory beside the policy, for the estimate checked before launch.
    memory_profile: ClassVar[MemoryProfile] = MemoryProfile()

    # ---- introspection ---------------------------------------------------------------------------
    @classmethod
    def field_specs(cls) -> list[tuple[dataclasses.Field, Any]]:
        """Every field with its resolved type hint, in declaration order."""
        hints = typing.get_type_hints(cls)
        return [(f, hints[f.name]) for f in dataclasses.fields(cls)]

    @classmethod
    def tunable_fields(cls) -> list[tuple[dataclasses.Field, Any]]:
        """The fields a user sets in the launchpad: everything but wiring."""
        return [(f, h) for f, h in cls.field_specs() if not f.metadata.get("wiring")]

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        out = {}
        for f, _ in cls.field_specs():
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                out[f.name] = f.default_factory()  # type: ignore[misc]
        return out

    # ---- validation ------------------------------------------------------------------------------
    def validate(self, machine: bool = True) -> "MethodConfig":
        """Check every field's type and bounds, and that input paths exist. Reads no data, loads no model.

        ``machine``: also the rules of the machine that trains (precision, memory, DeepSpeed) and the choice of
        generation backend (``use_vllm`` falls back to HF generate, logged, where vLLM cannot run). Off where the
        training runs elsewhere (a pod): the worker checks its own machine when it starts.
        """
        for f, hint in self.field_specs():
            value = _check_type(f.name, getattr(self, f.name), hint, _sign_word(f.metadata))
            if f.metadata.get("wiring") and f.metadata.get("required") and not value:
                raise ConfigError(f.name, value, "is required (a path)")
            _check_bounds(f.name, value, f.metadata)
            setattr(self, f.name, value)
        if machine:
            from alignment_pipelines.generation import resolve_use_vllm

            resolve_use_vllm(self)
        self._validate_schedule()
        self._validate_paths()
        self._validate_deepspeed()
        self._validate_method()
        if machine:
            self._validate_machine()
        return self

    def _validate_deepspeed(self) -> None:
        from alignment_pipelines.launch import DEEPSPEED_PRESETS

        if self.deepspeed is None:
            return
        if self.deepspeed not in DEEPSPEED_PRESETS:
            if not self.deepspeed.endswith(".json"):
                raise ConfigError("deepspeed", self.deepspeed,
                                  f"must be one of {list(DEEPSPEED_PRESETS)} or a .json file")
            if not Path(self.deepspeed).is_file():
                raise ConfigError("deepspeed", self.deepspeed, "file does not exist")
        if self.lora and self.lora_output == "merged" and self.zero_stage() == 3:
            raise ConfigError("lora_output", "merged", "with ZeRO-3 the weights are sharded across processes: a LoRA "
                              "run writes its adapter ('adapter'); `alignment-pipelines export` merges it")

    def zero_stage(self) -> int | None:
        """The DeepSpeed ZeRO stage asked for (None without DeepSpeed, or when the file does not say)."""
        if not self.deepspeed:
            return None
        if self.deepspeed.startswith("zero") and self.deepspeed[4:].isdigit():
            return int(self.deepspeed[4:])
        try:
            return int(json.loads(Path(self.deepspeed).read_text())["zero_optimization"]["stage"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _validate_paths(self) -> None:
        for f, _ in self.field_specs():
            value = getattr(self, f.name)
            kind = f.metadata.get("kind")
            if not f.metadata.get("wiring") or value is None:
                continue
            path = Path(value)
            if kind == "model":
                from alignment_pipelines.models.loading import ModelFolderError, validate_model_folder

                try:
                    validate_model_folder(path)
                except ModelFolderError as error:
                    raise ConfigError(f.name, value, str(error)) from None
            elif kind == "data":
                if not path.is_file():
                    raise ConfigError(f.name, value, "file does not exist")
                if path.suffix.lower() not in DATA_SUFFIXES:
                    raise ConfigError(f.name, value, f"must be a file ending in one of {DATA_SUFFIXES}")
                missing = [c for c in self.required_columns if c not in _columns(path)]
                if missing:
                    raise ConfigError(f.name, value, f"missing column(s) {missing}; found {sorted(_columns(path))}")
            elif path.exists() and not path.is_dir():
                raise ConfigError(f.name, value, "exists and is not a folder")
        if self.checkpoint_dir:
            self._validate_checkpoint_dir()

    def _validate_checkpoint_dir(self) -> None:
        ckpt, out = Path(self.checkpoint_dir).resolve(), Path(self.output_dir).resolve()
        if ckpt == out or out in ckpt.parents or ckpt in out.parents:
            raise ConfigError("checkpoint_dir", str(self.checkpoint_dir),
                              f"must not overlap output_dir {str(self.output_dir)!r} (the output is replaced whole)")
        self._validate_checkpoint_owner()

    def _validate_checkpoint_owner(self) -> None:
        from alignment_pipelines.methods.checkpoints import CHECKPOINT_CONFIG_FILE

        saved = Path(self.checkpoint_dir) / CHECKPOINT_CONFIG_FILE
        if not saved.is_file():
            return
        try:
            previous = json.loads(saved.read_text())
        except (OSError, json.JSONDecodeError):
            return
        current = self.checkpoint_fingerprint()
        if previous != current:
            changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
            raise ConfigError("checkpoint_dir", str(self.checkpoint_dir),
                              f"holds checkpoints of a different config (differs in {changed}); "
                              "use another checkpoint_dir or delete it")

    def _validate_schedule(self) -> None:
        if self.max_steps == 0:
            raise ConfigError("max_steps", 0, "must be >= 1, or -1 to train num_train_epochs passes over the data")
        if self.max_steps == -1 and self.steps_only:
            raise ConfigError("max_steps", -1, f"{type(self).__name__}'s own training loop counts steps: "
                                               "give max_steps >= 1")

    def _validate_method(self) -> None:
        """Rules that involve several fields; subclasses override."""

    def _validate_machine(self) -> None:
        """Rules that depend on the machine that trains: settings only a CUDA GPU supports, and the memory
        estimate (when it exceeds the machine, the error names the knob to turn). Nothing loads."""
        import importlib.util

        from alignment_pipelines.methods.memory import check_fits, machine

        where = machine()
        if where.kind != "gpu" and self.mixed_precision == "fp16":
            raise ConfigError("mixed_precision", "fp16", "fp16 needs a CUDA GPU; use auto, bf16 or no")
        if self.liger_kernels:
            if where.kind != "gpu":
                raise ConfigError("liger_kernels", True, "Liger's Triton kernels need a CUDA GPU")
            if importlib.util.find_spec("liger_kernel") is None:
                raise ConfigError("liger_kernels", True, "needs the liger-kernel package (pip install liger-kernel)")
        if self.deepspeed:
            if where.kind != "gpu":
                raise ConfigError("deepspeed", self.deepspeed, "DeepSpeed needs CUDA GPUs; unset it to train with DDP")
            if importlib.util.find_spec("deepspeed") is None:
                raise ConfigError("deepspeed", self.deepspeed, "needs the deepspeed package (the gpu extra: "
                                  "pip install 'alignment-pipelines[gpu]')")
        if where.kind == "gpu" and self.num_processes > 1:
            import torch

            if self.num_processes > torch.cuda.device_count():
                raise ConfigError("num_processes", self.num_processes,
                                  f"exceeds the {torch.cuda.device_count()} CUDA GPU(s) visible here (one per process)")
        check_fits(self, where)

    def lineage_tags(self) -> dict[str, str]:
        """What else identifies the trained model (e.g. an annotator's instruction), as ``lineage.*`` tags."""
        return {}

    def adapt_to_data(self, stats: dict[str, Any]) -> None:
        """Fill unset fields from what the dataset asset measured (e.g. KTO's class weights); default: nothing."""

    # ---- (de)serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def checkpoint_fingerprint(self) -> dict[str, Any]:
        """What must not change between a run and its resumption: the config without paths that may move."""
        d = {k: (os.fspath(v) if isinstance(v, os.PathLike) else v) for k, v in self.to_dict().items()
             if k not in ("output_dir", "checkpoint_dir", "disable_tqdm", "memory_budget_gb")}
        d["__class__"] = type(self).__name__
        return json.loads(json.dumps(d, default=str))

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        if not isinstance(d, dict):
            raise ConfigError("config", d, "must be a mapping of field names to values")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError("config", unknown, f"unknown key(s) for {cls.__name__}; known: {sorted(names)}")
        return cls(**d)

    # ---- command line ------------------------------------------------------------------------------
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One flag per field (``--learning-rate``), its help text and default in ``--help``.

        Flags default to None ("not given") so that a ``--config`` file's values are kept unless a
        flag overrides them; the field's own default is what ``--help`` shows.
        """
        defaults = cls.defaults()
        for f, hint in cls.field_specs():
            flags = ["--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ())]
            inner, _ = _unwrap_optional(hint)
            shown = defaults.get(f.name)
            help_text = f.metadata.get("help", "") + ("" if f.metadata.get("wiring") else f" (default: {shown})")
            kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": help_text.replace("%", "%%")}
            if inner is bool:
                parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **kwargs)
                continue
            if typing.get_origin(inner) is Literal:
                kwargs["choices"] = list(typing.get_args(inner))
            elif typing.get_origin(inner) is list:
                kwargs["nargs"] = "+"
                item = typing.get_args(inner)[0]
                if item in (int, float):  # e.g. --reward-weights 1 0.5: numbers, not strings
                    kwargs["type"] = item
            elif inner in (int, float):
                kwargs["type"] = inner
            parser.add_argument(*flags, **kwargs)

    @classmethod
    def values_from_args(cls, args: argparse.Namespace) -> dict[str, Any]:
        """The fields given on the command line (None means "not given")."""
        return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
                if getattr(args, f.name, None) is not None}
