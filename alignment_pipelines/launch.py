"""How a training worker starts: its config as data, the command (plain Python or ``accelerate launch``), its rank.

The launcher resources (``resources/launcher.py``: a subprocess here, a Kubernetes pod at scale) all run the same
command, built here::

    [accelerate launch --multi_gpu --num_processes N ... -m] alignment_pipelines.cli train METHOD --config-json JSON

The config travels as data (``--config-json``), never as a file on the orchestrator's disk. Its paths (start model,
data, output, checkpoints, stores) are relative to the data root wherever they lie under it, and the worker resolves
them against its own data root (``ALIGNMENT_PIPELINES_HOME``), so the same command runs on this machine and in a pod
that mounts the data root elsewhere.

Several processes: ``accelerate launch`` starts ``num_processes`` copies (torchrun underneath); each is one data-parallel
rank. Without CUDA they share the CPU over gloo. (accelerate's own ``--cpu`` flag starts a single process whatever
``--num_processes`` says, in accelerate 1.x: ``--multi_gpu`` is what spawns the ranks, and the worker picks gloo on a
CPU.) Only rank 0 reports to Pipes and MLflow and writes the model; the orchestrator registers it, once.

This module imports no Dagster and no torch.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

WORKER_MODULE = "alignment_pipelines.cli"
CONFIG_JSON_FLAG = "--config-json"
DEEPSPEED_PRESETS = ("zero2", "zero3")
DEEPSPEED_FILE = "deepspeed.json"  # written beside the run's output (under the data root) when a preset is named


def process_rank() -> int:
    """This process's global rank under torchrun / ``accelerate launch`` (0 when launched alone)."""
    return int(os.environ.get("RANK", "0") or 0)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_main_process() -> bool:
    return process_rank() == 0


# --------------------------------------------------------------------------------------------------
# Which methods can run data-parallel
# --------------------------------------------------------------------------------------------------


def supports_multi_process(spec) -> bool:
    """A method trained by :class:`~alignment_pipelines.methods.training.TRLMethod` runs data-parallel through the
    TRL trainer's accelerator; a method with its own loop (PPO, online DPO) runs in one process."""
    from alignment_pipelines.methods.training import TRLMethod

    return isinstance(getattr(spec.train, "__self__", None), TRLMethod)


def check_multi_process(spec, config) -> None:
    """Refuse ``num_processes`` > 1 (or DeepSpeed) for a method that cannot use the extra ranks."""
    from alignment_pipelines.methods.config import ConfigError

    wants = getattr(config, "num_processes", 1) > 1 or getattr(config, "deepspeed", None)
    if wants and not supports_multi_process(spec):
        field = "num_processes" if getattr(config, "num_processes", 1) > 1 else "deepspeed"
        raise ConfigError(field, getattr(config, field),
                          f"method {spec.name!r} trains with its own loop in one process; only the TRL-trainer "
                          "methods run with accelerate across processes")


# --------------------------------------------------------------------------------------------------
# Config as data, paths relative to the data root
# --------------------------------------------------------------------------------------------------


def path_fields(config_cls) -> list[str]:
    """The fields that hold paths: the wiring the asset fills in, and options declared with ``path=True``."""
    return [f.name for f, _ in config_cls.field_specs()
            if f.metadata.get("wiring") or f.metadata.get("path")]


def relative_to_root(values: dict[str, Any], config_cls, root: str | os.PathLike) -> dict[str, Any]:
    """``values`` with every path field that lies under ``root`` written relative to it (POSIX separators).

    A path outside the data root (a base model folder elsewhere on this machine) stays absolute: it resolves only
    where the same path exists, which the Kubernetes launcher refuses unless told otherwise.
    """
    root_path = Path(root).resolve()
    out = dict(values)
    for name in path_fields(config_cls):
        value = out.get(name)
        if not value or not isinstance(value, (str, os.PathLike)):
            continue
        path = Path(value)
        if not path.is_absolute():
            continue
        try:
            out[name] = PurePosixPath(*path.resolve().relative_to(root_path).parts).as_posix() or "."
        except ValueError:
            pass
    return out


def outside_root(values: dict[str, Any], config_cls) -> dict[str, str]:
    """The path fields still absolute after :func:`relative_to_root`: they do not travel to another machine."""
    return {name: str(values[name]) for name in path_fields(config_cls)
            if isinstance(values.get(name), str) and Path(values[name]).is_absolute()
            and not _is_preset(name, values[name])}


def resolve_from_root(values: dict[str, Any], config_cls, root: str | os.PathLike) -> dict[str, Any]:
    """The worker's side of :func:`relative_to_root`: relative path fields joined onto this machine's data root."""
    out = dict(values)
    for name in path_fields(config_cls):
        value = out.get(name)
        if isinstance(value, str) and value and not Path(value).is_absolute() and not _is_preset(name, value):
            out[name] = str(Path(root) / value)
    return out


def _is_preset(name: str, value: str) -> bool:
    return name == "deepspeed" and value in DEEPSPEED_PRESETS


def config_json(values: dict[str, Any]) -> str:
    """The config as the one command-line argument the worker takes (compact, keys sorted: stable in pod specs)."""
    return json.dumps(values, sort_keys=True, separators=(",", ":"), default=str)


# --------------------------------------------------------------------------------------------------
# DeepSpeed
# --------------------------------------------------------------------------------------------------


def deepspeed_config(stage: int) -> dict[str, Any]:
    """A ZeRO-2 or ZeRO-3 config whose batch sizes, precision and optimizer follow the trainer's own arguments
    ("auto": transformers fills them in from the method config)."""
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
                            "reduce_bucket_size": "auto"}
    if stage == 3:
        zero |= {"stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
                 "stage3_gather_16bit_weights_on_model_save": True}
    return {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
            "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}, "zero_optimization": zero}


def write_deepspeed_config(choice: str | None, folder: str | os.PathLike) -> Path | None:
    """The DeepSpeed config file for ``choice``: a preset written into ``folder``, or the file the config names."""
    if not choice:
        return None
    if choice in DEEPSPEED_PRESETS:
        target = Path(folder) / DEEPSPEED_FILE
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(deepspeed_config(int(choice[-1])), indent=2))
        return target
    return Path(choice)


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on this machine now, for torchrun's rendezvous (two local runs must not share one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def uses_accelerate(num_processes: int, deepspeed: str | None) -> bool:
    return num_processes > 1 or bool(deepspeed)


def worker_command(method: str, values: dict[str, Any], *, python: str = "python", num_processes: int = 1,
                   mixed_precision: str = "auto", deepspeed_file: str | None = None,
                   main_process_port: int | None = None, extra_accelerate_args: Sequence[str] = ()) -> list[str]:
    """The worker's command line. One process: ``python -m alignment_pipelines.cli train ...``. Several, or
    DeepSpeed: the same module under ``accelerate launch``.

    ``mixed_precision`` "auto" is left to the worker, which picks bf16 on a GPU that has it (the trainer's
    arguments set accelerate's precision); an explicit choice is passed to accelerate as well.
    """
    train = [WORKER_MODULE, "train", method, CONFIG_JSON_FLAG, config_json(values)]
    if not uses_accelerate(num_processes, deepspeed_file):
        return [python, "-m", *train]
    launch = [python, "-m", "accelerate.commands.accelerate_cli", "launch", "--num_processes", str(num_processes),
              "--num_machines", "1", "--dynamo_backend", "no"]
    if deepspeed_file:
        launch += ["--use_deepspeed", "--deepspeed_config_file", str(deepspeed_file)]
    else:
        launch += ["--multi_gpu"]  # torchrun's ranks; on a CPU the trainer joins them over gloo
    if mixed_precision != "auto":
        launch += ["--mixed_precision", mixed_precision]
    if main_process_port is not None:
        launch += ["--main_process_port", str(main_process_port)]
    return [*launch, *extra_accelerate_args, "-m", *train]
