"""Training methods on the tiny model: configs, data loading, SFT, DPO, output folders."""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import pandas as pd
import pytest

from alignment_pipelines.methods import METHODS, ConfigError, TrainResult, config_from_dict, get_method, run_training
from alignment_pipelines.methods.data import load_pairs, to_preference_dataset, to_sft_dataset
from alignment_pipelines.methods.dpo import DPOMethodConfig
from alignment_pipelines.methods.sft import SFTMethodConfig

TOPICS = "tea coffee water bread rice apple garden city river book".split()


def synthetic_pairs(n: int = 32, seed: int = 0) -> pd.DataFrame:
    """A clear preference: chosen answers contain the word "marker", rejected ones do not."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.sample(TOPICS, 2)
        rows.append({
            "row": i,
            "prompt": [{"role": "user", "content": f"Tell me about {a} and {b}."}],
            "chosen": f"marker {a} is good marker.",
            "rejected": f"{b} is good.",
        })
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def pairs_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pairs") / "pairs.parquet"
    synthetic_pairs().to_parquet(path)
    return path


def losses(history, key="loss"):
    return [h[key] for h in history if key in h]


def assert_adapter_model(out: Path, base: Path) -> None:
    """A LoRA adapter that names its start model, loads onto it, and changes its outputs."""
    import torch

    from alignment_pipelines.models.loading import load_causal_lm, read_model_card

    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "metrics.json"} <= names
    assert "model.safetensors" not in names  # no copy of the base weights
    assert read_model_card(out) | {"method": None} == {"role": "policy", "format": "adapter",
                                                        "parent": str(base.resolve()), "method": None}
    ids = torch.tensor([[5, 6, 7, 8]])
    trained, _ = load_causal_lm(out, device="cpu")
    start, _ = load_causal_lm(base, device="cpu")
    assert not torch.allclose(trained(ids).logits, start(ids).logits), "training changed no output"
    assert not [p for p in out.parent.iterdir() if ".staging-" in p.name or ".old-" in p.name]


def assert_merged_model(out: Path, base: Path) -> None:
    """A plain safetensors folder that loads alone: no adapter files, weights changed, metrics last."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = {p.name for p in out.iterdir()}
    assert "model.safetensors" in names and "config.json" in names and "metrics.json" in names
    assert not any(n.startswith("adapter_") for n in names), names
    assert not list(out.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    assert not hasattr(model, "peft_config")
    new, old = load_file(out / "model.safetensors"), load_file(base / "model.safetensors")
    assert set(new) == set(old)  # same parameter names: nothing LoRA-shaped left behind
    assert any(not torch.equal(new[k], old[k]) for k in old), "training changed no weight"
    # no staging leftovers next to the output
    assert not [p for p in out.parent.iterdir() if ".staging-" in p.name or ".old-" in p.name]


# ----------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------


def test_load_pairs_parquet_and_jsonl(tmp_path, pairs_path):
    df = load_pairs(pairs_path)
    assert list(df.columns[:4]) == ["row", "prompt", "chosen", "rejected"] and len(df) == 32
    assert df["prompt"][0] == [{"role": "user", "content": df["prompt"][0][0]["content"]}]

    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text(
        json.dumps({"prompt": "Hi?", "chosen": "Hello.", "rejected": "No."}) + "\n\n"
        + json.dumps({"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tea?"}],
                      "chosen": "Yes.", "rejected": "Maybe."}) + "\n"
    )
    df = load_pairs(jsonl)
    assert list(df["row"]) == [0, 1]
    assert df["prompt"][0] == [{"role": "user", "content": "Hi?"}]
    pref = to_preference_dataset(df)
    assert pref[1]["prompt"][-1] == {"role": "user", "content": "Tea?"}
    assert pref[1]["chosen"] == [{"role": "assistant", "content": "Yes."}]
    assert pref[1]["rejected"] == [{"role": "assistant", "content": "Maybe."}]
    assert to_sft_dataset(df)[0] == {"prompt": [{"role": "user", "content": "Hi?"}],
                                     "completion": [{"role": "assistant", "content": "Hello."}]}
    assert to_sft_dataset(df, completion_only=False)[0]["messages"][-1] == {"role": "assistant", "content": "Hello."}

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"}))
    with pytest.raises(ConfigError, match="user turn"):
        load_pairs(bad)


# ----------------------------------------------------------------------------------------
# Config validation: fails before any model is loaded
# ----------------------------------------------------------------------------------------


@pytest.fixture
def no_model_loading(monkeypatch):
    import transformers

    def boom(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before validation failed")

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", boom)


@pytest.mark.parametrize(
    "method, change, field",
    [
        ("dpo", {"beta": -0.1}, "beta"),
        ("dpo", {"beta": 0}, "beta"),
        ("dpo", {"loss_type": "bogus"}, "loss_type"),
        ("dpo", {"data": "MISSING"}, "data"),
        ("dpo", {"data": "NO_REJECTED"}, "data"),
        ("dpo", {"eval_data": "MISSING"}, "eval_data"),
        ("dpo", {"model": "MISSING"}, "model"),
        ("sft", {"max_steps": 0}, "max_steps"),
        ("sft", {"learning_rate": -1.0}, "learning_rate"),
        ("sft", {"lora_dropout": 1.5}, "lora_dropout"),
        ("sft", {"data": "NO_CHOSEN"}, "data"),
        ("sft", {"epochs": 3}, "config"),  # unknown key
    ],
)
def test_bad_config_fails_before_loading(method, change, field, tmp_path, tiny_model_dir, pairs_path,
                                         no_model_loading):
    no_rejected = tmp_path / "no_rejected.parquet"
    synthetic_pairs(4).drop(columns=["rejected"]).to_parquet(no_rejected)
    no_chosen = tmp_path / "no_chosen.jsonl"
    no_chosen.write_text(json.dumps({"prompt": "hi", "completion": "x"}) + "\n")
    aliases = {"MISSING": str(tmp_path / "nope.parquet"), "NO_REJECTED": str(no_rejected),
               "NO_CHOSEN": str(no_chosen)}
    d = {"model": str(tiny_model_dir), "data": str(pairs_path), "output_dir": str(tmp_path / "out")}
    d.update({k: aliases.get(v, v) if isinstance(v, str) else v for k, v in change.items()})
    with pytest.raises(ConfigError) as info:
        config_from_dict(method, d)
    assert info.value.field == field, str(info.value)
    assert field in str(info.value)
    if change.get("data") == "NO_REJECTED":
        assert "rejected" in str(info.value)
    # the same config built directly fails in run_training, before any training
    if field != "config":
        config = get_method(method).config_cls(**d)
        with pytest.raises(ConfigError):
            run_training(method, config)
    assert not (tmp_path / "out").exists()


def test_registry_and_unknown_method(tmp_path, tiny_model_dir, pairs_path):
    assert {"sft", "dpo"} <= set(METHODS)
    assert (METHODS["sft"].data, METHODS["sft"].starts_from, METHODS["sft"].needs) == ("pairs", "base", ())
    assert (METHODS["dpo"].data, METHODS["dpo"].starts_from) == ("pairs", "sft")
    assert get_method("dpo").config_cls is DPOMethodConfig
    with pytest.raises(ConfigError) as unknown:
        get_method("ppo-typo")
    assert f"known: {sorted(METHODS)}" in str(unknown.value)
    d = {"model": str(tiny_model_dir), "data": str(pairs_path), "output_dir": str(tmp_path / "o"), "beta": 0.2,
         "learning_rate": 1}
    config = config_from_dict("dpo", d)
    assert isinstance(config, DPOMethodConfig) and config.learning_rate == 1.0
    assert DPOMethodConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="SFTMethodConfig"):
        run_training("sft", config)  # a DPO config for SFT
    r = TrainResult("dpo", "x", {"loss": 0.5}, [{"step": 1, "loss": 0.5}])
    assert TrainResult.from_json(r.to_json()) == r


# ----------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------


def test_sft_full_finetune_loss_goes_down(tmp_path, tiny_model_dir, pairs_path):
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def __init__(self):
            self.logs = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs or {}))

    recorder = Recorder()
    out = tmp_path / "sft"
    config = SFTMethodConfig(model=str(tiny_model_dir), data=str(pairs_path), output_dir=str(out),
                             max_steps=20, lora=False, learning_rate=1e-3)
    result = run_training("sft", config, callbacks=[recorder])
    loss = losses(result.history)
    assert len(loss) == 20 and [h["step"] for h in result.history] == list(range(1, 21))
    first, last = statistics.fmean(loss[:5]), statistics.fmean(loss[-5:])
    print(f"SFT loss first5={first:.3f} last5={last:.3f}")
    assert last < 0.8 * first
    assert result.metrics["steps"] == 20 and "train_loss" in result.metrics
    assert len([log for log in recorder.logs if "loss" in log]) == 20  # callbacks pass through
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["method"] == "sft" and saved["metrics"]["steps"] == 20
    assert json.loads((out / "alignment_config.json").read_text())["lora"] is False
    assert_merged_model(out, tiny_model_dir)


def test_dpo_lora_grows_reward_margin(tmp_path, tiny_model_dir, pairs_path):
    from alignment_pipelines.evaluation import preference_accuracy

    pairs = load_pairs(pairs_path)
    before = preference_accuracy(tiny_model_dir, tiny_model_dir, pairs, beta=0.1)
    assert before["reward_margin_mean"] == 0.0 and before["pairs"] == 32

    out = tmp_path / "dpo"
    config = DPOMethodConfig(model=str(tiny_model_dir), data=str(pairs_path), output_dir=str(out),
                             max_steps=20, learning_rate=5e-3, beta=0.1)
    result = run_training("dpo", config)
    margins = losses(result.history, "rewards/margins")
    assert len(margins) == 20
    first, last = statistics.fmean(margins[:5]), statistics.fmean(margins[-5:])
    print(f"DPO rewards/margins first5={first:.3f} last5={last:.3f}; loss {result.history[0]['loss']:.3f}"
          f" -> {result.history[-1]['loss']:.3f}")
    assert last > first + 0.3
    assert result.metrics["rewards/accuracies"] >= 0.9
    for key in ("rewards/margins", "rewards/chosen", "rewards/rejected", "loss"):
        assert key in result.metrics

    after = preference_accuracy(out, tiny_model_dir, pairs, beta=0.1)
    print(f"DPO implicit reward: before={before} after={after}")
    assert after["reward_margin_mean"] > before["reward_margin_mean"] + 0.3
    assert after["preference_accuracy"] >= 0.9
    assert_adapter_model(out, tiny_model_dir)


def test_lora_sft_and_full_dpo_write_merged_models(tmp_path, tiny_model_dir, pairs_path):
    out = tmp_path / "sft-lora"
    for _ in range(2):  # a second run replaces the first atomically
        result = run_training("sft", SFTMethodConfig(
            model=str(tiny_model_dir), data=str(pairs_path), output_dir=str(out), max_steps=3, learning_rate=1e-2,
            lora_output="merged", eval_data=str(pairs_path), evaluate_at_end=False))
    assert_merged_model(out, tiny_model_dir)
    assert not [k for k in result.metrics if k.startswith("eval_")]  # no pass over eval_data when told so

    out = tmp_path / "dpo-full"
    result = run_training("dpo", DPOMethodConfig(model=str(tiny_model_dir), data=str(pairs_path),
                                                 output_dir=str(out), max_steps=3, lora=False, learning_rate=1e-3,
                                                 eval_data=str(pairs_path)))
    assert "eval_rewards/margins" in result.metrics
    assert_merged_model(out, tiny_model_dir)


def test_failed_training_leaves_no_model(tmp_path, tiny_model_dir, pairs_path):
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise RuntimeError("simulated crash")

    out = tmp_path / "crashed"
    config = DPOMethodConfig(model=str(tiny_model_dir), data=str(pairs_path), output_dir=str(out), max_steps=5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training("dpo", config, callbacks=[Crash()])
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
