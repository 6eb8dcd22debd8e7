"""The project's PPO trainer and reward sources on the tiny offline model.

The tiny random model samples almost uniformly from its 512 tokens, so an EOS token is rare (~1/512 per
token) and a completion of 8 tokens is ~25 characters. Under "shorter is better" its best move is to end
at once, which costs a KL of about -log p_ref(EOS) ~ log(512) ~ 6.2 nats: the KL penalty decides whether
that is worth it.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from alignment_pipelines.methods.ppo_trainer import (
    OPTIMIZER_FILE,
    POLICY_WEIGHTS_FILE,
    RNG_STATE_FILE,
    SCHEDULER_FILE,
    TRAINER_STATE_FILE,
    VALUE_WEIGHTS_FILE,
    PPOTrainer,
    PPOTrainingArguments,
)
from alignment_pipelines.methods.rewards import (
    build_reward_funcs,
    contains_code_reward,
    length_reward,
    regex_reward,
    reward_model_reward,
)

PROMPTS = [
    [{"role": "user", "content": text}]
    for text in ["Hello water.", "What is tea?", "Write a poem.", "Tell a story.", "List the cities.",
                 "Give a recipe.", "Why is the sky blue?", "Explain the code."]
]
LOG_KEYS = {
    "objective/scores", "objective/kl", "objective/non_score_reward", "objective/rlhf_reward", "objective/entropy",
    "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg", "val/clipfrac_avg",
    "val/explained_variance", "completions/mean_length", "completions/clipped_ratio", "learning_rate", "episode",
    "epoch", "step",
}


@pytest.fixture(autouse=True)
def one_thread():
    """Same numbers on every run: one intra-op thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_policy(tiny_model_dir, lora: bool = False):
    from alignment_pipelines.models.loading import load_causal_lm

    policy, tokenizer = load_causal_lm(tiny_model_dir, padding_side="left", dtype="float32", device="cpu")
    if lora:
        from peft import LoraConfig, get_peft_model

        policy = get_peft_model(policy, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16,
                                                   target_modules="all-linear", lora_dropout=0.05))
    return policy, tokenizer


def load_score_model(tiny_model_dir):
    """A sequence-classification head (num_labels=1) on the tiny trunk: stands in for a reward/value model."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)  # the score head is new, so randomly initialised
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = 3
    return model.eval()


def mean(history, key, rows):
    values = [h[key] for h in history[rows]]
    return sum(values) / len(values)


def small_args(**overrides) -> PPOTrainingArguments:
    settings = dict(learning_rate=1e-3, per_device_batch_size=4, mini_batch_size=2, ppo_epochs=2,
                    max_new_tokens=6, max_steps=4, seed=0)
    return PPOTrainingArguments(**(settings | overrides))


# ---------------------------------------------------------------------------------------------- learning


def shorter_is_better_run(tiny_model_dir, kl_coef: float):
    policy, tokenizer = load_policy(tiny_model_dir)
    args = PPOTrainingArguments(learning_rate=5e-3, per_device_batch_size=8, mini_batch_size=4, ppo_epochs=4,
                                max_new_tokens=8, max_steps=30, seed=0, kl_coef=kl_coef,
                                lr_scheduler_type="constant")
    trainer = PPOTrainer(args, policy, tokenizer, PROMPTS, length_reward(max_chars=40))
    trainer.train()
    return trainer.state.log_history


@pytest.mark.timeout(120)
def test_ppo_raises_a_rule_reward_and_the_kl_penalty_bounds_the_drift(tiny_model_dir):
    free = shorter_is_better_run(tiny_model_dir, kl_coef=0.05)
    held = shorter_is_better_run(tiny_model_dir, kl_coef=0.5)
    first, last = slice(0, 5), slice(-5, None)
    print("kl_coef=0.05 scores", [round(h["objective/scores"], 3) for h in free])
    print("kl_coef=0.05 kl", [round(h["objective/kl"], 2) for h in free])
    print("kl_coef=0.5 scores", [round(h["objective/scores"], 3) for h in held])
    print("kl_coef=0.5 kl", [round(h["objective/kl"], 2) for h in held])

    assert [h["step"] for h in free] == list(range(1, 31)) and LOG_KEYS <= set(free[0])
    assert free[0]["objective/kl"] == 0.0  # the first rollout comes from the reference itself
    # A weak penalty: the policy learns to end early (score 0.55 -> above 0.85) ...
    assert mean(free, "objective/scores", first) < 0.65
    assert mean(free, "objective/scores", last) > mean(free, "objective/scores", first) + 0.25
    assert mean(free, "completions/mean_length", last) < 3
    # ... at a KL close to that of one forced EOS token (log 512 ~ 6.2 nats), not of 8 tokens drifting apart.
    assert mean(free, "objective/kl", last) < 7.0
    # A strong penalty makes ending early too expensive: less KL, no such gain.
    assert mean(held, "objective/kl", last) < mean(free, "objective/kl", last) - 2.0
    assert mean(held, "objective/scores", last) < mean(free, "objective/scores", last) - 0.2


# ---------------------------------------------------------------------------------------------- model setups


def test_full_fine_tuning_with_value_head_and_frozen_reference(tiny_model_dir):
    policy, tokenizer = load_policy(tiny_model_dir)
    start = {name: p.detach().clone() for name, p in policy.named_parameters()}
    trainer = PPOTrainer(small_args(missing_eos_penalty=1.0), policy, tokenizer, PROMPTS, length_reward(40))
    assert trainer.value_head is not None and trainer.ref_policy is not None
    trainer.train()

    history = trainer.state.log_history
    assert [h["step"] for h in history] == [1, 2, 3, 4] and LOG_KEYS <= set(history[0])
    assert history[0]["objective/kl"] == 0.0 and history[-1]["objective/kl"] != 0.0
    assert all(math.isfinite(h[k]) for h in history for k in LOG_KEYS if k != "val/explained_variance")
    # no completion of 6 random tokens reaches EOS: every score carries the penalty (length reward <= 1)
    assert history[0]["completions/clipped_ratio"] == 1.0 and history[0]["objective/scores"] < 0.0
    assert all(not torch.equal(p, start[name]) for name, p in policy.named_parameters())
    assert all(torch.equal(p, start[name]) for name, p in trainer.ref_policy.named_parameters())
    assert trainer.value_head.weight.abs().sum() > 0


def test_lora_policy_with_value_model_reward_model_and_weighted_rewards(tiny_model_dir):
    """PERL: the reference is the policy with its adapter off; a separate value model; two weighted rewards."""
    policy, tokenizer = load_policy(tiny_model_dir, lora=True)
    value_model = load_score_model(tiny_model_dir)
    reward_model = load_score_model(tiny_model_dir)
    base_before = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    lora_before = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    value_before = value_model.score.weight.detach().clone()
    reward_fns = [length_reward(40), reward_model_reward(reward_model, tokenizer, batch_size=3)]
    args = small_args(reward_weights=[1.0, 0.5])
    trainer = PPOTrainer(args, policy, tokenizer, PROMPTS, reward_fns, value_model=value_model)
    assert trainer.ref_policy is None and trainer.value_head is None
    trainer.train()

    history = trainer.state.log_history
    assert {"rewards/length/mean", "rewards/reward_model/mean"} <= set(history[0])
    weighted = history[0]["rewards/length/mean"] + 0.5 * history[0]["rewards/reward_model/mean"]
    assert history[0]["objective/scores"] == pytest.approx(weighted, abs=1e-5)
    assert history[0]["objective/kl"] == 0.0  # LoRA B starts at zero: policy == reference at step 1
    assert history[-1]["objective/kl"] != 0.0
    assert all(torch.equal(p, base_before[n]) for n, p in policy.named_parameters() if not p.requires_grad)
    assert all(not torch.equal(p, lora_before[n]) for n, p in policy.named_parameters() if "lora_B" in n)
    assert not torch.equal(value_model.score.weight, value_before)


# ---------------------------------------------------------------------------------------------- checkpoints


class Crash(Exception):
    pass


def crash_after_step(step: int):
    from transformers import TrainerCallback

    class CrashCallback(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise Crash(f"simulated crash after step {step}")

    return CrashCallback()


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_resumed_run_repeats_the_uninterrupted_run(tmp_path, tiny_model_dir, lora):
    def trainer(checkpoint_dir, callbacks=None):
        policy, tokenizer = load_policy(tiny_model_dir, lora=lora)
        args = small_args(max_steps=5, checkpoint_dir=str(checkpoint_dir), save_steps=1)
        return PPOTrainer(args, policy, tokenizer, PROMPTS, length_reward(40), callbacks=callbacks)

    straight = trainer(tmp_path / "straight")
    straight.train()

    crashed = trainer(tmp_path / "ckpt", callbacks=[crash_after_step(3)])
    (tmp_path / "ckpt" / ".checkpoint-9.tmp-killed").mkdir(parents=True)  # left by a run killed while saving
    with pytest.raises(Crash):
        crashed.train()
    # checkpoint-3 is never written (the crash comes first); save_total_limit=1 rotated checkpoint-1 out;
    # the stale staging folder is gone
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["checkpoint-2"]
    checkpoint = tmp_path / "ckpt" / "checkpoint-2"
    assert {p.name for p in checkpoint.iterdir()} == {
        POLICY_WEIGHTS_FILE, VALUE_WEIGHTS_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, RNG_STATE_FILE, TRAINER_STATE_FILE
    }
    assert json.loads((checkpoint / TRAINER_STATE_FILE).read_text())["global_step"] == 2

    resumed = trainer(tmp_path / "ckpt")  # a fresh process would load a fresh model just the same
    resumed.train(resume_from_checkpoint=True)
    assert [h["step"] for h in resumed.state.log_history] == [1, 2, 3, 4, 5]
    for ours, theirs in zip(resumed.state.log_history, straight.state.log_history):
        assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-7)
    for (name, ours), (_, theirs) in zip(resumed.policy.named_parameters(), straight.policy.named_parameters()):
        torch.testing.assert_close(ours, theirs, msg=f"{name} differs after resuming")
    torch.testing.assert_close(resumed.value_head.weight, straight.value_head.weight)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["checkpoint-5"]


def test_resume_refuses_an_incomplete_checkpoint(tmp_path, tiny_model_dir):
    policy, tokenizer = load_policy(tiny_model_dir)
    trainer = PPOTrainer(small_args(), policy, tokenizer, PROMPTS, length_reward(40))
    (tmp_path / "checkpoint-2").mkdir()
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        trainer.train(resume_from_checkpoint=tmp_path / "checkpoint-2")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"per_device_batch_size": 6, "mini_batch_size": 4}, "mini_batch_size=4: must divide"),
        ({"save_steps": 2}, "needs checkpoint_dir"),
        ({"lam": 1.5}, "lam=1.5"),
        ({"temperature": 0.0}, "temperature=0.0"),
        ({"missing_eos_penalty": -1.0}, "missing_eos_penalty"),
    ],
)
def test_arguments_are_validated(overrides, message):
    with pytest.raises(ValueError, match=message):
        small_args(**overrides)


def test_every_argument_has_help():
    import dataclasses

    assert all(f.metadata.get("help") for f in dataclasses.fields(PPOTrainingArguments))


# ---------------------------------------------------------------------------------------------- reward sources


def test_rule_rewards():
    prompts = [[{"role": "user", "content": "q"}]] * 3
    completions = ["", "yes, twenty chars....", "Sure:\n```python\nprint(1)\n```"]
    assert length_reward(max_chars=20)(prompts=prompts, completions=completions) == [1.0, 0.0, 0.0]
    assert length_reward(max_chars=40)(prompts=prompts, completions=["a" * 10])[0] == pytest.approx(0.75)
    assert regex_reward("^yes")(prompts=prompts, completions=completions) == [0.0, 1.0, 0.0]
    assert contains_code_reward()(prompts=prompts, completions=completions) == [0.0, 0.0, 1.0]
    assert contains_code_reward()(prompts=prompts, completions=["```python\nnot closed"]) == [0.0]
    # TRL's RLOO/GRPO trainers pass conversational completions as message lists; both forms work
    conversational = [[{"role": "assistant", "content": c}] for c in completions]
    assert regex_reward("^yes")(prompts=prompts, completions=conversational, trainer_state=None) == [0.0, 1.0, 0.0]


def test_build_reward_funcs_parses_config_strings(tiny_model_dir):
    funcs = build_reward_funcs(["length", "length:10", "regex:^a:b", "contains_code"])
    assert [f.__name__ for f in funcs] == ["length", "length", "regex", "contains_code"]
    assert funcs[1](prompts=["p"], completions=["12345"]) == [0.5]
    assert funcs[2](prompts=["p"], completions=["a:b c"]) == [1.0]  # the pattern keeps its own colons
    for bad, message in [("length:x", "positive integer"), ("regex:(", "invalid regular expression"),
                         ("regex", "needs a pattern"), ("model", "needs a reward model"), ("judge", "unknown reward")]:
        with pytest.raises(ValueError, match=message):
            build_reward_funcs([bad])
    with pytest.raises(ValueError, match="list of strings"):
        build_reward_funcs("length")


def test_reward_model_scores_like_trl_renders_and_pads(tiny_model_dir):
    from trl.data_utils import apply_chat_template

    from alignment_pipelines.models.loading import load_causal_lm

    _, tokenizer = load_causal_lm(tiny_model_dir, padding_side="left", dtype="float32", device="cpu")
    model = load_score_model(tiny_model_dir)
    prompts = [[{"role": "user", "content": "What is tea?"}], "Tell a story.", [{"role": "user", "content": "Hi"}]]
    completions = ["Tea is a drink made from leaves.", "Once.", [{"role": "assistant", "content": "Hello there"}]]
    scores = build_reward_funcs(["model"], reward_model=model, reward_tokenizer=tokenizer)[0](
        prompts=prompts, completions=completions
    )
    one_at_a_time = reward_model_reward(model, tokenizer, batch_size=1)(prompts=prompts, completions=completions)
    assert scores == pytest.approx(one_at_a_time, abs=1e-5)  # right padding does not move the pooled token

    # the same text TRL's trainers score: chat template over prompt + assistant turn, no extra special tokens
    messages = [{"role": "user", "content": "What is tea?"}, {"role": "assistant", "content": completions[0]}]
    text = apply_chat_template({"messages": messages}, tokenizer)["text"]
    with torch.no_grad():
        expected = model(**tokenizer(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()
    assert scores[0] == pytest.approx(expected, abs=1e-5)
    assert len(set(round(s, 6) for s in scores)) == 3
