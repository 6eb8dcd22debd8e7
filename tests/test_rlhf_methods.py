"""RLHF on the platform, on the tiny model: the reward model, PPO and RLOO through the registry and the CLI.

The tiny random model samples almost uniformly from its 512 tokens, so it rarely ends an answer early: at first every
answer runs to ``max_new_tokens`` and pays the missing-EOS penalty (on by default). Under "shorter is better"
(``length:40``), where an empty answer scores lowest, its best move is a short answer that ends: a token or two,
then EOS. A policy learns that within a few dozen steps at a KL of about one forced EOS token (-log p_ref(EOS) ~
log 512 ~ 6.2 nats) rather than of a whole answer, and never collapses to EOS alone, which used to score best.

Those learning tests train in full. LoRA cannot reach that optimum on this model: the adapters leave the final
RMSNorm and the (tied) LM head alone, so the last hidden state keeps a norm of about sqrt(64) = 8 and EOS's logit
can move by at most |w_EOS| * 8 ~ 0.17 * 8 ~ 1.4, from p(EOS) ~ 1/512 to a few percent. LoRA runs are checked for
what they must do instead: the disabled adapter is the reference (KL 0 at step 1), resuming, the CLI.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pandas as pd
import pytest
import torch

from alignment_pipelines.methods import ConfigError, config_from_dict, run_training
from alignment_pipelines.methods.ppo import PPOMethodConfig
from alignment_pipelines.methods.reward import RewardMethodConfig, pair_scores, pairwise_stats

TOPICS = "tea coffee water bread rice apple garden city river book dog cat bird sea sun moon".split()


@pytest.fixture(autouse=True)
def one_thread():
    """Steady numbers on a shared machine: one intra-op thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def marker_pairs(n: int, seed: int) -> pd.DataFrame:
    """A clear preference: the chosen answer says "yes good", the rejected one "no bad"; the rest is shared."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.sample(TOPICS, 2)
        rows.append({"row": i, "prompt": [{"role": "user", "content": f"Is {a} like {b}?"}],
                     "chosen": f"The {a} and the {b}: yes good.", "rejected": f"The {a} and the {b}: no bad."})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rlhf-data")
    marker_pairs(64, seed=0).to_parquet(folder / "train.parquet")
    marker_pairs(32, seed=1).to_parquet(folder / "eval.parquet")
    return folder


def reward_config(tiny_model_dir, data, output, **overrides) -> RewardMethodConfig:
    settings = dict(model=str(tiny_model_dir), data=str(data / "train.parquet"), eval_data=str(data / "eval.parquet"),
                    output_dir=str(output), max_steps=24, learning_rate=3e-3, per_device_batch_size=8,
                    gradient_checkpointing=False)
    return config_from_dict("reward", settings | overrides)


@pytest.fixture(scope="module")
def reward_model(tiny_model_dir, data, tmp_path_factory):
    """A LoRA reward model trained on the marker pairs, and its result."""
    output = tmp_path_factory.mktemp("rm") / "reward"
    return output, run_training("reward", reward_config(tiny_model_dir, data, output))


def mean(history, key, rows):
    values = [h[key] for h in history[rows]]
    return sum(values) / len(values)


# ---------------------------------------------------------------------------------------------- reward model


def test_reward_model_learns_the_preference_and_its_adapter_reloads_to_the_same_scores(reward_model, data):
    from alignment_pipelines.methods.data import load_pairs, to_preference_dataset
    from alignment_pipelines.models.loading import load_model, read_model_card

    output, result = reward_model
    print({k: round(v, 3) for k, v in result.metrics.items()})
    assert result.metrics["eval_accuracy"] >= 0.9 and result.metrics["eval_mean_margin"] > 1.0
    # the whole eval split, which it never trained on; training pairs are not reported under another name
    assert result.metrics["eval_pairs_scored"] == result.metrics["eval_pairs_total"] == 32
    assert result.metrics["eval_pairs_sampled"] == 0 and result.metrics["eval_pairs_truncated"] == 0
    assert not {"train_pairs_accuracy", "pairwise_accuracy"} & set(result.metrics)
    assert result.artifacts == {"score_distributions": "scores.png"}
    assert (output / "scores.png").read_bytes().startswith(b"\x89PNG")
    assert read_model_card(output)["role"] == "reward" and read_model_card(output)["format"] == "adapter"
    assert not (output / "model.safetensors").exists()  # the adapter alone, score head inside it

    model, tokenizer = load_model(output, "reward", dtype="float32", device="cpu")
    eval_pairs = to_preference_dataset(load_pairs(data / "eval.parquet"))
    reloaded = pairwise_stats(*pair_scores(model, tokenizer, eval_pairs))
    assert reloaded["accuracy"] == result.metrics["eval_accuracy"]
    assert reloaded["mean_margin"] == pytest.approx(result.metrics["eval_mean_margin"], abs=1e-5)


def test_full_reward_model_learns_too(tiny_model_dir, data, tmp_path):
    result = run_training("reward", reward_config(tiny_model_dir, data, tmp_path / "rm", lora=False,
                                                  learning_rate=1e-3, max_steps=16))
    print({k: round(v, 3) for k, v in result.metrics.items()})
    assert result.metrics["eval_accuracy"] >= 0.9
    assert (tmp_path / "rm" / "model.safetensors").is_file()


def test_the_report_scores_every_held_out_pair_long_ones_truncated_not_dropped(tiny_model_dir, data, tmp_path):
    """TRL drops pairs longer than max_length from training; the report still scores them, on their last tokens."""
    pairs = marker_pairs(12, seed=2)
    long = pairs.index % 3 == 0  # 4 of 12, far beyond max_length; the others fit
    pairs.loc[long, "chosen"] = pairs.loc[long, "chosen"] + " yes good" * 40
    pairs.loc[long, "rejected"] = pairs.loc[long, "rejected"] + " no bad" * 40
    pairs.to_parquet(tmp_path / "eval.parquet")
    result = run_training("reward", reward_config(tiny_model_dir, data, tmp_path / "rm", max_steps=2, max_length=48,
                                                  eval_data=str(tmp_path / "eval.parquet")))
    metrics = result.metrics
    assert metrics["eval_pairs_scored"] == metrics["eval_pairs_total"] == 12 and metrics["eval_pairs_sampled"] == 0
    assert metrics["eval_pairs_truncated"] == 4
    assert 0 <= metrics["eval_accuracy"] <= 1 and "eval_mean_margin" in metrics
    assert not [name for name in metrics if name.startswith("train_pairs_") and name != "train_pairs_too_long"]


def test_the_report_samples_a_large_split_with_the_seed():
    from datasets import Dataset

    from alignment_pipelines.methods.reward import report_sample

    pairs = Dataset.from_dict({"row": list(range(100))})
    assert report_sample(pairs, 100, seed=0) is pairs  # all of them when they fit
    sample = report_sample(pairs, 10, seed=0)["row"]
    assert len(set(sample)) == 10 and sample == report_sample(pairs, 10, seed=0)["row"]
    assert sample != report_sample(pairs, 10, seed=1)["row"] and sample != list(range(10))


def test_without_an_eval_split_the_report_names_training_pairs_and_ranks_them_above_chance(tiny_model_dir, data,
                                                                                          tmp_path):
    """The reward model's sign test: trained to prefer "yes good", it ranks its training pairs that way (swapping
    chosen and rejected in TRL's loss brings this to 0)."""
    result = run_training("reward", reward_config(tiny_model_dir, data, tmp_path / "rm", eval_data=None,
                                                  report_pairs=40))
    metrics = result.metrics
    print({k: round(v, 3) for k, v in metrics.items()})
    assert metrics["train_pairs_accuracy"] >= 0.8 and metrics["train_pairs_mean_margin"] > 0.5
    assert metrics["train_pairs_scored"] == 40 and metrics["train_pairs_total"] == 64
    assert metrics["train_pairs_sampled"] == 1
    assert not [name for name in metrics if name.startswith("eval_")]


# ---------------------------------------------------------------------------------------------- PPO and RLOO


def online_config(method, tiny_model_dir, data, output, **overrides):
    settings = dict(model=str(tiny_model_dir), data=str(data / "train.parquet"), output_dir=str(output),
                    reward_funcs=["length:40"], max_new_tokens=8, per_device_batch_size=8, max_steps=30,
                    learning_rate=2e-2, lora_r=8, lora_alpha=16, gradient_checkpointing=False, save_steps=0)
    return config_from_dict(method, settings | overrides)


@pytest.mark.timeout(180)
def test_ppo_raises_a_rule_reward_without_collapsing_to_empty_answers(tiny_model_dir, data, tmp_path):
    result = run_training("ppo", online_config("ppo", tiny_model_dir, data, tmp_path / "ppo", lora=False,
                                               learning_rate=5e-3, num_mini_batches=2, max_steps=50))
    history = result.history
    for key in ("objective/scores", "rewards/length/mean", "completions/clipped_ratio", "completions/mean_length",
                "objective/kl"):
        print(key, [round(h[key], 2) for h in history])
    first, last = slice(0, 5), slice(-5, None)
    assert history[0]["objective/kl"] == 0.0  # the first rollout comes from the reference itself
    # seen: -0.44 -> 0.82: every answer first runs to max_new_tokens (missing-EOS penalty -1), then ends early ...
    assert mean(history, "objective/scores", first) < 0
    assert mean(history, "objective/scores", last) > mean(history, "objective/scores", first) + 0.5
    assert mean(history, "completions/clipped_ratio", last) < 0.5
    # ... but says something first: an empty answer scores -1, and EOS alone would be 1 token (seen: ~2.9 tokens)
    assert mean(history, "rewards/length/mean", last) > 0.5
    assert mean(history, "completions/mean_length", last) > 1.5
    # seen ~7.2 nats for the whole answer: about one forced EOS (log 512 ~ 6.2), not 8 tokens drifting apart
    assert mean(history, "objective/kl", last) < 10
    assert result.metrics["steps"] == 50 and result.metrics["prompts_too_long"] == 0


@pytest.mark.timeout(180)
def test_rloo_raises_a_rule_reward_without_collapsing_to_empty_answers(tiny_model_dir, data, tmp_path):
    """8 answers a step (2 prompts x 4) and one update each: noisier than PPO, so 40 steps. Flipping the advantage's
    sign makes the reward fall instead."""
    result = run_training("rloo", online_config("rloo", tiny_model_dir, data, tmp_path / "rloo", lora=False,
                                                num_generations=4, max_steps=40))
    history = [h for h in result.history if "rewards/length/mean" in h]
    for key in ("reward", "rewards/length/mean", "rewards/missing_eos/mean", "completions/mean_length", "kl"):
        print(key, [round(h[key], 2) for h in history])
    first, last = slice(0, 5), slice(-5, None)
    assert history[0]["kl"] == 0.0
    # seen: -0.43 -> 0.79: every answer first runs to max_new_tokens (missing-EOS penalty -1), then ends early
    assert mean(history, "reward", last) > mean(history, "reward", first) + 0.5
    assert mean(history, "rewards/missing_eos/mean", first) < -0.9 < -0.1 < mean(history, "rewards/missing_eos/mean", last)
    # ... but says something first: an empty answer scores -1, and EOS alone would be 1 token (seen: ~2.5 tokens)
    assert mean(history, "rewards/length/mean", last) > 0.5
    assert mean(history, "completions/mean_length", last) > 1.5
    assert mean(history, "kl", last) < 7.5


def test_rloo_weighs_its_reward_sources_as_configured(tiny_model_dir, data, tmp_path):
    result = run_training("rloo", online_config("rloo", tiny_model_dir, data, tmp_path / "rloo", lora=False,
                                                num_generations=4, max_steps=2, reward_funcs=["length:40", "regex:e"],
                                                reward_weights=[0.5, 2.0], missing_eos_penalty=0.25))
    for step in result.history:
        if "reward" in step:
            assert step["rewards/missing_eos/mean"] == -0.25  # no answer of the start model ends within 8 tokens
            assert step["reward"] == pytest.approx(0.5 * step["rewards/length/mean"] + 2.0 * step["rewards/regex/mean"]
                                                   + step["rewards/missing_eos/mean"], abs=1e-5)


def test_full_ppo_scores_with_the_reward_model_and_starts_its_critic_from_it(tiny_model_dir, data, reward_model,
                                                                            tmp_path):
    output = tmp_path / "ppo-full"
    config = online_config("ppo", tiny_model_dir, data, output, lora=False, reward_model=str(reward_model[0]),
                           reward_funcs=["model", "length:40"], reward_weights=[1.0, 0.5], max_steps=3,
                           learning_rate=1e-4)
    result = run_training("ppo", config)
    first = result.history[0]
    assert {"rewards/reward_model/mean", "rewards/length/mean"} <= set(first)
    assert first["objective/scores"] == pytest.approx(  # the weighted sum, less the missing-EOS penalty (1 by default)
        first["rewards/reward_model/mean"] + 0.5 * first["rewards/length/mean"] - first["completions/clipped_ratio"],
        abs=1e-5)
    assert first["objective/kl"] == 0.0  # the frozen reference is a copy of the start model
    assert (output / "model.safetensors").is_file()


def test_full_rloo_keeps_the_start_model_as_its_reference(tiny_model_dir, data, tmp_path):
    """Started from an adapter (as from the SFT model), the reference is that adapter merged, not its base."""
    from peft import LoraConfig, get_peft_model

    from alignment_pipelines.models.loading import MODEL_CARD, load_causal_lm

    base, tokenizer = load_causal_lm(tiny_model_dir, dtype="float32", device="cpu")
    torch.manual_seed(0)
    adapter = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM",
                                              init_lora_weights=False))  # random B: the adapter changes the model
    start = tmp_path / "sft-adapter"
    adapter.save_pretrained(start)
    tokenizer.save_pretrained(start)
    (start / MODEL_CARD).write_text(json.dumps({"role": "policy", "format": "adapter",
                                                "parent": str(tiny_model_dir.resolve())}))
    result = run_training("rloo", online_config("rloo", start, data, tmp_path / "rloo-full", lora=False,
                                                max_steps=2, learning_rate=1e-5, num_generations=4))
    assert abs(result.history[0]["kl"]) < 1e-4  # a reference of the base model would differ by whole nats


def test_a_killed_ppo_run_resumes_from_its_checkpoint(tiny_model_dir, data, tmp_path):
    from transformers import TrainerCallback

    class Killed(Exception):
        pass

    class KillAfterStep3(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise Killed()

    def config(name):  # LoRA (PERL)
        return online_config("ppo", tiny_model_dir, data, tmp_path / name, max_steps=5, save_steps=1,
                             checkpoint_dir=str(tmp_path / f"{name}-ckpt"), learning_rate=1e-2)

    straight = run_training("ppo", config("straight"))
    with pytest.raises(Killed):
        run_training("ppo", config("resumed"), callbacks=[KillAfterStep3()])
    assert not (tmp_path / "resumed").exists()
    assert [p.name for p in (tmp_path / "resumed-ckpt").glob("checkpoint-*")] == ["checkpoint-2"]
    resumed = run_training("ppo", config("resumed"))
    assert resumed.metrics["resumed_from_step"] == 2 and resumed.metrics["steps"] == 5
    assert straight.history[0]["objective/kl"] == 0.0  # the disabled adapter is the reference; B starts at 0
    assert [h["step"] for h in resumed.history] == [3, 4, 5]
    for ours, theirs in zip(resumed.history, straight.history[2:]):
        assert ours["objective/scores"] == pytest.approx(theirs["objective/scores"], abs=1e-5)
        assert ours["objective/kl"] == pytest.approx(theirs["objective/kl"], abs=1e-4)
    assert not (tmp_path / "resumed-ckpt").exists()  # removed after success


# ---------------------------------------------------------------------------------------------- configs and CLI


@pytest.mark.parametrize("method, overrides, field, rule", [
    ("ppo", {"reward_funcs": ["model"]}, "reward_model", "is required while reward_funcs includes 'model'"),
    ("ppo", {"reward_funcs": ["length:x"]}, "reward_funcs", "needs a positive integer"),
    ("ppo", {"reward_funcs": []}, "reward_funcs", "at least one"),
    ("ppo", {"num_mini_batches": 3}, "num_mini_batches", "must divide per_device_batch_size=4"),
    ("ppo", {"max_new_tokens": 512}, "max_new_tokens", "must be below max_length=512"),
    ("rloo", {"num_generations": 3}, "num_generations", "must divide"),
])
def test_configs_refuse_what_cannot_run(method, overrides, field, rule, tiny_model_dir, data, tmp_path):
    values = {"model": str(tiny_model_dir), "data": str(data / "train.parquet"), "output_dir": str(tmp_path / "o"),
              "reward_funcs": ["length"]} | overrides
    with pytest.raises(ConfigError, match=rule) as error:
        config_from_dict(method, values)
    assert error.value.field == field


def test_online_methods_take_a_pairs_file_as_prompts_and_drop_prompts_that_leave_no_room(tiny_model_dir, tmp_path):
    from alignment_pipelines.methods.ppo import fitting_prompts
    from alignment_pipelines.models.loading import load_tokenizer

    short = [f"Is {topic} good?" for topic in TOPICS[:6]]
    long = [" ".join(TOPICS) + f" {topic}?" for topic in TOPICS[:4]]  # ~40 tokens each
    pairs = pd.DataFrame({"prompt": short + long + short[:2], "chosen": "yes", "rejected": "no"})  # 2 repeats
    pairs.to_parquet(tmp_path / "pairs.parquet")
    config = PPOMethodConfig(model=str(tiny_model_dir), data=str(tmp_path / "pairs.parquet"), output_dir="o",
                             reward_funcs=["length"], max_length=32, max_new_tokens=8).validate()
    prompts, metrics = fitting_prompts(config, load_tokenizer(tiny_model_dir))
    assert metrics == {"prompts": 6.0, "prompts_too_long": 4.0}
    assert [p[0]["content"] for p in prompts["prompt"]] == short


@pytest.mark.timeout(240)
def test_cli_trains_a_reward_model_then_ppo_and_rloo_on_it(tmp_path):
    from alignment_pipelines.cli import main
    from alignment_pipelines.data.demo import demo_feedback_path

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(demo_feedback_path().read_text().splitlines()[:24]) + "\n")
    common = ["--model", "tiny-random", "--model-store", str(tmp_path / "store"), "--data", str(pairs), "--max-steps", "3",
              "--no-gradient-checkpointing"]
    assert main(["train", "reward", *common, "--output", str(tmp_path / "RM")]) == 0
    online = [*common, "--reward-model", str(tmp_path / "RM"), "--max-new-tokens", "8"]
    assert main(["train", "ppo", *online, "--output", str(tmp_path / "P")]) == 0
    assert main(["train", "rloo", *online, "--num-generations", "4", "--output", str(tmp_path / "R")]) == 0
    for name, method in (("RM", "reward"), ("P", "ppo"), ("R", "rloo")):
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        assert metrics["method"] == method and metrics["metrics"]["steps"] == 3
    rloo = json.loads((tmp_path / "R" / "metrics.json").read_text())["metrics"]
    assert {"rewards/reward_model/mean", "rewards/missing_eos/mean"} <= set(rloo)  # the reward model, scored by us
    used = json.loads((tmp_path / "P" / "alignment_config.json").read_text())["reward_model"]
    assert Path(used).resolve() == (tmp_path / "RM").resolve()


def test_a_reward_model_starts_from_an_sft_adapter(tmp_path, tiny_model_dir):
    """The graph's case: the SFT model is a LoRA adapter of a causal LM, the reward model a sequence classifier."""
    import torch

    from alignment_pipelines.methods import run_training
    from alignment_pipelines.methods.sft import SFTMethodConfig
    from alignment_pipelines.models.loading import load_model

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Tea {i}?", "chosen": "Yes marker.", "rejected": "No."}) + "\n"
                             for i in range(8)))
    sft = tmp_path / "sft"
    run_training("sft", SFTMethodConfig(model=str(tiny_model_dir), data=str(pairs), output_dir=str(sft), max_steps=2,
                                        learning_rate=1e-2))
    reward_start, _ = load_model(sft, "reward", device="cpu", dtype="float32")
    policy, _ = load_model(sft, "policy", device="cpu", dtype="float32")
    trunk = {k: v for k, v in policy.state_dict().items() if not k.startswith("lm_head")}
    for name, value in reward_start.state_dict().items():
        if name in trunk:
            torch.testing.assert_close(value, trunk[name])  # the SFT weights, merged, under a new score head
    assert reward_start.score.out_features == 1
