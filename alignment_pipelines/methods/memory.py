"""How much memory a training run will need, estimated before anything loads, and how much it used.

The estimate reads only the model folder's ``config.json`` and safetensors headers, so it runs during
config validation. It adds up, in bytes:

- the policy's weights (float32 on a CPU, as stored on a GPU), and a frozen reference copy when the method
  needs one, trains in full and does not precompute the reference's log-probabilities;
- the trained parameters' gradients and AdamW state (every weight in full fine-tuning, the adapters with LoRA);
- activations: with gradient checkpointing each layer's input for every token plus one layer's full
  activations; without it every layer's. Attention on a CPU materialises heads x length scores per token;
- the LM head: TRL 1.16's chunked log-prob head works on tiles of at most 4096 tokens x 32768 vocabulary
  entries (a few float32 temporaries of that size on a CPU), while ORPO materialises every logit,
  ``tokens x vocab x 4`` bytes, several times over;
- other models the method keeps beside the policy (``MemoryProfile.frozen_models``: a reward model, an annotator),
  and the critic that PPO copies from its reward model (from the start model without one) and trains
  (``trained_copy_of``): every weight in full training, its own adapter over frozen weights with LoRA;
- the process itself (Python, torch, the tokenized data) on a CPU.

The constants come from counting what a Llama block keeps per token, checked against SmolLM2-135M DPO runs
(estimate 2.27 GB, measured 1.75 GB peak RSS at batch 4, length 512); ``benchmarks/memory.py`` prints estimate
and measurement side by side for every method. An estimate is a planning figure, not a promise.
Tokens per micro-batch are counted at ``max_length`` (the worst case a padded batch can reach).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignment_pipelines.methods.config import ConfigError, MethodConfig

GB = 1e9
DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}
# TRL 1.16's chunked LM head (trl.kernels.chunked_logprob): tokens per tile, vocabulary entries per tile; and
# the tile it gets on a CPU with ``score_answers_only`` (training.answers_only_head)
HEAD_TILE_TOKENS, HEAD_TILE_VOCAB = 4096, 32768
CPU_HEAD_TILE = (1024, 8192)
# Constants (see the module docstring): floats each layer keeps per token, per hidden unit and per MLP
# unit; float32 copies of an LM head tile alive at once on a CPU (torch fallback of the kernel) and on a GPU;
# copies of the full logits ORPO holds (logits, log-softmax, their gradients); the process's own footprint.
ACT_PER_HIDDEN, ACT_PER_MLP, ATTN_COPIES = 15, 4, 2
HEAD_TILE_COPIES_CPU, HEAD_TILE_COPIES_GPU = 6, 2
FULL_LOGITS_COPIES = 4
RUNTIME_CPU_BYTES = 0.8 * GB


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a model, read from its folder without loading weights."""

    parameters: int
    stored_bytes: int  # bytes per parameter as stored
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int


@dataclass(frozen=True)
class Machine:
    kind: str  # "gpu" or "cpu"
    total_bytes: int
    name: str  # what the budget is, in words ("GPU memory of NVIDIA H100", "RAM")


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak bytes by part; ``total`` is their sum."""

    parts: dict[str, float]
    device: str

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def describe(self) -> str:
        shown = ", ".join(f"{name} {value / GB:.2f}" for name, value in self.parts.items() if value >= 0.005 * GB)
        return f"{self.total / GB:.2f} GB ({shown})"


# --------------------------------------------------------------------------------------------------
# The model's shape
# --------------------------------------------------------------------------------------------------


def _safetensors_header(path: Path) -> dict:
    with open(path, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(size))


def _root_folder(folder: Path) -> Path:
    """The full-weights folder under a chain of LoRA adapters (their weights are merged into it when loaded)."""
    from alignment_pipelines.models.loading import adapter_parent, is_adapter_folder

    seen = set()
    while is_adapter_folder(folder) and folder not in seen:
        seen.add(folder)
        folder = adapter_parent(folder)
    return folder


def _first(d: dict, *names: str, default: Any = None) -> Any:
    for name in names:
        if d.get(name) is not None:
            return d[name]
    return default


def model_shape(folder: str | os.PathLike) -> ModelShape | None:
    """The shape of the model in ``folder`` (plain or adapter), or None when its config names no decoder shape."""
    root = _root_folder(Path(folder))
    try:
        config = json.loads((root / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    config = config.get("text_config") or config
    hidden = _first(config, "hidden_size", "n_embd", "d_model")
    layers = _first(config, "num_hidden_layers", "n_layer", "num_layers")
    vocab = _first(config, "vocab_size")
    heads = _first(config, "num_attention_heads", "n_head")
    if not all(isinstance(v, int) and v > 0 for v in (hidden, layers, vocab, heads)):
        return None
    parameters, stored = 0, 0
    for file in sorted(root.glob("*.safetensors")):
        for name, info in _safetensors_header(file).items():
            if name == "__metadata__":
                continue
            count = math.prod(info["shape"])
            parameters += count
            stored += count * DTYPE_BYTES.get(info["dtype"], 4)
    if not parameters:
        return None
    return ModelShape(parameters=parameters, stored_bytes=max(1, round(stored / parameters)), hidden=hidden,
                      layers=layers, intermediate=_first(config, "intermediate_size", "n_inner", default=4 * hidden),
                      vocab=vocab, heads=heads, kv_heads=_first(config, "num_key_value_heads", default=heads))


def lora_parameters(shape: ModelShape, rank: int) -> int:
    """Adapter weights on every linear layer of a Llama-style block (q, k, v, o, gate, up, down)."""
    h, i, kv = shape.hidden, shape.intermediate, shape.hidden * shape.kv_heads // shape.heads
    per_layer = (h + h) + 2 * (h + kv) + (h + h) + 2 * (h + i) + (i + h)
    return rank * per_layer * shape.layers


# --------------------------------------------------------------------------------------------------
# The estimate
# --------------------------------------------------------------------------------------------------


def precomputes_reference(config: MethodConfig) -> bool:
    """True when the reference's log-probs are computed once before training instead of a reference model kept
    beside the policy: only for a frozen reference in full fine-tuning (with LoRA the reference is the policy
    with its adapter off, which costs no memory)."""
    return config.memory_profile.reference and not config.lora and bool(getattr(config, "precompute_ref_log_probs", False))


def estimate(config: MethodConfig, device: str = "cpu") -> MemoryEstimate | None:
    """Estimated peak memory of training ``config`` on ``device`` ("cpu": RSS, "gpu": allocated GPU memory).

    None when the model's shape cannot be read (an architecture whose config.json names no decoder shape).
    """
    shape = model_shape(config.model)
    if shape is None:
        return None
    profile = config.memory_profile
    gpu = device == "gpu"
    weight_bytes = shape.stored_bytes if gpu else 4  # on a CPU the trainers load float32
    act_bytes = 2 if gpu and config.mixed_precision != "no" else 4
    weights = shape.parameters * weight_bytes
    parts = {"weights": float(weights)}
    if profile.reference and not config.lora and not precomputes_reference(config):
        parts["reference"] = float(weights)
    trained = lora_parameters(shape, config.lora_r) if config.lora else shape.parameters
    # gradient (weight dtype) + AdamW's two float32 moments; adapters train in float32
    parts["optimizer"] = float(trained * ((4 if config.lora else weight_bytes) + 8))

    tokens = config.per_device_batch_size * profile.sequences_per_example * config.max_length
    attention = 0 if gpu else ATTN_COPIES * shape.heads * config.max_length  # CPU: scores are materialised
    per_token_layer = act_bytes * (ACT_PER_HIDDEN * shape.hidden + ACT_PER_MLP * shape.intermediate + attention)
    if config.gradient_checkpointing:
        parts["activations"] = float(tokens * (shape.layers * shape.hidden * act_bytes + per_token_layer))
    else:
        parts["activations"] = float(tokens * shape.layers * per_token_layer)

    for name in profile.frozen_models:  # held in the dtype they load in, no gradients
        other = model_shape(getattr(config, name)) if getattr(config, name, None) else None
        if other is not None:
            parts[name] = float(other.parameters * (other.stored_bytes if gpu else 4))
    copied = profile.trained_copy_of and (getattr(config, profile.trained_copy_of, None) or config.model)
    other = model_shape(copied) if copied else None
    if other is not None:  # a second trained model: its weights, what trains of it (gradients, AdamW), activations
        copy_bytes = other.stored_bytes if gpu else 4
        trained_copy = lora_parameters(other, config.lora_r) * (4 + 8) if config.lora \
            else other.parameters * (copy_bytes + 8)
        parts["trained_copy"] = float(other.parameters * copy_bytes + trained_copy + parts["activations"])

    if profile.logits == "chunked":
        tile_tokens, tile_vocab = CPU_HEAD_TILE if not gpu and getattr(config, "score_answers_only", False) \
            else (HEAD_TILE_TOKENS, HEAD_TILE_VOCAB)
        tile = min(tokens, tile_tokens) * min(shape.vocab, tile_vocab) * 4
        parts["lm_head"] = float(tile * (HEAD_TILE_COPIES_GPU if gpu else HEAD_TILE_COPIES_CPU))
    elif profile.logits == "full":
        parts["lm_head"] = float(tokens * shape.vocab * 4 * FULL_LOGITS_COPIES)
    if not gpu:
        parts["runtime"] = RUNTIME_CPU_BYTES
    return MemoryEstimate(parts=parts, device=device)


# --------------------------------------------------------------------------------------------------
# The machine, the check, the measurement
# --------------------------------------------------------------------------------------------------


def _container_limit() -> int | None:
    """The cgroup memory limit of this process (v2, then v1), when one is set."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:
            return int(text)
    return None


def machine() -> Machine:
    """Where training runs: the first CUDA GPU when one is visible, else this machine's RAM (or its container's)."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return Machine("gpu", int(props.total_memory), f"GPU memory of {props.name}")
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = _container_limit()
    if limit is not None and limit < ram:
        return Machine("cpu", limit, "container memory limit")
    return Machine("cpu", int(ram), "RAM")


def _fixes(config: MethodConfig) -> list[tuple[str, dict[str, Any], str]]:
    """Changes that lower the peak, cheapest first: (the knob named, the change, what it costs)."""
    fixes = []
    if not config.gradient_checkpointing:
        fixes.append(("gradient_checkpointing", {"gradient_checkpointing": True}, "one more forward pass per step"))
    if config.memory_profile.reference and not config.lora and not precomputes_reference(config) \
            and hasattr(config, "precompute_ref_log_probs"):
        fixes.append(("precompute_ref_log_probs", {"precompute_ref_log_probs": True},
                      "one reference forward over the data before training"))
    if not config.lora:
        fixes.append(("lora", {"lora": True}, "trains adapters instead of every weight"))
    batch = config.per_device_batch_size
    while batch > 1:
        batch //= 2
        accumulation = config.gradient_accumulation_steps * config.per_device_batch_size // batch
        fixes.append(("per_device_batch_size",
                      {"per_device_batch_size": batch, "gradient_accumulation_steps": accumulation},
                      f"the same {config.per_device_batch_size * config.gradient_accumulation_steps} examples per "
                      "step in smaller micro-batches"))
    length = config.max_length
    while length > 128:
        length //= 2
        fixes.append(("max_length", {"max_length": length}, "longer examples are truncated"))
    return fixes


def check_fits(config: MethodConfig, where: Machine | None = None) -> MemoryEstimate | None:
    """Raise :class:`ConfigError` naming the knob to turn when the estimate exceeds the budget; else the estimate.

    The budget is ``config.memory_budget_gb`` when set (0 turns the check off), else ``where`` (this machine).
    """
    if config.memory_budget_gb == 0:
        return None
    where = where or machine()
    if config.memory_budget_gb is not None:
        where = Machine(where.kind, int(config.memory_budget_gb * GB), "the memory_budget_gb setting")
    found = estimate(config, where.kind)
    if found is None or found.total <= where.total_bytes:
        return found
    applied: dict[str, Any] = {}
    costs: dict[str, str] = {}  # knob -> what turning it costs, in the order tried
    advice = "no setting fits: use a smaller model or a machine with more memory"
    for knob, change, cost in _fixes(config):
        applied.update(change)
        costs[knob] = cost
        trial = estimate(dataclasses.replace(config, **applied), where.kind)
        if trial is not None and trial.total <= where.total_bytes:
            settings = ", ".join(f"{k}={v}" for k, v in applied.items())
            advice = f"set {settings} (estimated {trial.total / GB:.2f} GB; costs: {'; '.join(costs.values())})"
            break
    knob = next(iter(costs), "memory_budget_gb")
    raise ConfigError(knob, getattr(config, knob),
                      f"estimated peak memory {found.describe()} exceeds the {where.total_bytes / GB:.1f} GB of "
                      f"{where.name}; {advice}")


def measured_peak() -> dict[str, float]:
    """This process's peak resident memory so far, and the peak allocated GPU memory when CUDA was used (GB)."""
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    peak = {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / GB}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / GB
    return peak
