"""RLHF on the platform, on the tiny model: the reward model, PPO and RLOO through the registry and the CLI.

The tiny random model samples almost uniformly from its 512 tokens, so it rarely ends an answer early: under
"shorter is better" (``length:40``) its best move is to emit EOS at once, which a policy learns within a few dozen
steps at a KL of about one forced EOS token (-log p_ref(EOS) ~ log 512 ~ 6.2 nats) rather than of a whole answer.

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
    assert result.metrics["pairwise_accuracy"] >= 0.9 and result.metrics["mean_margin"] > 1.0
    assert result.metrics["report_pairs"] == 32  # the eval split, which it never trained on
    assert result.artifacts == {"score_distributions": "scores.png"}
    assert (output / "scores.png").read_bytes().startswith(b"\x89PNG")
    assert read_model_card(output)["role"] == "reward" and read_model_card(output)["format"] == "adapter"
    assert not (output / "model.safetensors").exists()  # the adapter alone, score head inside it

    model, tokenizer = load_model(output, "reward", dtype="float32", device="cpu")
    eval_pairs = to_preference_dataset(load_pairs(data / "eval.parquet"))
    reloaded = pairwise_stats(*pair_scores(model, tokenizer, eval_pairs))
    assert reloaded["pairwise_accuracy"] == result.metrics["pairwise_accuracy"]
    assert reloaded["mean_margin"] == pytest.approx(result.metrics["mean_margin"], abs=1e-5)


def test_full_reward_model_learns_too(tiny_model_dir, data, tmp_path):
    result = run_training("reward", reward_config(tiny_model_dir, data, tmp_path / "rm", lora=False,
                                                  learning_rate=1e-3, max_steps=16))
    print({k: round(v, 3) for k, v in result.metrics.items()})
    assert result.metrics["pairwise_accuracy"] >= 0.9
    assert (tmp_path / "rm" / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------- PPO and RLOO


def online_config(method, tiny_model_dir, data, output, **overrides):
    settings = dict(model=str(tiny_model_dir), data=str(data / "train.parquet"), output_dir=str(output),
                    reward_funcs=["length:40"], max_new_tokens=8, per_device_batch_size=8, max_steps=30,
                    learning_rate=2e-2, lora_r=8, lora_alpha=16, gradient_checkpointing=False, save_steps=0)
    return config_from_dict(method, settings | overrides)


@pytest.mark.timeout(180)
def test_ppo_raises_a_rule_reward_while_the_kl_stays_bounded(tiny_model_dir, data, tmp_path):
    result = run_training("ppo", online_config("ppo", tiny_model_dir, data, tmp_path / "ppo", lora=False,
                                               learning_rate=5e-3, num_mini_batches=2))
    history = result.history
    print("scores", [round(h["objective/scores"], 2) for h in history])
    print("kl", [round(h["objective/kl"], 2) for h in history])
    first, last = slice(0, 5), slice(-5, None)
    assert history[0]["objective/kl"] == 0.0  # the first rollout comes from the reference itself
    # seen: 0.54 -> 0.99 (answers end at once), at a sequence KL of ~6.3 nats (one forced EOS), not 8 drifting tokens
    assert mean(history, "objective/scores", first) < 0.65
    assert mean(history, "objective/scores", last) > mean(history, "objective/scores", first) + 0.25
    assert mean(history, "objective/kl", last) < 7.5
    assert result.metrics["steps"] == 30 and result.metrics["prompts_too_long"] == 0


@pytest.mark.timeout(180)
def test_rloo_raises_a_rule_reward_while_the_kl_stays_bounded(tiny_model_dir, data, tmp_path):
    """8 answers a step (2 prompts x 4) and one update each: noisier than PPO, so 40 steps."""
    result = run_training("rloo", online_config("rloo", tiny_model_dir, data, tmp_path / "rloo", lora=False,
                                                num_generations=4, max_steps=40))
    history = [h for h in result.history if "rewards/length/mean" in h]
    print("length", [round(h["rewards/length/mean"], 2) for h in history])
    print("kl", [round(h["kl"], 2) for h in history])  # TRL's RLOO logs the KL per answer token
    first, last = slice(0, 5), slice(-5, None)
    assert history[0]["kl"] == 0.0
    # seen: 0.56 -> 1.0, at ~6 nats per token of a one-token answer: one forced EOS
    assert mean(history, "rewards/length/mean", first) < 0.65
    assert mean(history, "rewards/length/mean", last) > mean(history, "rewards/length/mean", first) + 0.25
    assert mean(history, "kl", last) < 7.5


def test_full_ppo_scores_with_the_reward_model_and_starts_its_critic_from_it(tiny_model_dir, data, reward_model,
                                                                            tmp_path):
    output = tmp_path / "ppo-full"
    config = online_config("ppo", tiny_model_dir, data, output, lora=False, reward_model=str(reward_model[0]),
                           reward_funcs=["model", "length:40"], max_steps=3, learning_rate=1e-4)
    result = run_training("ppo", config)
    first = result.history[0]
    assert {"rewards/reward_model/mean", "rewards/length/mean"} <= set(first)
    assert first["objective/scores"] == pytest.approx(
        first["rewards/reward_model/mean"] + first["rewards/length/mean"], abs=1e-5)
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
