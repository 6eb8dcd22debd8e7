"""Tests that know which way is up (issue 24): each fails when a learning signal's sign flips.

DPO and KTO are covered in test_methods.py / test_methods_kto_orpo_resume.py, which measure the implicit
reward margin on the saved model against the start model. ORPO is covered here, measured the same way.
The rest of the file pins the RL maths and the trainers' sign, temperature, mask and EOS lines that the
mutation run (mutation/, benchmarks/results/mutation.md) found unguarded.
"""

from __future__ import annotations

import statistics

import pandas as pd
import pytest

TOPICS = "tea coffee water bread rice apple garden city river book".split()


@pytest.fixture
def one_thread():
    """The tiny model trains much faster on one thread than on 2 oversubscribed cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def yes_no_pairs() -> pd.DataFrame:
    """Chosen and rejected answers of equal shape that differ in their verdict: "Yes, tea is good." over
    "No, tea is bad.", so that no length or shared-token effect can pass for a learned preference."""
    return pd.DataFrame([
        {"prompt": [{"role": "user", "content": f"Is {topic} good?"}],
         "chosen": f"Yes, {topic} is good.", "rejected": f"No, {topic} is bad."}
        for topic in TOPICS
    ])


def logprob_margin(model_dir, pairs: pd.DataFrame) -> float:
    """Mean over pairs of log p(chosen) - log p(rejected), from the model saved in ``model_dir``."""
    from alignment_pipelines.evaluation.metrics import pair_logprobs
    from alignment_pipelines.models.loading import load_causal_lm

    model, tokenizer = load_causal_lm(model_dir, device="cpu")
    chosen, rejected = pair_logprobs(model, tokenizer, pairs)
    return statistics.fmean(chosen) - statistics.fmean(rejected)


def test_orpo_raises_the_chosen_over_rejected_margin_of_its_training_pairs(tmp_path, tiny_model_dir, one_thread):
    """ORPO has no reference model, so the margin is the log-probability of chosen minus rejected.

    λ (``beta``) is 2, not the default 0.1: at 0.1 the NLL on the chosen answers alone raises the margin, and
    a flipped odds-ratio term goes unnoticed (checked by hand: +4.6, and +3.2 with the term's sign flipped);
    at 2 the odds-ratio term leads, and flipping its sign drives the margin down (-12 instead of +10).
    """
    from alignment_pipelines.methods import run_training
    from alignment_pipelines.methods.orpo import ORPOMethodConfig

    pairs = yes_no_pairs()
    data = tmp_path / "pairs.parquet"
    pairs.to_parquet(data)
    out = tmp_path / "orpo"
    run_training("orpo", ORPOMethodConfig(model=str(tiny_model_dir), data=str(data), output_dir=str(out),
                                          max_steps=10, learning_rate=5e-3, beta=2.0))
    before, after = logprob_margin(tiny_model_dir, pairs), logprob_margin(out, pairs)
    print(f"ORPO log p(chosen) - log p(rejected): before {before:.3f}, after {after:.3f}")
    assert after > before + 3.0


# ----------------------------------------------------------------------------------------
# RL maths: cases the hand-worked examples of test_rl_math.py left open (mutants that survived them)
# ----------------------------------------------------------------------------------------


def tensor(values):
    import torch

    return torch.tensor(values, dtype=torch.float32)


def test_math_value_clip_holds_both_directions_and_counts_only_where_it_raised_the_error():
    """Values may move at most ``clip_range_value`` down as well as up, and the clip fraction counts the tokens
    where the clipped error is the larger one: 3 of 5 here, where one token has equal errors and one a smaller
    clipped error, so that no other comparison gives the same count."""
    from alignment_pipelines.methods.rl_math import clipped_value_loss

    old_values = tensor([[0.5, -0.5, 1.0, 0.0, 0.2]])
    values = old_values + tensor([[-0.5, 0.5, 0.1, 0.5, 0.6]])
    returns, mask = old_values + tensor([[-1.0, 1.0, 0.1, 0.0, 1.0]]), tensor([[1, 1, 1, 1, 1]])
    loss, clip_fraction = clipped_value_loss(values, old_values, returns, mask, clip_range_value=0.2)
    # token 0 fell 0.5: held 0.2 below the old value -> max(0.5^2, 0.8^2) = 0.64; token 1 rose 0.5: held 0.2
    # above -> 0.64 as well; token 2 moved within the clip -> both errors 0; token 3 rose 0.5 away from its
    # return: the clip would shrink the error -> the unclipped 0.5^2 counts; token 4: max(0.4^2, 0.8^2) = 0.64
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.64 + 0.0 + 0.25 + 0.64) / 5)
    assert clip_fraction.item() == pytest.approx(3 / 5)


def test_math_policy_clip_fraction_counts_only_where_the_clip_raised_the_loss():
    """Clip holds a gain (counted), clip would lower a loss (not counted: the unclipped term is the max), clip
    holds a loss (counted, twice), ratio 1 (both terms equal, not counted): 3 of 5, which no other comparison
    gives."""
    import math

    from alignment_pipelines.methods.rl_math import clipped_policy_loss

    old_logprobs = tensor([[-0.2, -1.5, -0.7, -3.0, -2.0]])
    logprobs = old_logprobs + tensor([[math.log(1.5), math.log(1.5), math.log(0.5), 0.0, math.log(0.5)]])
    advantages = tensor([[1, -1, -1, 1, -1]])
    loss, clip_fraction, _ = clipped_policy_loss(logprobs, old_logprobs, advantages, tensor([[1, 1, 1, 1, 1]]),
                                                 clip_range=0.2)
    # per token max(-A * ratio, -A * clip(ratio)): max(-1.5, -1.2), max(1.5, 1.2), max(0.5, 0.8), max(-1, -1),
    # max(0.5, 0.8)
    assert loss.item() == pytest.approx((-1.2 + 1.5 + 0.8 - 1.0 + 0.8) / 5)
    assert clip_fraction.item() == pytest.approx(3 / 5)


def test_math_last_token_index_reads_the_last_dimension():
    """Positions are the last dimension, whatever the leading ones: one row alone, or rows in groups."""
    from alignment_pipelines.methods.rl_math import last_token_index

    assert last_token_index(tensor([1, 1, 0])).item() == 1
    assert last_token_index(tensor([[[1, 0, 0], [1, 1, 1]]])).tolist() == [[0, 2]]


def test_math_gae_of_a_one_token_answer_is_its_reward_less_its_value():
    from alignment_pipelines.methods.rl_math import gae_advantages

    advantages, returns = gae_advantages(tensor([[2.0]]), tensor([[0.5]]), tensor([[1]]), gamma=0.9, lam=0.9)
    assert advantages.tolist() == [pytest.approx([1.5])] and returns.tolist() == [pytest.approx([2.0])]


def test_math_guards_and_reductions_on_the_smallest_inputs():
    """Two values are enough for an unbiased variance; equal values whiten to themselves; an empty row is refused
    even where every column has a token; a 2-D reward tensor is refused; entropy is taken over each row."""
    import math

    from alignment_pipelines.methods.rl_math import entropy_from_logits, last_token_index, leave_one_out_baseline, \
        masked_var, whiten

    assert masked_var(tensor([1.0, 3.0])).item() == pytest.approx(2.0)
    assert whiten(tensor([2.0, 2.0, 2.0]), shift_mean=False).tolist() == [2.0, 2.0, 2.0]  # no variance: no NaN
    with pytest.raises(ValueError, match="at least one"):
        last_token_index(tensor([[1, 1], [0, 0]]))
    with pytest.raises(ValueError, match="flat tensor"):
        leave_one_out_baseline(tensor([[1.0, 2.0], [3.0, 4.0]]), k=2)
    skewed = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    logits = tensor([[1.0, 1.0 + math.log(3)], [2.0, 2.0]])
    assert entropy_from_logits(logits).tolist() == pytest.approx([skewed, math.log(2)])


def test_math_masked_mean_without_a_mask_keeps_the_dimension():
    from alignment_pipelines.methods.rl_math import masked_mean

    assert masked_mean(tensor([[1, 3], [5, 7]]), dim=1).tolist() == pytest.approx([2.0, 6.0])


# ----------------------------------------------------------------------------------------
# Reward sources: which way each score points
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_reward_model(tiny_model_dir):
    """The tiny model as a reward model (its score head is random, seeded) and its tokenizer."""
    import torch

    from alignment_pipelines.models.loading import load_model

    torch.manual_seed(0)
    return load_model(tiny_model_dir, "reward", dtype="float32", device="cpu")


def test_rewards_rule_sources_score_one_on_a_match_and_zero_otherwise():
    from alignment_pipelines.methods.rewards import contains_code_reward, regex_reward

    prompts = ["q", "q"]
    assert regex_reward("^yes")(prompts=prompts, completions=["yes, sure", "no"]) == [1.0, 0.0]
    code, prose = "Here:\n```python\nprint(1)\n```", "print(1)"
    assert contains_code_reward()(prompts=prompts, completions=[code, prose]) == [1.0, 0.0]


def test_rewards_reward_model_reads_the_last_max_length_tokens(tiny_reward_model):
    """A text longer than ``max_length`` is scored on its end (the answer, where the model pools), not its start."""
    import torch

    from alignment_pipelines.methods.rewards import reward_model_reward, reward_model_text

    model, tokenizer = tiny_reward_model
    prompt, answer = "Tell me about tea.", "Tea is a drink made from leaves, served hot or cold."
    ids = tokenizer(reward_model_text(tokenizer, prompt, answer), add_special_tokens=False)["input_ids"]
    assert len(ids) > 16
    with torch.no_grad():
        end, start = (model(input_ids=torch.tensor([part])).logits[0, 0].item() for part in (ids[-8:], ids[:8]))
    assert end != pytest.approx(start, abs=1e-4)
    score = reward_model_reward(model, tokenizer, max_length=8)
    assert score(prompts=[prompt], completions=[answer]) == pytest.approx([end], abs=1e-5)


def test_rewards_reward_model_ends_answers_at_the_end_ids_it_is_given(tiny_reward_model):
    """With the policy's end ids (here token 5, not the reward tokenizer's EOS), an answer whose last sampled
    token is 5 is finished and one ending otherwise is cut off, exactly as the ``finished`` flags say."""
    from alignment_pipelines.methods.rewards import reward_model_reward

    model, tokenizer = tiny_reward_model
    prompts, answers = ["Tell me about tea."] * 2, ["Tea is a drink."] * 2
    score = reward_model_reward(model, tokenizer, end_ids=[5])
    by_ids = score(prompts=prompts, completions=answers, completion_ids=[[9, 5], [9, tokenizer.eos_token_id]])
    by_flags = score(prompts=prompts, completions=answers, finished=[True, False])
    assert by_ids == pytest.approx(by_flags, abs=1e-5)
    assert by_ids[0] != pytest.approx(by_ids[1], abs=1e-4)


def test_rewards_missing_eos_penalty_of_zero_is_allowed_and_costs_nothing():
    from alignment_pipelines.methods.rewards import missing_eos_reward

    assert missing_eos_reward(0.0, [2])(prompts=["q"], completions=["a"], completion_ids=[[7]]) == [0.0]


# ----------------------------------------------------------------------------------------
# Own-loop trainers (PPO, online DPO): EOS, masks, temperature and the DPO loss, one function at a time
# ----------------------------------------------------------------------------------------


def test_own_loop_cuts_each_answer_after_its_first_end_token():
    import torch

    from alignment_pipelines.methods.own_loop import cut_after_eos

    answers = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [3, 9, 2, 9], [2, 9, 9, 9]])
    cut, mask, has_eos = cut_after_eos(answers, eos_ids=[2, 3], pad_token_id=0)
    assert cut.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [3, 0, 0, 0], [2, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 0, 0, 0]]  # the EOS itself counts
    assert has_eos.tolist() == [True, False, True, True]


def test_own_loop_left_pads_prompts_and_masks_only_their_tokens():
    from alignment_pipelines.methods.own_loop import left_pad

    ids, mask = left_pad([[4, 5, 6], [7]], pad_token_id=0, device="cpu")
    assert ids.tolist() == [[4, 5, 6], [0, 0, 7]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_own_loop_end_tokens_are_the_tokenizers_and_the_generation_configs():
    from types import SimpleNamespace

    from transformers import GenerationConfig

    from alignment_pipelines.methods.own_loop import eos_token_ids

    tokenizer = SimpleNamespace(eos_token_id=2)
    assert eos_token_ids(tokenizer, SimpleNamespace(generation_config=GenerationConfig(eos_token_id=[7, 2]))) == [2, 7]
    assert eos_token_ids(tokenizer, SimpleNamespace(generation_config=GenerationConfig(eos_token_id=9))) == [2, 9]
    assert eos_token_ids(SimpleNamespace(eos_token_id=None), SimpleNamespace(generation_config=GenerationConfig(
        eos_token_id=9))) == [9]


def test_own_loop_answer_logits_are_divided_by_the_temperature_and_ignore_left_padding(tiny_model_dir):
    """A left-padded row predicts its answer exactly as the same row unpadded, and at temperature T the logits
    are those at 1 divided by T (the distribution ``generate`` samples from)."""
    import torch

    from alignment_pipelines.methods.own_loop import answer_logits, left_pad
    from alignment_pipelines.models.loading import load_causal_lm

    model, _ = load_causal_lm(tiny_model_dir, dtype="float32", device="cpu")
    model.eval()
    prompts, answer = [[5, 6, 7, 8], [9, 10]], [11, 12, 13]
    prompt_ids, prompt_mask = left_pad(prompts, pad_token_id=0, device="cpu")
    ids = torch.cat([prompt_ids, torch.tensor([answer, answer])], dim=1)
    mask = torch.cat([prompt_mask, torch.ones(2, 3, dtype=torch.long)], dim=1)
    with torch.no_grad():
        at_one, _ = answer_logits(model, ids, mask, context_length=4, temperature=1.0)
        at_half, _ = answer_logits(model, ids, mask, context_length=4, temperature=0.5)
        alone = model(input_ids=torch.tensor([prompts[1] + answer])).logits[0, 1:-1].float()
    assert at_one.shape == (2, 3, alone.size(-1))
    torch.testing.assert_close(at_half, at_one / 0.5)
    torch.testing.assert_close(at_one[1], alone, rtol=1e-4, atol=1e-4)


def test_own_loop_dpo_loss_rewards_the_chosen_answer_by_hand():
    """sigmoid: -log sigmoid(beta * ((pc - pr) - (rc - rr))); ipo: (that margin - 1 / (2 beta))^2."""
    import math

    from alignment_pipelines.methods.online_dpo import dpo_losses

    chosen, rejected, ref_chosen, ref_rejected = tensor([-1.0, -4.0]), tensor([-3.0, -1.0]), tensor([-2.0, -2.0]), \
        tensor([-2.0, -3.0])
    # margins: (-1 + 3) - 0 = 2; (-4 + 1) - (-2 + 3) = -4
    sigmoid = dpo_losses(chosen, rejected, ref_chosen, ref_rejected, beta=0.25, loss_type="sigmoid")
    assert sigmoid.tolist() == pytest.approx([math.log(1 + math.exp(-0.5)), math.log(1 + math.exp(1.0))])
    ipo = dpo_losses(chosen, rejected, ref_chosen, ref_rejected, beta=0.25, loss_type="ipo")
    assert ipo.tolist() == pytest.approx([(2 - 2) ** 2, (-4 - 2) ** 2])  # 1 / (2 beta) = 2


def test_rewards_refuse_ids_or_flags_that_do_not_match_the_answers(tiny_reward_model):
    from alignment_pipelines.methods.rewards import answers_finished, reward_model_reward

    for ids in ([[2]], [[2], [2], [2]]):  # one too few, one too many
        with pytest.raises(ValueError, match="completion_ids for 2 completions"):
            answers_finished(ids, 2, [2])
    score = reward_model_reward(*tiny_reward_model)
    with pytest.raises(ValueError, match="zip"):  # flags for one answer of two: never scored as the wrong answer
        score(prompts=["q", "q"], completions=["a", "b"], finished=[True])


def test_own_loop_online_dpo_penalises_whichever_answer_was_cut_off():
    """The missing-EOS penalty moves P(a better) away from the cut-off answer, a's or b's alike: test_online_dpo
    covers a cut b; here a is cut and b finished, so a leaning-a tie turns into b's win."""
    from alignment_pipelines.judges import Verdict
    from alignment_pipelines.methods.online_dpo import pair_labels

    leaning_a = Verdict.from_orders((0.9, "A"), (0.7, "A"))  # both orders chose A: a tie, P(a better) = 0.6
    assert pair_labels([leaning_a], "drop", 0.25, [True], [True], 1.0) == [(1.0, 0.0)]  # both finished: a tie
    assert pair_labels([leaning_a], "drop", 0.25, [False], [True], 1.0) == [(0.0, 1.0)]
    assert pair_labels([leaning_a], "average", 0.25, [False], [True], 0.3) == [(0.0, 1.0)]  # 0.6 - 0.3: b wins


def test_own_loop_online_dpo_log_probs_are_at_temperature_one_and_each_label_trains_one_direction(
        tmp_path, tiny_model_dir, one_thread):
    """DPO's implicit reward is defined on the policy's own distribution: the summed answer log-probs are those of
    softmax(logits) at temperature 1 (the answers were sampled at 0.9), over the answer tokens only. Under the
    start LoRA adapter policy and reference agree, so each pair's loss is log 2 whichever answer its label picks,
    and the step's loss is their mean: a label that counted both directions at once would double it."""
    import json
    import math

    import torch
    from peft import get_peft_model

    from alignment_pipelines.ai_feedback import AIFeedbackStore
    from alignment_pipelines.judges import ShorterJudge
    from alignment_pipelines.methods.online_dpo import JudgedBatch, OnlineDPOMethodConfig, OnlineDPOTrainer
    from alignment_pipelines.methods.training import load_start_model, lora_config

    prompts = ["Name a colour.", "Say hello."]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    config = OnlineDPOMethodConfig(
        model=str(tiny_model_dir), data=str(data), output_dir=str(tmp_path / "out"),
        judge="shorter", max_steps=1, per_device_batch_size=2, max_new_tokens=8, max_length=64, temperature=0.9,
        gradient_checkpointing=False, memory_budget_gb=0, feedback_store=str(tmp_path / "store")).validate()
    policy, tokenizer = load_start_model(config, "policy")
    policy = get_peft_model(policy, lora_config(config, "policy"))
    trainer = OnlineDPOTrainer(config, policy, tokenizer, None, ShorterJudge(), AIFeedbackStore(tmp_path / "store"),
                               prompts, [])
    torch.manual_seed(0)
    samples = trainer.sample(trainer.prompt_indices(1), 1)
    with torch.no_grad():
        logps = trainer.answer_logps(trainer.policy, samples)
        positions = (samples.attention_mask.cumsum(1) - 1).clamp(min=0)
        logits = trainer.policy(input_ids=samples.input_ids, attention_mask=samples.attention_mask,
                                position_ids=positions).logits[:, samples.prompt_length - 1:-1].float()
    answers = samples.input_ids[:, samples.prompt_length:]
    per_token = torch.log_softmax(logits, dim=-1).gather(-1, answers[..., None]).squeeze(-1)
    torch.testing.assert_close(logps, (per_token * samples.answer_mask).sum(1), rtol=1e-4, atol=1e-4)

    stats = {"agree": 2, "position_biased": 0, "preferences": 2, "ties": 0, "judged": 2, "cached": 0}
    for labels in ([1.0, 0.0], [0.5, 0.5]):
        batch = JudgedBatch(samples, torch.tensor(labels), torch.tensor([1.0, 1.0]), stats)
        assert trainer.backward(batch, weighted_pairs=2)["loss"] == pytest.approx(math.log(2), abs=1e-4)


def test_own_loop_ppo_rollout_weighs_scores_penalises_cut_answers_and_zeroes_padding(tiny_model_dir, one_thread):
    """One rollout: each score is the weighted reward less ``missing_eos_penalty`` where the answer has no EOS,
    and the stored log-probs, reference log-probs and values are 0 after the EOS. Token ids 100-199 end an answer
    here (a fifth of the vocabulary), so most answers end within 6 tokens and some are cut."""
    import torch

    from alignment_pipelines.methods.ppo import PPOMethodConfig, value_model_for
    from alignment_pipelines.methods.ppo_trainer import PPOTrainer
    from alignment_pipelines.methods.rewards import length_reward
    from alignment_pipelines.models.loading import load_causal_lm

    config = PPOMethodConfig(model=str(tiny_model_dir), data="unused", output_dir="unused", reward_funcs=["length"],
                             reward_weights=[0.5], per_device_batch_size=8, max_new_tokens=6, max_length=128,
                             max_steps=1, seed=0, missing_eos_penalty=2.0)
    torch.manual_seed(0)
    policy, tokenizer = load_causal_lm(tiny_model_dir, padding_side="left", dtype="float32", device="cpu")
    policy.generation_config.eos_token_id = list(range(100, 200))
    prompts = [[{"role": "user", "content": f"Tell me about {topic}."}] for topic in TOPICS[:8]]
    trainer = PPOTrainer(config, policy, tokenizer, prompts, [length_reward(40)], value_model_for(config, tokenizer))
    rollout = trainer._rollout(step=1)

    has_eos = rollout.has_eos
    assert 0 < int(has_eos.sum()) < len(has_eos)  # both kinds in the batch
    completions = [tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
                   for ids, mask in zip(rollout.response_ids, rollout.response_mask)]
    lengths = torch.tensor(length_reward(40)(prompts=prompts, completions=completions))
    torch.testing.assert_close(rollout.scores, 0.5 * lengths - 2.0 * (~has_eos).float())
    padding = rollout.response_mask == 0
    assert bool(padding.any())
    for stored in (rollout.logprobs, rollout.ref_logprobs, rollout.values):  # values: the fresh critic says 0
        assert bool((stored[padding] == 0).all())
    assert bool((rollout.logprobs[~padding] < 0).all()) and bool((rollout.ref_logprobs[~padding] < 0).all())


def test_own_loop_ppo_whitened_rewards_keep_their_mean(tiny_model_dir, one_thread, monkeypatch):
    """With ``whiten_rewards`` the per-token rewards that reach GAE have unit variance but keep their mean, so their
    sign still says good or bad; the step reports the KL it penalised. A spy on the real ``gae_advantages`` and
    ``_rollout`` records what one step used."""
    import torch

    from alignment_pipelines.methods import ppo_trainer
    from alignment_pipelines.methods.ppo import PPOMethodConfig, value_model_for
    from alignment_pipelines.methods.rewards import length_reward
    from alignment_pipelines.methods.rl_math import kl_penalty_rewards, masked_mean, masked_var
    from alignment_pipelines.models.loading import load_causal_lm

    config = PPOMethodConfig(model=str(tiny_model_dir), data="unused", output_dir="unused", reward_funcs=["length"],
                             per_device_batch_size=4, num_mini_batches=1, ppo_epochs=1, max_new_tokens=6,
                             max_length=128, max_steps=1, seed=0, whiten_rewards=True, missing_eos_penalty=None)
    torch.manual_seed(0)
    policy, tokenizer = load_causal_lm(tiny_model_dir, padding_side="left", dtype="float32", device="cpu")
    policy.generation_config.eos_token_id = list(range(100, 200))  # answers of several lengths: padding
    prompts = [[{"role": "user", "content": f"Tell me about {topic}."}] for topic in TOPICS[:4]]
    trainer = ppo_trainer.PPOTrainer(config, policy, tokenizer, prompts, [length_reward(40)],
                                     value_model_for(config, tokenizer))
    with torch.no_grad():  # the policy moves away from its frozen copy, the reference: a KL to report
        trainer.policy.lm_head.weight.mul_(1.5)
    seen = {}
    real_rollout, real_gae = trainer._rollout, ppo_trainer.gae_advantages
    monkeypatch.setattr(trainer, "_rollout", lambda step: seen.setdefault("rollout", real_rollout(step)))
    monkeypatch.setattr(ppo_trainer, "gae_advantages",
                        lambda rewards, *args: real_gae(seen.setdefault("rewards", rewards), *args))
    metrics = trainer.training_step(1)

    rollout = seen["rollout"]
    mask = rollout.response_mask
    raw = kl_penalty_rewards(rollout.logprobs, rollout.ref_logprobs, rollout.scores, mask, config.kl_coef)
    assert masked_mean(raw, mask).item() > 0.05  # "shorter is better" scores are positive here
    assert masked_mean(seen["rewards"], mask).item() == pytest.approx(masked_mean(raw, mask).item(), abs=1e-5)
    assert masked_var(seen["rewards"], mask).item() == pytest.approx(1.0, abs=1e-4)
    assert bool((mask == 0).any()) and bool((seen["rewards"][mask == 0] == 0).all())  # nothing after the EOS
    # the reported KL is the mean over answers of each answer's summed per-token KL
    sequence_kl = ((rollout.logprobs - rollout.ref_logprobs) * mask).sum(dim=1).mean().item()
    assert abs(sequence_kl) > 0.1
    assert metrics["objective/kl"] == pytest.approx(sequence_kl, rel=1e-4)
    assert metrics["objective/non_score_reward"] == pytest.approx(-config.kl_coef * sequence_kl, rel=1e-4)
