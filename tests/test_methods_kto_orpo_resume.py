"""KTO, ORPO, and checkpoint/resume on the tiny model (synthetic data: good answers say "marker")."""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from alignment_pipelines.methods import METHODS, ConfigError, config_from_dict, get_method, run_training
from alignment_pipelines.methods.data import load_binary
from alignment_pipelines.methods.kto import KTOMethodConfig
from alignment_pipelines.methods.orpo import ORPOMethodConfig
from alignment_pipelines.methods.sft import SFTMethodConfig
from alignment_pipelines.methods.checkpoints import CHECKPOINT_CONFIG_FILE, latest_checkpoint
from alignment_pipelines.methods.orpo import filter_pairs

TOPICS = "tea coffee water bread rice apple garden city river book".split()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model trains ~30x faster on one thread than on 2 oversubscribed cores shared with other jobs."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _prompt(a, b):
    return [{"role": "user", "content": f"Tell me about {a} and {b}."}]


def synthetic_binary(n_prompts: int = 32, undesirable_per_prompt: int = 1, seed: int = 0) -> pd.DataFrame:
    """Per prompt one desirable completion (with "marker") and ``undesirable_per_prompt`` undesirable ones."""
    rng = random.Random(seed)
    rows = []
    for i in range(n_prompts):
        a, b = rng.sample(TOPICS, 2)
        rows.append({"prompt": _prompt(a, b), "completion": f"marker {a} is good marker.", "label": True})
        for k in range(undesirable_per_prompt):
            rows.append({"prompt": _prompt(a, b), "completion": f"{b} is {'good' if k == 0 else 'bad'}.",
                         "label": False})
    df = pd.DataFrame(rows)
    df.insert(0, "row", range(len(df)))
    return df


def synthetic_pairs(n: int = 32, seed: int = 0) -> pd.DataFrame:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.sample(TOPICS, 2)
        rows.append({"row": i, "prompt": _prompt(a, b), "chosen": f"marker {a} is good marker.",
                     "rejected": f"{b} is good."})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    paths = {}
    paths["binary"] = root / "binary.parquet"
    synthetic_binary().to_parquet(paths["binary"])
    paths["binary_unbalanced"] = root / "binary_unbalanced.parquet"
    synthetic_binary(undesirable_per_prompt=3).to_parquet(paths["binary_unbalanced"])
    pairs = synthetic_pairs()
    paths["pairs"] = root / "pairs.parquet"
    pairs.to_parquet(paths["pairs"])
    dirty = pd.concat([pairs, pd.DataFrame([
        # a prompt that fills max_length alone: TRL's ORPO would cut both answers to nothing (a NaN loss)
        {"row": 99, "prompt": [{"role": "user", "content": "tea " * 600}], "chosen": "marker tea.",
         "rejected": "rice."},
        {"row": 100, "prompt": _prompt("tea", "rice"), "chosen": " same answer ", "rejected": "same answer\n"},
        {"row": 101, "prompt": _prompt("tea", "rice"), "chosen": "", "rejected": "an answer"},
        {"row": 102, "prompt": _prompt("tea", "rice"), "chosen": "an answer", "rejected": "   "},
    ])], ignore_index=True)
    paths["pairs_dirty"] = root / "pairs_dirty.parquet"
    dirty.to_parquet(paths["pairs_dirty"])
    paths["pairs_useless"] = root / "pairs_useless.parquet"
    dirty.iloc[-3:].to_parquet(paths["pairs_useless"])
    # bad binary files
    b = synthetic_binary(4)
    paths["no_label"] = root / "no_label.parquet"
    b.drop(columns=["label"]).to_parquet(paths["no_label"])
    paths["one_label"] = root / "one_label.parquet"
    b[b["label"]].to_parquet(paths["one_label"])
    paths["int_label"] = root / "int_label.jsonl"
    paths["int_label"].write_text("".join(
        json.dumps({"prompt": "Tea?", "completion": c, "label": lab}) + "\n" for c, lab in (("Yes.", 1), ("No.", 0))))
    paths["binary_jsonl"] = root / "binary.jsonl"
    paths["binary_jsonl"].write_text("".join(
        json.dumps({"prompt": "Tea?", "completion": c, "label": lab}) + "\n" for c, lab in (("Yes.", True), ("No.", False))))
    return paths


def series(history, key):
    return [h[key] for h in history if key in h]


def assert_no_leftovers(out: Path) -> None:
    weights = "adapter_model.safetensors" if (out / "adapter_config.json").is_file() else "model.safetensors"
    assert (out / weights).is_file() and (out / "metrics.json").is_file()
    assert not [p for p in out.parent.iterdir() if ".staging-" in p.name or ".old-" in p.name]


# ----------------------------------------------------------------------------------------
# Registry, data, validation (no model is loaded)
# ----------------------------------------------------------------------------------------


def test_registry_entries():
    assert (METHODS["kto"].data, METHODS["kto"].starts_from) == ("binary", "sft")
    assert (METHODS["orpo"].data, METHODS["orpo"].starts_from) == ("pairs", "base")
    assert get_method("kto").config_cls is KTOMethodConfig
    assert get_method("orpo").config_cls is ORPOMethodConfig
    with pytest.raises(ConfigError) as info:
        get_method("kto-typo")
    assert info.value.field == "method" and "'kto'" in str(info.value) and "'orpo'" in str(info.value)


def test_load_binary(data):
    df = load_binary(data["binary"])
    assert list(df.columns) == ["row", "prompt", "completion", "label"] and len(df) == 64
    assert df["label"].dtype == bool and df["label"].sum() == 32
    df = load_binary(data["binary_jsonl"])
    assert list(df["row"]) == [0, 1] and df["prompt"][0] == [{"role": "user", "content": "Tea?"}]


def test_filter_pairs(data):
    from alignment_pipelines.methods.data import load_pairs

    kept, removed = filter_pairs(load_pairs(data["pairs_dirty"]))
    assert removed == 3 and len(kept) == 33  # the long-prompt pair is ORPO's to drop (by tokens)


@pytest.fixture
def no_model_loading(monkeypatch):
    import transformers

    def boom(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before validation failed")

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", boom)


# Rules about the rows themselves: the worker finds them when it reads the data, still before any model loads.
DATA_CONTENT = {"one_label", "int_label", "pairs_useless"}


@pytest.mark.parametrize(
    "method, change, field, words",
    [
        ("kto", {"beta": -0.1}, "beta", "positive"),
        ("kto", {"desirable_weight": 0}, "desirable_weight", "positive"),
        ("kto", {"undesirable_weight": -2.0}, "undesirable_weight", "positive"),
        ("kto", {"desirable_weight": float("nan")}, "desirable_weight", "positive"),
        ("kto", {"loss_type": "sigmoid"}, "loss_type", "kto"),
        ("kto", {"per_device_batch_size": 1}, "per_device_batch_size", "at least 2"),
        ("kto", {"data": "no_label"}, "data", "label"),
        ("kto", {"data": "one_label"}, "data", "both values"),
        ("kto", {"data": "int_label"}, "data", "boolean"),
        ("kto", {"data": "pairs"}, "data", "completion"),  # pairs are not binary feedback
        ("kto", {"eval_data": "one_label"}, "eval_data", "both values"),
        ("orpo", {"beta": -1.0}, "beta", "positive"),
        ("orpo", {"beta": 0}, "beta", "positive"),
        ("orpo", {"data": "pairs_useless"}, "data", "no usable pair"),
        ("orpo", {"data": "binary"}, "data", "chosen"),
        ("sft", {"save_steps": -1, "checkpoint_dir": "CKPT"}, "save_steps", "non-negative"),
        ("dpo", {"checkpoint_dir": "OUT/ckpt", "save_steps": 5}, "checkpoint_dir", "overlap"),
        ("dpo", {"checkpoint_dir": "OUT", "save_steps": 5}, "checkpoint_dir", "overlap"),
    ],
)
def test_bad_config_fails_before_loading(method, change, field, words, tmp_path, tiny_model_dir, data,
                                         no_model_loading):
    out = tmp_path / "out"
    d = {"model": str(tiny_model_dir), "output_dir": str(out),
         "data": str(data["binary"] if method == "kto" else data["pairs"])}
    for k, v in change.items():
        if isinstance(v, str) and v in data:
            v = str(data[v])
        elif isinstance(v, str):
            v = v.replace("OUT", str(out)).replace("CKPT", str(tmp_path / "ckpt"))
        d[k] = v
    if set(map(str, change.values())) & DATA_CONTENT:  # validation reads no data: the worker finds these
        config = config_from_dict(method, d)
        with pytest.raises(ConfigError) as info:
            run_training(method, config)
    else:
        with pytest.raises(ConfigError) as info:
            config_from_dict(method, d)
        with pytest.raises(ConfigError):
            run_training(method, get_method(method).config_cls(**d))
    assert info.value.field == field, str(info.value)
    assert words in str(info.value), str(info.value)
    assert not out.exists()


def test_checkpoint_dir_of_another_config_is_refused(tmp_path, tiny_model_dir, data, no_model_loading):
    ckpt = tmp_path / "ckpt"
    base = {"model": str(tiny_model_dir), "data": str(data["pairs"]), "checkpoint_dir": str(ckpt), "save_steps": 5}
    first = config_from_dict("dpo", {**base, "output_dir": str(tmp_path / "a")})
    ckpt.mkdir()
    (ckpt / CHECKPOINT_CONFIG_FILE).write_text(json.dumps(first.checkpoint_fingerprint()))
    config_from_dict("dpo", {**base, "output_dir": str(tmp_path / "b")})  # other output_dir: same run
    with pytest.raises(ConfigError, match="different config.*beta"):
        config_from_dict("dpo", {**base, "output_dir": str(tmp_path / "b"), "beta": 0.5})


# ----------------------------------------------------------------------------------------
# KTO
# ----------------------------------------------------------------------------------------


def test_kto_lora_rewards_desirable_over_undesirable(tmp_path, tiny_model_dir, data):
    from alignment_pipelines.evaluation import preference_accuracy

    out = tmp_path / "kto"
    config = KTOMethodConfig(model=str(tiny_model_dir), data=str(data["binary"]), output_dir=str(out),
                             max_steps=30, learning_rate=5e-3, beta=0.1)
    result = run_training("kto", config)
    assert result.metrics["steps"] == 30 and result.metrics["resumed_from_step"] == 0
    chosen, rejected = series(result.history, "rewards/chosen"), series(result.history, "rewards/rejected")
    margins = series(result.history, "rewards/margins")
    c_last, r_last = statistics.fmean(chosen[-8:]), statistics.fmean(rejected[-8:])
    print(f"KTO rewards/chosen first={statistics.fmean(chosen[:5]):.3f} last8={c_last:.3f}; rewards/rejected "
          f"first={statistics.fmean(rejected[:5]):.3f} last8={r_last:.3f}; margins first5="
          f"{statistics.fmean(margins[:5]):.3f} last5={statistics.fmean(margins[-5:]):.3f}")
    assert c_last > 0 > r_last and c_last > r_last + 0.3
    assert statistics.fmean(margins[-5:]) > statistics.fmean(margins[:5]) + 0.3
    assert "kl" in result.history[-1]

    # independent check: implicit reward beta*(logp_policy - logp_ref) of the desirable completion vs the
    # undesirable one for the same prompt, computed from the saved model against the start model
    df = load_binary(data["binary"])
    pairs = pd.DataFrame({"prompt": list(df["prompt"][df["label"]]),
                          "chosen": list(df["completion"][df["label"]]),
                          "rejected": list(df["completion"][~df["label"]])})
    after = preference_accuracy(out, tiny_model_dir, pairs, beta=0.1)
    print(f"KTO implicit reward on held pairs: {after}")
    assert after["reward_chosen_mean"] > 0 > after["reward_rejected_mean"]
    assert after["preference_accuracy"] >= 0.9
    assert_no_leftovers(out)


def test_kto_weighted_unbalanced_full_finetune(tmp_path, tiny_model_dir, data):
    """1 desirable : 3 undesirable, weights so that the weighted classes are 50/50; explicit frozen reference."""
    out = tmp_path / "kto-weighted"
    config = KTOMethodConfig(model=str(tiny_model_dir), data=str(data["binary_unbalanced"]), output_dir=str(out),
                             max_steps=12, lora=False, learning_rate=1e-3, desirable_weight=3.0,
                             undesirable_weight=1.0)
    result = run_training("kto", config)
    chosen, rejected = series(result.history, "rewards/chosen"), series(result.history, "rewards/rejected")
    print(f"KTO weighted full-FT: rewards/chosen last5={statistics.fmean(chosen[-5:]):.3f} "
          f"rewards/rejected last5={statistics.fmean(rejected[-5:]):.3f}")
    assert result.metrics["steps"] == 12
    assert statistics.fmean(chosen[-5:]) > statistics.fmean(rejected[-5:])
    saved = json.loads((out / "alignment_config.json").read_text())
    assert saved["desirable_weight"] == 3.0 and saved["lora"] is False
    assert_no_leftovers(out)


# ----------------------------------------------------------------------------------------
# ORPO
# ----------------------------------------------------------------------------------------


def test_orpo_from_base_filters_pairs_and_grows_margin(tmp_path, tiny_model_dir, data):
    out = tmp_path / "orpo"
    config = ORPOMethodConfig(model=str(tiny_model_dir), data=str(data["pairs_dirty"]), output_dir=str(out),
                              max_steps=30, learning_rate=5e-3)
    result = run_training("orpo", config)
    assert result.metrics["filtered_pairs"] == 3 and result.metrics["train_pairs"] == 32
    assert result.metrics["pairs_too_long"] == 1
    assert all(math.isfinite(h["loss"]) for h in result.history if "loss" in h)
    assert json.loads((out / "metrics.json").read_text())["metrics"]["filtered_pairs"] == 3
    margins, lor = series(result.history, "rewards/margins"), series(result.history, "log_odds_ratio")
    assert len(margins) == 30 == len(lor)
    print(f"ORPO rewards/margins first5={statistics.fmean(margins[:5]):.4f} last5={statistics.fmean(margins[-5:]):.4f};"
          f" log_odds_ratio first5={statistics.fmean(lor[:5]):.3f} last5={statistics.fmean(lor[-5:]):.3f};"
          f" loss {result.history[0]['loss']:.3f} -> {result.history[-1]['loss']:.3f}")
    assert statistics.fmean(margins[-5:]) > statistics.fmean(margins[:5]) + 0.03
    assert statistics.fmean(lor[-5:]) > statistics.fmean(lor[:5]) + 0.15
    assert result.metrics["rewards/accuracies"] >= 0.9
    assert_no_leftovers(out)


def test_a_diverged_run_fails_and_saves_nothing(tmp_path, tiny_model_dir, data, monkeypatch):
    """Without the long-prompt filter, ORPO's loss on the pair with no answer token is NaN and so is every weight
    after the step: the run must fail by name, not save (and later register) a NaN model."""
    from alignment_pipelines.methods import orpo
    from alignment_pipelines.methods.training import TrainingDiverged

    monkeypatch.setattr(orpo, "drop_prompts_that_fill", lambda pairs, *rest: (pairs, 0))
    out = tmp_path / "orpo"
    config = ORPOMethodConfig(model=str(tiny_model_dir), data=str(data["pairs_dirty"]), output_dir=str(out),
                              max_steps=6, per_device_batch_size=8, learning_rate=5e-3)
    with pytest.raises(TrainingDiverged, match="non-finite values in .*lora"):
        run_training("orpo", config)
    assert not out.exists() and not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------
# Checkpoints and resume
# ----------------------------------------------------------------------------------------


def _config(method: str, tiny_model_dir, data, out: Path, ckpt: Path, **kw):
    path = data["binary"] if method == "kto" else data["pairs"]
    return get_method(method).config_cls(model=str(tiny_model_dir), data=str(path), output_dir=str(out),
                                         checkpoint_dir=str(ckpt), save_steps=5, max_steps=10,
                                         learning_rate=1e-3, **kw)


@pytest.mark.parametrize("method", ["sft", "dpo", "kto", "orpo"])
def test_crash_then_retry_resumes_from_checkpoint(method, tmp_path, tiny_model_dir, data):
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 7:
                raise RuntimeError("simulated crash")

    ckpt = tmp_path / "ckpt"
    first = tmp_path / "run1" / "model"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training(method, _config(method, tiny_model_dir, data, first, ckpt), callbacks=[Crash()])
    assert not first.exists() and list(first.parent.iterdir()) == []  # nothing finished-looking
    assert latest_checkpoint(ckpt)[1] == 5 and [p.name for p in ckpt.glob("checkpoint-*")] == ["checkpoint-5"]

    second = tmp_path / "run2" / "model"  # the Dagster retry: another run id, another output_dir
    result = run_training(method, _config(method, tiny_model_dir, data, second, ckpt))
    assert result.metrics["resumed_from_step"] == 5
    assert result.metrics["steps"] == 10
    assert [h["step"] for h in result.history] == [6, 7, 8, 9, 10]
    assert json.loads((second / "metrics.json").read_text())["metrics"]["resumed_from_step"] == 5
    assert not ckpt.exists()
    assert_no_leftovers(second)


def test_sigkill_then_retry_resumes_like_an_uninterrupted_run(tmp_path, tiny_model_dir, data):
    """A real SIGKILL of the training process after checkpoint-5 is written; the retry continues from step 5
    and ends where an uninterrupted run ends (same data order, optimizer state and RNG)."""
    ckpt = tmp_path / "ckpt"
    kw = {"lora": False}
    killed_out = tmp_path / "killed" / "model"
    script = textwrap.dedent(f"""
        import os, signal, torch
        torch.set_num_threads(1)
        from transformers import TrainerCallback
        from alignment_pipelines.methods import run_training
        from alignment_pipelines.methods.sft import SFTMethodConfig

        class Kill(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == 7:
                    os.kill(os.getpid(), signal.SIGKILL)

        config = SFTMethodConfig(model={str(tiny_model_dir)!r}, data={str(data['pairs'])!r},
                                 output_dir={str(killed_out)!r}, checkpoint_dir={str(ckpt)!r}, save_steps=5,
                                 max_steps=10, learning_rate=1e-3, lora=False)
        run_training("sft", config, callbacks=[Kill()])
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not killed_out.exists()  # only a hidden staging folder may be left behind by a SIGKILL
    assert all(p.name.startswith(".model.staging-") for p in killed_out.parent.iterdir())
    assert latest_checkpoint(ckpt)[1] == 5

    resumed_out = tmp_path / "retry" / "model"
    resumed = run_training("sft", _config("sft", tiny_model_dir, data, resumed_out, ckpt, **kw))
    assert resumed.metrics["resumed_from_step"] == 5 and resumed.metrics["steps"] == 10
    assert [h["step"] for h in resumed.history] == [6, 7, 8, 9, 10]
    assert not ckpt.exists()

    straight = run_training("sft", SFTMethodConfig(model=str(tiny_model_dir), data=str(data["pairs"]),
                                                   output_dir=str(tmp_path / "straight"), max_steps=10,
                                                   learning_rate=1e-3, lora=False))
    assert straight.metrics["resumed_from_step"] == 0
    a, b = series(resumed.history, "loss"), series(straight.history, "loss")[5:]
    print(f"SFT losses steps 6-10 resumed={[round(x, 4) for x in a]} uninterrupted={[round(x, 4) for x in b]}")
    assert a == pytest.approx(b, rel=1e-3, abs=1e-4)
