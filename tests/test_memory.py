"""Memory-aware training: defaults that start from TRL's, the estimate checked before launch, and the
peak memory and tokens/s every run reports."""

from __future__ import annotations

import dataclasses
import json
import random

import pandas as pd
import pytest

from alignment_pipelines.methods import METHODS, ConfigError, config_from_dict, run_training
from alignment_pipelines.methods import memory
from alignment_pipelines.methods.dpo import DPOMethodConfig
from alignment_pipelines.methods.memory import GB, Machine
from alignment_pipelines.methods.orpo import ORPOMethodConfig
from alignment_pipelines.methods.sft import SFTMethodConfig

BIG_CPU = Machine("cpu", 1000 * 10**9, "RAM")


@pytest.fixture(scope="module")
def pairs_path(tmp_path_factory):
    rng = random.Random(0)
    rows = [{"prompt": [{"role": "user", "content": f"Tell me about {a}{' please' * rng.randint(0, 6)}."}],
             "chosen": f"marker {a} is good marker.", "rejected": f"{a} is fine."}
            for a in "tea coffee water bread rice apple garden city".split() * 2]
    path = tmp_path_factory.mktemp("pairs") / "pairs.parquet"
    pd.DataFrame(rows).to_parquet(path)
    return path


def dpo_config(tiny_model_dir, pairs_path, tmp_path, **changes) -> DPOMethodConfig:
    return DPOMethodConfig(model=str(tiny_model_dir), data=str(pairs_path), output_dir=str(tmp_path / "out"),
                           **changes)


# ---------------------------------------------------------------------------------------------------------
# Defaults
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, trl_config", [("sft", "trl.SFTConfig"), ("dpo", "trl.DPOConfig"),
                                                ("kto", "trl.KTOConfig"),
                                                ("orpo", "trl.experimental.orpo.ORPOConfig")])
def test_gradient_checkpointing_is_on_by_default_as_in_trl(method, trl_config, tmp_path):
    import importlib

    module, name = trl_config.rsplit(".", 1)
    trl_config = getattr(importlib.import_module(module), name)(output_dir=str(tmp_path), use_cpu=True)
    trl_default = trl_config.activation_checkpointing
    assert trl_default is True
    assert METHODS[method].config_cls.defaults()["gradient_checkpointing"] is trl_default


def test_memory_savings_are_ordinary_fields_with_help():
    sft, dpo, kto = (METHODS[m].config_cls for m in ("sft", "dpo", "kto"))
    assert sft.defaults()["packing"] is True
    assert dpo.defaults()["precompute_ref_log_probs"] is True and kto.defaults()["precompute_ref_log_probs"] is True
    assert DPOMethodConfig.defaults()["mixed_precision"] == "auto"
    tunable = {f.name: f.metadata["help"] for f, _ in dpo.tunable_fields()}
    for knob in ("gradient_checkpointing", "precompute_ref_log_probs", "mixed_precision", "liger_kernels",
                 "memory_budget_gb"):
        assert tunable[knob], knob


def test_trl_arguments_follow_the_knobs(tmp_path, tiny_model_dir, pairs_path):
    from alignment_pipelines.methods.dpo import DPO
    from alignment_pipelines.methods.sft import SFT
    from alignment_pipelines.methods.training import common_args

    config = dpo_config(tiny_model_dir, pairs_path, tmp_path)
    args = common_args(config, tmp_path)
    assert args["activation_checkpointing"] is True and args["bf16"] is False and args["use_cpu"] is True
    assert common_args(dataclasses.replace(config, gradient_checkpointing=False), tmp_path)[
        "activation_checkpointing"] is False
    # the reference's log-probs are precomputed only where it would be a second, frozen model
    assert DPO().trl_args(config, None)["precompute_ref_log_probs"] is False  # LoRA: the adapter off is free
    assert DPO().trl_args(dataclasses.replace(config, lora=False), None)["precompute_ref_log_probs"] is True
    assert DPO().trl_args(dataclasses.replace(config, lora=False, precompute_ref_log_probs=False),
                          None)["precompute_ref_log_probs"] is False
    sft = SFTMethodConfig(model=str(tiny_model_dir), data=str(pairs_path), output_dir=str(tmp_path / "o"))
    assert SFT().trl_args(sft, None)["packing"] is True
    assert SFT().trl_args(dataclasses.replace(sft, packing=False), None)["packing"] is False


@pytest.mark.parametrize("change, words", [({"mixed_precision": "fp16"}, "CUDA"), ({"liger_kernels": True}, "CUDA")])
def test_gpu_only_settings_fail_validation_on_a_cpu(change, words, tmp_path, tiny_model_dir, pairs_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match=words) as info:
        config_from_dict("dpo", {"model": str(tiny_model_dir), "data": str(pairs_path),
                                 "output_dir": str(tmp_path / "o"), **change})
    assert info.value.field == next(iter(change))


# ---------------------------------------------------------------------------------------------------------
# The estimate
# ---------------------------------------------------------------------------------------------------------


def test_model_shape_counts_the_weights_without_loading_them(tiny_model_dir):
    from alignment_pipelines.models.loading import load_causal_lm

    shape = memory.model_shape(tiny_model_dir)
    model, _ = load_causal_lm(tiny_model_dir, device="cpu")
    assert shape.parameters == sum(p.numel() for p in model.parameters())  # tied embeddings count once
    assert (shape.hidden, shape.layers, shape.vocab) == (model.config.hidden_size, model.config.num_hidden_layers,
                                                         model.config.vocab_size)


def test_model_shape_of_an_adapter_is_its_start_models(tmp_path, tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    from alignment_pipelines.models.loading import MODEL_CARD, load_causal_lm

    model, _ = load_causal_lm(tiny_model_dir, device="cpu")
    adapter = tmp_path / "adapter"
    get_peft_model(model, LoraConfig(r=4, target_modules="all-linear")).save_pretrained(adapter)
    (adapter / MODEL_CARD).write_text(json.dumps({"role": "policy", "format": "adapter",
                                                  "parent": str(tiny_model_dir)}))
    assert memory.model_shape(adapter) == memory.model_shape(tiny_model_dir)


def test_lora_parameters_match_peft(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    from alignment_pipelines.models.loading import load_causal_lm

    model, _ = load_causal_lm(tiny_model_dir, device="cpu")
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert memory.lora_parameters(memory.model_shape(tiny_model_dir), 8) == trainable


def test_each_saving_lowers_the_estimate_where_it_applies(tmp_path, tiny_model_dir, pairs_path):
    config = dpo_config(tiny_model_dir, pairs_path, tmp_path)
    parts = memory.estimate(config).parts
    plain = memory.estimate(dataclasses.replace(config, gradient_checkpointing=False)).parts
    assert parts["activations"] < plain["activations"]
    # LoRA: the reference is the policy with its adapter off; in full a frozen copy unless precomputed
    assert "reference" not in parts
    full = memory.estimate(dataclasses.replace(config, lora=False, precompute_ref_log_probs=False)).parts
    assert full["reference"] == parts["weights"] and full["optimizer"] > parts["optimizer"]
    assert "reference" not in memory.estimate(dataclasses.replace(config, lora=False)).parts
    # activations and logits grow with the tokens of a micro-batch; weights do not
    longer = memory.estimate(dataclasses.replace(config, max_length=2 * config.max_length)).parts
    assert longer["activations"] > 2 * parts["activations"] and longer["weights"] == parts["weights"]


def test_rl_methods_count_the_reward_model_and_ppo_its_trained_critic(tmp_path, tiny_model_dir, pairs_path):
    from alignment_pipelines.methods.ppo import PPOMethodConfig
    from alignment_pipelines.methods.rloo import RLOOMethodConfig

    shape = memory.model_shape(tiny_model_dir)
    weights = shape.parameters * 4
    online = {"model": str(tiny_model_dir), "data": str(pairs_path), "reward_model": str(tiny_model_dir)}
    perl = memory.estimate(PPOMethodConfig(output_dir=str(tmp_path / "p"), **online)).parts
    assert perl["reward_model"] == weights and "reference" not in perl
    # PERL's critic: the reward model's weights again, frozen, under an adapter that trains (float32, AdamW)
    adapter = memory.lora_parameters(shape, 16) * (4 + 8)
    assert perl["trained_copy"] == weights + adapter + perl["activations"]
    full = memory.estimate(PPOMethodConfig(output_dir=str(tmp_path / "f"), lora=False, **online)).parts
    # policy, reference, reward model, and a critic with its gradients, AdamW moments and activations
    assert full["reference"] == full["reward_model"] == weights
    assert full["trained_copy"] == memory.model_shape(tiny_model_dir).parameters * (2 * 4 + 8) + full["activations"]
    rloo = memory.estimate(RLOOMethodConfig(output_dir=str(tmp_path / "r"), lora=False, **online)).parts
    assert rloo["reward_model"] == weights and "trained_copy" not in rloo
    assert memory.estimate(RLOOMethodConfig(output_dir=str(tmp_path / "r"), lora=False, **online)).total < \
        memory.estimate(PPOMethodConfig(output_dir=str(tmp_path / "f"), lora=False, **online)).total


def test_orpo_holds_every_logit_and_dpo_a_tile(tmp_path, tiny_model_dir, pairs_path):
    shape = memory.model_shape(tiny_model_dir)
    orpo = ORPOMethodConfig(model=str(tiny_model_dir), data=str(pairs_path), output_dir=str(tmp_path / "o"))
    tokens = orpo.per_device_batch_size * 2 * orpo.max_length  # chosen and rejected
    assert memory.estimate(orpo).parts["lm_head"] == tokens * shape.vocab * 4 * memory.FULL_LOGITS_COPIES
    dpo = dpo_config(tiny_model_dir, pairs_path, tmp_path)
    tile_tokens, tile_vocab = memory.CPU_HEAD_TILE  # score_answers_only: small tiles on a CPU
    tile = min(tokens, tile_tokens) * min(shape.vocab, tile_vocab) * 4
    assert memory.estimate(dpo).parts["lm_head"] == tile * memory.HEAD_TILE_COPIES_CPU


def test_scoring_answers_only_on_a_cpu_changes_no_log_prob_or_gradient(tmp_path, tiny_model_dir, pairs_path):
    import torch
    import trl.trainer.utils as head
    from trl.trainer.utils import add_fused_lm_head

    from alignment_pipelines.methods.training import answers_only_head
    from alignment_pipelines.models.loading import load_causal_lm

    model, _ = load_causal_lm(tiny_model_dir, device="cpu")
    add_fused_lm_head(model)
    ids = torch.randint(5, 200, (3, 40))
    labels = ids.clone()
    labels[:, :30] = -100  # a prompt: no label

    def run():
        model.zero_grad()
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        out.log_probs.sum().backward()
        return out.log_probs.detach(), model.model.embed_tokens.weight.grad.clone()

    everywhere = run()
    with answers_only_head(dpo_config(tiny_model_dir, pairs_path, tmp_path)):
        assert head._use_triton(torch.device("cpu"))
        answers_only = run()
    assert not head._use_triton(torch.device("cpu"))  # TRL's setting is back
    for a, b in zip(everywhere, answers_only):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------------------
# Failing fast
# ---------------------------------------------------------------------------------------------------------


def _budget_between(config, fits_with: dict) -> float:
    """A budget in GB that ``config`` exceeds but ``config`` changed by ``fits_with`` fits."""
    low = memory.estimate(dataclasses.replace(config, **fits_with)).total
    high = memory.estimate(config).total
    assert low < high
    return (low + high) / 2 / GB


def test_check_fits_names_gradient_checkpointing_first(tmp_path, tiny_model_dir, pairs_path):
    config = dpo_config(tiny_model_dir, pairs_path, tmp_path, gradient_checkpointing=False, max_length=2048)
    config.memory_budget_gb = _budget_between(config, {"gradient_checkpointing": True})
    with pytest.raises(ConfigError) as info:
        memory.check_fits(config, BIG_CPU)
    assert info.value.field == "gradient_checkpointing"
    assert "set gradient_checkpointing=True" in str(info.value) and "exceeds" in str(info.value)


def test_check_fits_halves_the_micro_batch_and_keeps_the_examples_per_step(tmp_path, tiny_model_dir, pairs_path):
    config = dpo_config(tiny_model_dir, pairs_path, tmp_path, per_device_batch_size=8, max_length=4096)
    halved = dataclasses.replace(config, per_device_batch_size=4, gradient_accumulation_steps=2)
    config.memory_budget_gb = _budget_between(halved, {"per_device_batch_size": 2, "gradient_accumulation_steps": 4})
    with pytest.raises(ConfigError) as info:
        memory.check_fits(config, BIG_CPU)
    assert info.value.field == "per_device_batch_size"
    assert "per_device_batch_size=2, gradient_accumulation_steps=4" in str(info.value)
    assert "the same 8 examples per step" in str(info.value)


def test_check_fits_in_full_fine_tuning_names_the_reference_then_lora(tmp_path, tiny_model_dir, pairs_path):
    config = dpo_config(tiny_model_dir, pairs_path, tmp_path, lora=False, precompute_ref_log_probs=False)
    config.memory_budget_gb = _budget_between(config, {"precompute_ref_log_probs": True})
    with pytest.raises(ConfigError) as info:
        memory.check_fits(config, BIG_CPU)
    assert info.value.field == "precompute_ref_log_probs"


def test_the_machine_is_the_budget_unless_one_is_set(tmp_path, tiny_model_dir, pairs_path):
    config = dpo_config(tiny_model_dir, pairs_path, tmp_path)
    small = Machine("cpu", int(memory.estimate(config).total / 2), "RAM")
    with pytest.raises(ConfigError, match="GB of RAM"):
        memory.check_fits(config, small)
    assert memory.check_fits(dataclasses.replace(config, memory_budget_gb=0), small) is None  # 0: no check
    assert memory.check_fits(dataclasses.replace(config, memory_budget_gb=100.0), small).total < 100 * GB


def test_validation_fails_before_any_model_loads(tmp_path, tiny_model_dir, pairs_path, monkeypatch):
    import transformers

    def boom(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before validation failed")

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", boom)
    values = {"model": str(tiny_model_dir), "data": str(pairs_path), "output_dir": str(tmp_path / "o"),
              "gradient_checkpointing": False, "max_length": 8192, "memory_budget_gb": 2.0}
    with pytest.raises(ConfigError) as info:
        config_from_dict("dpo", values)
    assert info.value.field == "gradient_checkpointing"
    with pytest.raises(ConfigError):
        run_training("dpo", DPOMethodConfig(**values))
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------------------
# What every run reports
# ---------------------------------------------------------------------------------------------------------


def test_a_run_reports_its_peak_memory_and_tokens_per_second(tmp_path, tiny_model_dir, pairs_path):
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def __init__(self):
            self.logs = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append((state.global_step, dict(logs or {})))

    recorder = Recorder()
    config = dpo_config(tiny_model_dir, pairs_path, tmp_path, max_steps=3, max_length=64)
    metrics = run_training("dpo", config, callbacks=[recorder]).metrics
    assert metrics["peak_rss_gb"] > 0.1 and metrics["peak_memory_gb"] == metrics["peak_rss_gb"]
    assert metrics["memory_estimate_gb"] == pytest.approx(memory.estimate(config).total / GB)
    # non-padding tokens of chosen and rejected, prompt included: more than the answers, at most the padded batch
    assert 3 * 4 * 2 * 8 < metrics["train_tokens"] <= 3 * 4 * 2 * 64
    assert metrics["tokens_per_second"] == pytest.approx(metrics["train_tokens"] / metrics["train_runtime"])
    # the callbacks (MLflow, Dagster) get the estimate before the first step and the measurements at the end
    assert recorder.logs[0] == (0, {"memory_estimate_gb": metrics["memory_estimate_gb"]})
    step, last = recorder.logs[-1]
    assert step == 3 and last["peak_rss_gb"] == metrics["peak_rss_gb"]
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())["metrics"]
    assert saved["tokens_per_second"] == metrics["tokens_per_second"]


def test_packed_sft_trains_on_full_rows(tmp_path, tiny_model_dir, pairs_path):
    """Packing puts several short examples in each row, so a step trains on more real tokens, none of them padding."""
    def run(packing):
        config = SFTMethodConfig(model=str(tiny_model_dir), data=str(pairs_path), output_dir=str(tmp_path / str(packing)),
                                 max_steps=2, max_length=256, packing=packing)
        return run_training("sft", config).metrics

    packed, padded = run(True), run(False)
    assert packed["train_tokens"] > 1.5 * padded["train_tokens"]
    assert packed["train_tokens"] <= 2 * 4 * 256  # at most full rows


def test_full_dpo_with_a_precomputed_reference_loads_no_second_model(tmp_path, tiny_model_dir, pairs_path,
                                                                     monkeypatch):
    from alignment_pipelines.methods import training

    def no_reference(*args, **kwargs):
        raise AssertionError("a frozen reference was loaded although its log-probs are precomputed")

    monkeypatch.setattr(training, "load_frozen", no_reference)
    config = dpo_config(tiny_model_dir, pairs_path, tmp_path, lora=False, max_steps=3, learning_rate=1e-3,
                        eval_data=str(pairs_path))
    metrics = run_training("dpo", config).metrics
    assert metrics["steps"] == 3 and "eval_rewards/margins" in metrics
