"""The project's PPO trainer and reward sources on the tiny offline model.

The tiny random model samples almost uniformly from its 512 tokens, so an EOS token is rare (~1/512 per
token) and a completion of 8 tokens is ~25 characters. Under "shorter is better" its best move is to end early,
which costs a KL of about -log p_ref(EOS) ~ log(512) ~ 6.2 nats: the KL penalty decides whether that is worth it;
an empty answer scores lowest, so ending at once (EOS alone) is not the optimum.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from alignment_pipelines.methods.own_loop import (
    OPTIMIZER_FILE,
    RNG_STATE_FILE,
    SCHEDULER_FILE,
    TRAINER_STATE_FILE,
    weights_file,
)
from alignment_pipelines.methods.ppo import PPOMethodConfig, value_model_for
from alignment_pipelines.methods.ppo_trainer import PPOTrainer
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


def ppo_config(tiny_model_dir, **overrides) -> PPOMethodConfig:
    """The method config the trainer takes (as ``ppo.train`` passes it), small enough for seconds per run."""
    settings = dict(model=str(tiny_model_dir), data="unused", output_dir="unused", reward_funcs=["length"],
                    learning_rate=1e-3, value_learning_rate=1e-3, per_device_batch_size=4, num_mini_batches=2,
                    ppo_epochs=2, max_new_tokens=6, max_length=128, max_steps=4, seed=0, missing_eos_penalty=None)
    return PPOMethodConfig(**(settings | overrides))


def load_policy(tiny_model_dir, lora: bool = False):
    from alignment_pipelines.models.loading import load_causal_lm

    policy, tokenizer = load_causal_lm(tiny_model_dir, padding_side="left", dtype="float32", device="cpu")
    if lora:
        from peft import LoraConfig, get_peft_model

        policy = get_peft_model(policy, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16,
                                                   target_modules="all-linear", lora_dropout=0.05))
    return policy, tokenizer


def load_score_model(tiny_model_dir):
    """A sequence-classification head (num_labels=1) on the tiny trunk: stands in for a reward model."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)  # the score head is new, so randomly initialised
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = 3
    return model.eval()


def make_trainer(config, reward_fn, callbacks=None):
    """Policy (LoRA when ``config.lora``) and critic as ``ppo.train`` builds them."""
    torch.manual_seed(config.seed)
    policy, tokenizer = load_policy(config.model, lora=config.lora)
    return PPOTrainer(config, policy, tokenizer, PROMPTS, reward_fn, value_model_for(config, tokenizer),
                      callbacks=callbacks)


def mean(history, key, rows):
    values = [h[key] for h in history[rows]]
    return sum(values) / len(values)


def lora_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------- learning


def shorter_is_better_run(tiny_model_dir, kl_coef: float):
    config = ppo_config(tiny_model_dir, lora=False, learning_rate=5e-3, value_learning_rate=3e-4,
                        per_device_batch_size=8, num_mini_batches=2, ppo_epochs=4, max_new_tokens=8, max_steps=24,
                        kl_coef=kl_coef)
    trainer = make_trainer(config, length_reward(max_chars=40))
    trainer.train()
    return trainer.state.log_history


@pytest.mark.timeout(180)
def test_ppo_raises_a_rule_reward_without_collapsing_to_empty_answers(tiny_model_dir):
    """'Shorter is better', but an empty answer scores -1: the policy learns to end early, after a word."""
    free = shorter_is_better_run(tiny_model_dir, kl_coef=0.05)
    held = shorter_is_better_run(tiny_model_dir, kl_coef=1.0)
    first, last = slice(0, 4), slice(-4, None)
    for name, history in (("kl_coef=0.05", free), ("kl_coef=1.0", held)):
        for key in ("objective/scores", "objective/kl", "completions/mean_length"):
            print(name, key, [round(h[key], 2) for h in history])

    assert [h["step"] for h in free] == list(range(1, 25)) and LOG_KEYS <= set(free[0])
    assert free[0]["objective/kl"] == 0.0  # the first rollout comes from the reference itself
    # seen: 0.54 -> 0.94, 8 tokens -> about 2: the policy learns to end early ...
    assert mean(free, "objective/scores", last) > mean(free, "objective/scores", first) + 0.25
    assert mean(free, "completions/mean_length", last) < 4
    # ... but not with EOS alone (1 token, scored -1)
    assert mean(free, "completions/mean_length", last) > 1.5 and min(h["objective/scores"] for h in free[-4:]) > 0.5
    # a strong KL penalty makes ending early too expensive: less KL, no such gain
    assert mean(held, "objective/kl", last) < mean(free, "objective/kl", last) - 2.0
    assert mean(held, "objective/scores", last) < mean(free, "objective/scores", last) - 0.2


def questions_score(prompts, completions, **kwargs) -> list[float]:
    """+1 for the prompts that ask a question, -1 for the rest: a signal the critic can learn from the prompt."""
    return [1.0 if p[-1]["content"].endswith("?") else -1.0 for p in prompts]


def test_the_critic_learns_to_explain_the_returns(tiny_model_dir):
    """With LoRA (PERL) the critic is a model of its own with its own adapter and learning rate: after a few steps
    its values explain the returns (seen: 0.0, 0.03, 0.06, 0.26, 0.61, 0.91, 1.0, 0.99). The old value head on the
    policy's trunk stayed between 0.0 and -0.02."""
    config = ppo_config(tiny_model_dir, value_learning_rate=1e-3, per_device_batch_size=8, max_steps=8)
    trainer = make_trainer(config, questions_score)
    trainer.train()
    explained = [h["val/explained_variance"] for h in trainer.state.log_history]
    print("val/explained_variance", [round(e, 2) for e in explained])
    assert explained[0] == pytest.approx(0.0, abs=1e-6)  # a fresh head: every value 0
    assert min(explained[-2:]) > 0.5


def test_log_probs_are_taken_at_the_sampling_temperature(tiny_model_dir):
    """The rollout's stored log-probs are those of the distribution it sampled from: softmax(logits / T)."""
    config = ppo_config(tiny_model_dir, temperature=0.7, max_new_tokens=8)
    trainer = make_trainer(config, length_reward(40))
    torch.manual_seed(0)
    rollout = trainer._rollout(step=1)
    mask = rollout.response_mask.bool()
    context = rollout.query_responses.size(1) - rollout.response_ids.size(1)
    with torch.no_grad():
        positions = (rollout.attention_mask.cumsum(1) - 1).clamp(min=0)
        logits = trainer.policy(input_ids=rollout.query_responses, attention_mask=rollout.attention_mask,
                                position_ids=positions).logits[:, context - 1:-1].float()
    ids = rollout.response_ids[..., None]
    at_temperature = torch.log_softmax(logits / 0.7, dim=-1).gather(-1, ids).squeeze(-1)
    at_one = torch.log_softmax(logits, dim=-1).gather(-1, ids).squeeze(-1)
    torch.testing.assert_close(rollout.logprobs[mask], at_temperature[mask], rtol=1e-4, atol=1e-4)
    assert (rollout.logprobs[mask] - at_one[mask]).abs().max() > 0.1
    torch.testing.assert_close(rollout.ref_logprobs[mask], at_temperature[mask], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------- model setups


def test_the_reward_functions_hear_which_answers_the_policy_ended(tiny_model_dir):
    """The trainer tells every reward function which answers ended by the policy's own end ids, so the reward model
    reads an answer that stopped on a second end id (not its tokenizer's EOS) as finished, not as cut off."""
    from alignment_pipelines.methods.rewards import answers_finished

    heard = []

    def listener(prompts, completions, completion_ids=None, finished=None, **kwargs):
        heard.append((completion_ids, finished))
        return [0.0] * len(completions)

    config = ppo_config(tiny_model_dir, max_new_tokens=8)

    def first_rollout(end_ids=None):
        torch.manual_seed(config.seed)
        policy, tokenizer = load_policy(tiny_model_dir, lora=config.lora)
        if end_ids:
            policy.generation_config.eos_token_id = end_ids
        trainer = PPOTrainer(config, policy, tokenizer, PROMPTS, [listener], value_model_for(config, tokenizer))
        torch.manual_seed(0)
        rollout = trainer._rollout(step=1)
        assert heard[-1][1] == rollout.has_eos.tolist()
        return heard[-1][0], heard[-1][1], tokenizer

    ids, _, tokenizer = first_rollout()
    stop = ids[0][1]  # a token the policy samples anyway, made an end id of its generation config
    ids_with_stop, finished, _ = first_rollout([tokenizer.eos_token_id, stop])
    assert ids_with_stop[0] == ids[0][: ids[0].index(stop) + 1] and finished[0] is True
    # by the reward tokenizer's EOS alone, the same answer would read as cut off
    assert answers_finished(ids_with_stop[:1], 1, [tokenizer.eos_token_id]) == [False]


def test_value_loss_never_moves_the_policy(tiny_model_dir):
    """During the value warm-up only the value loss has a gradient: the critic learns, the policy's adapter stays
    bit-identical (the critic is a model of its own, not a head on the policy's trunk)."""
    config = ppo_config(tiny_model_dir, value_warmup_steps=2, max_steps=2)
    trainer = make_trainer(config, length_reward(40))
    policy_before, value_before = lora_weights(trainer.policy), lora_weights(trainer.value_model)
    trainer.train()
    assert all(torch.equal(p, policy_before[n]) for n, p in lora_weights(trainer.policy).items())
    assert any(not torch.equal(p, value_before[n]) for n, p in lora_weights(trainer.value_model).items())
    assert not {id(p) for p in trainer.policy.parameters()} & {id(p) for p in trainer.value_model.parameters()}


def test_full_fine_tuning_with_a_frozen_reference(tiny_model_dir):
    config = ppo_config(tiny_model_dir, lora=False, missing_eos_penalty=1.0)
    trainer = make_trainer(config, length_reward(40))
    start = {name: p.detach().clone() for name, p in trainer.policy.named_parameters()}
    assert trainer.ref_policy is not None
    trainer.train()

    history = trainer.state.log_history
    assert [h["step"] for h in history] == [1, 2, 3, 4] and LOG_KEYS <= set(history[0])
    assert history[0]["objective/kl"] == 0.0 and history[-1]["objective/kl"] != 0.0
    assert all(math.isfinite(h[k]) for h in history for k in LOG_KEYS if k != "val/explained_variance")
    # no completion of 6 random tokens reaches EOS: every score carries the penalty (length reward <= 1)
    assert history[0]["completions/clipped_ratio"] == 1.0 and history[0]["objective/scores"] < 0.0
    assert all(not torch.equal(p, start[name]) for name, p in trainer.policy.named_parameters())
    assert all(torch.equal(p, start[name]) for name, p in trainer.ref_policy.named_parameters())


def test_lora_policy_with_reward_model_and_weighted_rewards(tiny_model_dir):
    """PERL: the reference is the policy with its adapter off; the critic has its own adapter; two weighted
    rewards."""
    config = ppo_config(tiny_model_dir, reward_weights=[1.0, 0.5])
    policy, tokenizer = load_policy(tiny_model_dir, lora=True)
    reward_model = load_score_model(tiny_model_dir)
    base_before = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    lora_before = lora_weights(policy)
    value_model = value_model_for(config, tokenizer)
    value_before = lora_weights(value_model)
    reward_fns = [length_reward(40), reward_model_reward(reward_model, tokenizer, batch_size=3)]
    trainer = PPOTrainer(config, policy, tokenizer, PROMPTS, reward_fns, value_model)
    assert trainer.ref_policy is None
    trainer.train()

    history = trainer.state.log_history
    assert {"rewards/length/mean", "rewards/reward_model/mean"} <= set(history[0])
    weighted = history[0]["rewards/length/mean"] + 0.5 * history[0]["rewards/reward_model/mean"]
    assert history[0]["objective/scores"] == pytest.approx(weighted, abs=1e-5)
    assert history[0]["objective/kl"] == 0.0  # LoRA B starts at zero: policy == reference at step 1
    assert history[-1]["objective/kl"] != 0.0
    assert all(torch.equal(p, base_before[n]) for n, p in policy.named_parameters() if not p.requires_grad)
    assert all(not torch.equal(p, lora_before[n]) for n, p in policy.named_parameters() if "lora_B" in n)
    assert all(not torch.equal(p, value_before[n]) for n, p in lora_weights(value_model).items() if "lora_B" in n)


def test_the_critic_starts_from_the_reward_model(tmp_path, tiny_model_dir):
    """TRL's choice: the reward model's trunk and score head, under an adapter of its own with LoRA."""
    reward_dir = tmp_path / "reward"
    load_score_model(tiny_model_dir).save_pretrained(reward_dir)
    from alignment_pipelines.models.loading import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    tokenizer.save_pretrained(reward_dir)
    reward_head = load_score_model(tiny_model_dir).score.weight
    critic = value_model_for(ppo_config(tiny_model_dir, reward_model=str(reward_dir)), tokenizer)
    assert torch.equal(critic.get_base_model().score.original_module.weight, reward_head)
    from_start = value_model_for(ppo_config(tiny_model_dir, lora=False), tokenizer)
    assert float(from_start.score.weight.abs().max()) == 0.0  # a fresh head predicts 0, not noise
    asked = value_model_for(ppo_config(tiny_model_dir, lora=False, reward_model=str(reward_dir),
                                       value_model_start="start_model"), tokenizer)
    assert float(asked.score.weight.abs().max()) == 0.0  # the reward model is there, but not taken


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
        config = ppo_config(tiny_model_dir, lora=lora, max_steps=5, checkpoint_dir=str(checkpoint_dir), save_steps=1)
        return make_trainer(config, length_reward(40), callbacks=callbacks)

    straight = trainer(tmp_path / "straight")
    straight.train()

    crashed = trainer(tmp_path / "ckpt", callbacks=[crash_after_step(3)])
    (tmp_path / "ckpt" / ".checkpoint-9.tmp-killed").mkdir(parents=True)  # left by a run killed while saving
    with pytest.raises(Crash):
        crashed.train()
    # checkpoint-3 is never written (the crash comes first); checkpoint-1 was rotated out; the stale staging
    # folder is gone
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["checkpoint-2"]
    checkpoint = tmp_path / "ckpt" / "checkpoint-2"
    assert {p.name for p in checkpoint.iterdir()} == {
        weights_file("policy"), weights_file("value"), OPTIMIZER_FILE, SCHEDULER_FILE, RNG_STATE_FILE,
        TRAINER_STATE_FILE,
    }
    assert json.loads((checkpoint / TRAINER_STATE_FILE).read_text())["global_step"] == 2

    resumed = trainer(tmp_path / "ckpt")  # a fresh process would load a fresh model just the same
    resumed.train(resume_from_checkpoint=True)
    assert [h["step"] for h in resumed.state.log_history] == [1, 2, 3, 4, 5]
    for ours, theirs in zip(resumed.state.log_history, straight.state.log_history):
        assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-7)
    for module in ("policy", "value_model"):
        for (name, ours), (_, theirs) in zip(getattr(resumed, module).named_parameters(),
                                             getattr(straight, module).named_parameters()):
            torch.testing.assert_close(ours, theirs, msg=f"{module} {name} differs after resuming")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["checkpoint-5"]


def test_resume_refuses_an_incomplete_checkpoint(tmp_path, tiny_model_dir):
    trainer = make_trainer(ppo_config(tiny_model_dir), length_reward(40))
    (tmp_path / "checkpoint-2").mkdir()
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        trainer.train(resume_from_checkpoint=tmp_path / "checkpoint-2")


def test_a_prompt_without_room_for_the_answer_is_refused_not_cut(tiny_model_dir):
    config = ppo_config(tiny_model_dir, max_length=28, max_new_tokens=8)
    policy, tokenizer = load_policy(tiny_model_dir)
    long_prompt = [{"role": "user", "content": "tell me " * 40}]
    with pytest.raises(ValueError, match="prompt 1 has .* tokens: it leaves no room for max_new_tokens=8 within max_length=28"):
        PPOTrainer(config, policy, tokenizer, [PROMPTS[0], long_prompt], length_reward(40),
                   value_model_for(config, tokenizer))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"per_device_batch_size": 6, "num_mini_batches": 4}, "num_mini_batches=4: must divide"),
        ({"lam": 1.5}, "lam=1.5"),
        ({"temperature": 0.0}, "temperature=0.0"),
        ({"missing_eos_penalty": -1.0}, "missing_eos_penalty"),
        ({"value_learning_rate": 0.0}, "value_learning_rate"),
        ({"value_warmup_steps": 30, "max_steps": 30}, "value_warmup_steps=30: must be below max_steps=30"),
        ({"reward_funcs": ["length", "contains_code"], "reward_weights": [1.0]}, "one weight per reward source"),
        ({"reward_funcs": ["length"], "reward_weights": [math.nan]}, r"reward_weights\[0\]"),
    ],
)
def test_config_is_validated(tmp_path, tiny_model_dir, overrides, message):
    from alignment_pipelines.methods import ConfigError, config_from_dict

    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "Hi"}) + "\n")
    values = {"model": str(tiny_model_dir), "data": str(data), "output_dir": str(tmp_path / "out"),
              "reward_funcs": ["length"], "memory_budget_gb": 0}
    with pytest.raises(ConfigError, match=message):
        config_from_dict("ppo", values | overrides)


def test_online_methods_penalise_a_missing_eos_by_default():
    from alignment_pipelines.methods.rloo import RLOOMethodConfig

    assert PPOMethodConfig.defaults()["missing_eos_penalty"] == RLOOMethodConfig.defaults()["missing_eos_penalty"] > 0


# ---------------------------------------------------------------------------------------------- reward sources


def test_rule_rewards():
    prompts = [[{"role": "user", "content": "q"}]] * 3
    completions = ["", "yes, twenty chars....", "Sure:\n```python\nprint(1)\n```"]
    assert length_reward(max_chars=20)(prompts=prompts, completions=completions) == [-1.0, 0.0, 0.0]  # empty: worst
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
