"""The one training flow every method shares: load by role, LoRA, reference, staging, checkpoints, save.

A TRL-backed method subclasses :class:`TRLMethod` and says only what differs: its TRL config and
trainer classes, its datasets, its own TRL arguments and extra trainer arguments. A method TRL lacks
(PPO) uses the same pieces around its own loop: :func:`load_start_model`, :class:`StagingDir`,
:func:`save_trained` and :func:`finish`.

Output contract: ``config.output_dir`` ends up as a model folder plus ``metrics.json`` and
``alignment_config.json``: a LoRA adapter that loads onto its start model (``lora_output="adapter"``)
or plain safetensors weights. Training happens in a hidden staging folder next to it that is renamed
into place only when complete, so a failed run never leaves something that looks finished.

Every run reports, beside the trainer's own metrics, the memory estimate made before it started, its measured
peak (RSS on a CPU, allocated GPU memory on a GPU) and the non-padding tokens it trained on per second; the
callbacks (MLflow, Dagster) receive the estimate before the first step and the measurements at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignment_pipelines.methods import memory
from alignment_pipelines.methods.checkpoints import checkpoint_args, prepare_resume, remove_checkpoints
from alignment_pipelines.methods.config import ConfigError, MethodConfig

METRICS_FILE = "metrics.json"
CONFIG_FILE = "alignment_config.json"


@dataclass
class TrainResult:
    method: str
    output_dir: str
    metrics: dict[str, float] = field(default_factory=dict)  # final / summary metrics
    history: list[dict] = field(default_factory=list)  # per logging step
    artifacts: dict[str, str] = field(default_factory=dict)  # name -> file in output_dir (e.g. a PNG plot)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True, default=_json_default)

    @classmethod
    def from_json(cls, text: str) -> "TrainResult":
        return cls(**json.loads(text))


def _json_default(o: Any):
    if hasattr(o, "item"):
        return o.item()
    return str(o)


# --------------------------------------------------------------------------------------------------
# Models by role
# --------------------------------------------------------------------------------------------------


@dataclass
class Models:
    """What a method trains and what it needs beside it; None where the method or LoRA needs none."""

    policy: Any  # the model being trained, whatever its role (a reward model for the reward method)
    tokenizer: Any
    reference: Any = None  # frozen copy of the start model; with LoRA the disabled adapter is the reference
    reward: Any = None
    reward_tokenizer: Any = None


def training_dtype():
    import torch

    return "auto" if torch.cuda.is_available() else "float32"


def load_start_model(config: MethodConfig, role: str):
    """The start model for ``role`` and its tokenizer (right padding for training); adapters are merged in."""
    from alignment_pipelines.models.loading import load_model

    return load_model(config.model, role, trust_remote_code=config.trust_remote_code, dtype=training_dtype(),
                      device="cpu", padding_side="right")


def load_frozen(path: str, role: str, config: MethodConfig):
    from alignment_pipelines.models.loading import load_model

    model, tokenizer = load_model(path, role, trust_remote_code=config.trust_remote_code, dtype=training_dtype(),
                                  device="cpu", padding_side="left")
    model.requires_grad_(False)
    return model, tokenizer


def lora_config(config: MethodConfig, role: str):
    """PEFT LoRA settings for ``role`` (a sequence classifier keeps its score head trainable), or None."""
    if not config.lora:
        return None
    from peft import LoraConfig

    from alignment_pipelines.models.loading import lora_task_type

    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules="all-linear", task_type=lora_task_type(role))


# --------------------------------------------------------------------------------------------------
# Staging and saving
# --------------------------------------------------------------------------------------------------


class StagingDir:
    """A hidden sibling of ``output_dir`` to train into; ``commit()`` renames it into place.

    Layout: ``<staging>/trainer`` (trainer scratch) and ``<staging>/model`` (the saved model).
    On exit without commit, everything is removed.
    """

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = Path(output_dir)
        self.output_dir.parent.mkdir(parents=True, exist_ok=True)
        self.root = self.output_dir.parent / f".{self.output_dir.name}.staging-{uuid.uuid4().hex[:8]}"
        self.trainer_dir = self.root / "trainer"
        self.model_dir = self.root / "model"

    def __enter__(self) -> "StagingDir":
        self.trainer_dir.mkdir(parents=True)
        return self

    def commit(self) -> Path:
        old = None
        if self.output_dir.exists():
            old = self.output_dir.parent / f".{self.output_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.output_dir, old)
        os.replace(self.model_dir, self.output_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.output_dir

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class TrainingDiverged(RuntimeError):
    """Training left a non-finite weight: the run fails and nothing is saved or registered."""


def refuse_non_finite(named_tensors, method: str) -> None:
    """Raise :class:`TrainingDiverged` naming the first trained tensor holding a NaN or an infinity."""
    import torch

    for name, tensor in named_tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise TrainingDiverged(f"{method}: training left non-finite values in {name}; nothing was saved "
                                   "(a loss that went NaN: lower the learning rate, or look for examples that "
                                   "leave no answer token within max_length)")


def save_trained(model, tokenizer, config: MethodConfig, target: Path, role: str, method: str,
                 state_dict: dict | None = None) -> None:
    """Save what was trained: the LoRA adapter alone (pointing at its start model) or full safetensors weights.

    ``alignment_model.json`` records the role, the format and the start model, so loading needs no other input.
    ``state_dict``: the weights gathered from every process (DeepSpeed shards them; see :func:`gathered_state_dict`).
    Non-finite trained weights raise :class:`TrainingDiverged` before anything is written.
    """
    from alignment_pipelines.models.loading import ADAPTER_CONFIG, MODEL_CARD

    refuse_non_finite(state_dict.items() if state_dict is not None else
                      ((n, p) for n, p in model.named_parameters() if p.requires_grad), method)
    target.mkdir(parents=True, exist_ok=True)
    start = str(Path(config.model).resolve())
    is_peft = hasattr(model, "peft_config")
    if is_peft and config.lora_output == "merged":
        model, is_peft = model.merge_and_unload(), False
    if state_dict is None:
        model = model.to("cpu")
        model.save_pretrained(target, safe_serialization=True)
    else:
        model.save_pretrained(target, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(target)
    if is_peft:  # PEFT records the original base path; the start model may itself be an adapter
        adapter_config = json.loads((target / ADAPTER_CONFIG).read_text())
        adapter_config["base_model_name_or_path"] = start
        (target / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2))
    card = {"role": role, "format": "adapter" if is_peft else "full", "parent": start, "method": method}
    (target / MODEL_CARD).write_text(json.dumps(card, indent=2))
    (target / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2, default=str))


def gathered_state_dict(trainer) -> dict | None:
    """Under DeepSpeed, the full weights gathered from every process (a collective: every rank calls it); None
    otherwise, where the unwrapped model holds them whole."""
    from accelerate.utils import DistributedType

    accelerator = trainer.accelerator
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return accelerator.get_state_dict(trainer.model_wrapped if trainer.model_wrapped is not None else trainer.model)


def finish(result: TrainResult, staging: StagingDir, config: MethodConfig) -> TrainResult:
    """Write metrics.json into the staged model, rename it to ``output_dir``, then drop the checkpoints."""
    (staging.model_dir / METRICS_FILE).write_text(result.to_json())
    staging.commit()
    remove_checkpoints(config)
    return result


# --------------------------------------------------------------------------------------------------
# Trainer plumbing
# --------------------------------------------------------------------------------------------------


def device_kwargs(config: MethodConfig) -> dict[str, Any]:
    """TrainingArguments that depend on the hardware (``validate`` refused what this machine cannot do): CPU-only
    without CUDA; ``mixed_precision`` auto is bf16 on a GPU that has it and float32 elsewhere; Liger's kernels."""
    import torch

    cuda = torch.cuda.is_available()
    precision = config.mixed_precision
    if precision == "auto":
        precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    return {"use_cpu": not cuda, "bf16": precision == "bf16", "fp16": precision == "fp16",
            "use_liger_kernel": config.liger_kernels}


def common_args(config: MethodConfig, trainer_dir: Path) -> dict[str, Any]:
    """Keyword arguments for any TRL config class (they all extend TrainingArguments)."""
    return {
        "output_dir": str(trainer_dir),
        "max_steps": config.max_steps,  # -1: num_train_epochs passes over the data
        "num_train_epochs": config.num_train_epochs,
        "warmup_steps": config.warmup_steps or config.warmup_ratio,  # transformers reads a value below 1 as a ratio
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
        # transformers 5 renamed gradient_checkpointing; the new name avoids a FutureWarning
        "activation_checkpointing": config.gradient_checkpointing,
        # transformers' "constant" skips the warm-up; with none, "constant_with_warmup" is the same constant rate
        "lr_scheduler_type": ("constant_with_warmup" if config.lr_scheduler_type == "constant"
                              else config.lr_scheduler_type),
        "dataloader_num_workers": 0,
        **device_kwargs(config),
        **checkpoint_args(config),
    }


def quiet_progress(config: MethodConfig) -> None:
    """With ``disable_tqdm``: no progress bars from transformers/datasets (weights, tokenizing)."""
    if not config.disable_tqdm:
        return
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def _floatable(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def history_and_metrics(log_history: list[dict], global_step: int,
                        resumed_from_step: int) -> tuple[list[dict], dict[str, float]]:
    """Split a trainer's ``log_history`` into per-step logs and final summary metrics.

    ``history``: every log entry of this run except the end-of-training summary (after a resume, the entries up
    to the checkpoint's step were logged by the killed run and are left out). ``metrics``: the last logged value
    of every numeric training metric, the summary (``train_loss``, ``train_runtime``, ...), ``steps`` and
    ``resumed_from_step`` (0 for a fresh run).
    """
    history: list[dict] = []
    metrics: dict[str, float] = {}
    for entry in log_history:
        if "train_runtime" not in entry and int(entry.get("step", 0)) <= resumed_from_step:
            continue
        if "train_runtime" in entry:
            metrics.update({k: float(v) for k, v in entry.items() if _floatable(v) and k != "step"})
            continue
        clean = {k: (float(v) if _floatable(v) and k != "step" else v) for k, v in entry.items()}
        clean["step"] = int(entry.get("step", 0))
        history.append(clean)
        metrics.update({k: float(v) for k, v in entry.items() if _floatable(v) and k not in ("step", "epoch")})
    metrics["steps"] = float(global_step)
    metrics["resumed_from_step"] = float(resumed_from_step)
    return history, metrics


@contextlib.contextmanager
def answers_only_head(config: MethodConfig):
    """With ``score_answers_only`` on a CPU: TRL 1.16's chunked LM head scores only labelled positions, in small tiles.

    Off Triton devices TRL scores every position so that tile shapes never change (a compiling backend such as
    Neuron would recompile); a CPU compiles nothing. On HH pairs at length 512 the answers are about 8% of a padded
    DPO batch's positions, so this drops most of the head's work, and tiles of ``memory.CPU_HEAD_TILE`` keep its
    float32 temporaries small. Log-probs and gradients are unchanged. TRL's settings are restored on exit.
    """
    import torch
    import trl.kernels.chunked_logprob as kernel
    import trl.trainer.utils as head

    saved = head._use_triton, kernel.TOKEN_CHUNK_SIZE, head._CHUNKED_LOGPROB_CHUNK_SIZE
    if getattr(config, "score_answers_only", False) and not torch.cuda.is_available():
        on_triton = saved[0]
        head._use_triton = lambda device: device.type == "cpu" or on_triton(device)
        kernel.TOKEN_CHUNK_SIZE, head._CHUNKED_LOGPROB_CHUNK_SIZE = memory.CPU_HEAD_TILE
    try:
        yield
    finally:
        head._use_triton, kernel.TOKEN_CHUNK_SIZE, head._CHUNKED_LOGPROB_CHUNK_SIZE = saved


CPU_MMAP_THRESHOLD = 4 * 1024 * 1024


def return_freed_memory_on_cpu() -> None:
    """On glibc, serve allocations of 4 MiB and more from their own mappings, which go back to the OS when freed.

    glibc raises its mmap threshold to 32 MiB once such a block is freed, after which a layer's activation
    temporaries come from the heap and stay resident: measured on SmolLM2 (8 x 512 tokens, LoRA, checkpointing),
    a forward and backward peaked at 5.9 GB RSS by default and 2.05 GB with this, for more page faults
    (benchmarks/results/memory.md). Process-wide and harmless to call again.
    """
    import ctypes
    import platform

    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        ctypes.CDLL("libc.so.6").mallopt(-3, CPU_MMAP_THRESHOLD)  # -3: M_MMAP_THRESHOLD


class TokenCounter:
    """Counts the non-padding tokens of the micro-batches a trainer trains on, by wrapping its ``training_step``
    (the data loader builds one batch ahead, so counting in the collator would count a batch never trained on)."""

    def __init__(self, trainer, keys: tuple[str, ...]):
        self.keys, self.tokens, self.step = keys, 0, trainer.training_step
        trainer.training_step = self

    def __call__(self, model, inputs, *args, **kwargs):
        for key in self.keys:
            if key in inputs:
                mask = inputs.get(key.replace("input_ids", "attention_mask"))
                self.tokens += int(mask.sum()) if mask is not None else int(inputs[key].numel())
        return self.step(model, inputs, *args, **kwargs)


def memory_metrics(estimate: memory.MemoryEstimate | None, tokens: int, train_seconds: float) -> dict[str, float]:
    """The estimate next to the measured peak (GPU memory on a GPU, else RSS), tokens trained on and tokens/s."""
    peak = memory.measured_peak()
    metrics = {**peak, "peak_memory_gb": peak.get("peak_gpu_gb", peak["peak_rss_gb"]), "train_tokens": float(tokens),
               "tokens_per_second": tokens / train_seconds if train_seconds > 0 else 0.0}
    if estimate is not None:
        metrics["memory_estimate_gb"] = estimate.total / memory.GB
    return metrics


@dataclass
class Datasets:
    train: Any
    eval: Any = None
    metrics: dict[str, float] = field(default_factory=dict)  # what loading them found (e.g. filtered pairs)


class TRLMethod:
    """A method backed by a TRL trainer. Subclasses set ``name`` and ``role`` and fill in the four hooks."""

    name: str = ""
    role: str = "policy"  # what it trains: a policy, or a reward model
    needs_reference: bool = False  # a frozen copy of the start model when training in full
    token_keys: tuple[str, ...] = ("input_ids",)  # batch keys whose non-padding tokens count as trained on

    def datasets(self, config) -> Datasets:
        raise NotImplementedError

    def trl_classes(self) -> tuple[type, type]:
        """(TRL config class, TRL trainer class), imported here so that importing a method stays cheap."""
        raise NotImplementedError

    def trl_args(self, config, data: Datasets) -> dict[str, Any]:
        """The method's own TRL config arguments, beside :func:`common_args`."""
        return {}

    def trainer_kwargs(self, config, models: Models) -> dict[str, Any]:
        """Extra trainer arguments (a reference model, reward functions, ...)."""
        return {"ref_model": models.reference} if self.needs_reference else {}

    def report(self, trainer, models: Models, data: Datasets, folder: Path) -> tuple[dict[str, float], dict[str, str]]:
        """After training: extra metrics, and files written into ``folder`` (the model folder) to show with it."""
        return {}, {}

    def load_models(self, config) -> Models:
        model, tokenizer = load_start_model(config, self.role)
        reference = None
        if self.needs_reference and not config.lora and not memory.precomputes_reference(config):
            reference, _ = load_frozen(config.model, self.role, config)
        return Models(policy=model, tokenizer=tokenizer, reference=reference)

    def train(self, config, callbacks: list | None = None) -> TrainResult:
        """Load the data, then the models; train (resuming if a checkpoint exists); save; commit.

        The models load on the CPU and the trainer places them (its device, or its rank's GPU, or DeepSpeed's
        shards): nothing is moved to a device before the trainer sees it.
        """
        import torch

        config.validate()
        where = memory.machine()
        estimate = memory.estimate(config, where.kind)
        if where.kind == "cpu":
            return_freed_memory_on_cpu()
        quiet_progress(config)
        data = self.datasets(config)
        models = self.load_models(config)
        config_class, trainer_class = self.trl_classes()
        with StagingDir(config.output_dir) as staging, answers_only_head(config):
            args = config_class(**common_args(config, staging.trainer_dir), **self.trl_args(config, data))
            setup_started = time.perf_counter()  # tokenizing, and precomputing reference log-probs if asked
            trainer = trainer_class(model=models.policy, args=args, train_dataset=data.train,
                                    eval_dataset=data.eval, processing_class=models.tokenizer,
                                    peft_config=lora_config(config, self.role), callbacks=list(callbacks or []),
                                    **self.trainer_kwargs(config, models))
            setup_seconds = time.perf_counter() - setup_started
            if trainer.train_dataset is not None and len(trainer.train_dataset) == 0:
                raise ConfigError("max_length", config.max_length,
                                  f"no training example of {config.data} fits in max_length={config.max_length} "
                                  "tokens (the trainer drops longer ones); raise --max-length")
            if config.disable_tqdm:  # transformers prints every log dict when bars are off; metrics still flow
                from transformers.trainer_callback import PrinterCallback

                trainer.remove_callback(PrinterCallback)
            counter = TokenCounter(trainer, self.token_keys)
            if estimate is not None:  # callbacks (MLflow, Dagster) see the expected peak before the first step
                trainer.callback_handler.on_log(args, trainer.state, trainer.control,
                                                {"memory_estimate_gb": estimate.total / memory.GB})
            resume, resumed_step = prepare_resume(config)
            started = time.perf_counter()
            trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
            accelerator = trainer.accelerator
            tokens = int(accelerator.reduce(torch.tensor(counter.tokens, device=accelerator.device), "sum"))
            if data.eval is not None and config.evaluate_at_end:
                trainer.evaluate()
            history, metrics = history_and_metrics(trainer.state.log_history, trainer.state.global_step,
                                                   resumed_step)
            metrics.update(data.metrics)
            metrics["wall_seconds"] = time.perf_counter() - started
            metrics["trainer_setup_seconds"] = setup_seconds
            metrics["num_processes"] = float(accelerator.num_processes)
            usage = memory_metrics(estimate, tokens, metrics.get("train_runtime", 0.0))  # this process's peak
            metrics.update(usage)
            trainer.callback_handler.on_log(args, trainer.state, trainer.control, usage)
            # Several processes (accelerate launch): every rank takes part in gathering sharded weights and in the
            # report (whose forward passes are collective under ZeRO-3); only rank 0 writes the model and commits.
            state_dict = gathered_state_dict(trainer)
            model = accelerator.unwrap_model(trainer.model)
            staging.model_dir.mkdir(parents=True, exist_ok=True)
            if accelerator.is_main_process:
                save_trained(model, models.tokenizer, config, staging.model_dir, self.role, self.name, state_dict)
            extra, artifacts = self.report(trainer, models, data, staging.model_dir)
            metrics.update(extra)
            result = TrainResult(method=self.name, output_dir=str(config.output_dir), metrics=metrics,
                                 history=history, artifacts=artifacts)
            if accelerator.is_main_process:
                finish(result, staging, config)
            accelerator.wait_for_everyone()  # the other ranks return once the model is in place
            return result
