"""The reward sources of PPO and RLOO: neither silence nor a cut-off answer can game them, and weights weigh them."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from alignment_pipelines.methods import config_from_dict
from alignment_pipelines.methods.own_loop import eos_token_ids
from alignment_pipelines.methods.rewards import (
    EMPTY_ANSWER_REWARD,
    build_reward_funcs,
    length_reward,
    missing_eos_reward,
    reward_model_text,
)

PROMPT = [{"role": "user", "content": "What is tea?"}]
ANSWER = "Tea is a drink made from leaves"
END_OF_TURN = "<|im_end|>"  # the tiny model's chat template closes a turn with it, as SmolLM2's does

MAX_CHARS = 40
length = length_reward(max_chars=MAX_CHARS)


def length_score(text: str) -> float:
    return length(prompts=[PROMPT], completions=[text])[0]


# ---------------------------------------------------------------------------------------------- length


def test_length_gives_an_empty_or_blank_answer_its_lowest_score():
    answers = ["", "   ", "\n\t", "a", "A short answer.", "x" * MAX_CHARS, "x" * (10 * MAX_CHARS)]
    conversational = [[{"role": "assistant", "content": a}] for a in answers]  # as TRL's RLOO passes them
    scores = length(prompts=[PROMPT] * len(answers), completions=conversational)
    assert scores[:3] == [EMPTY_ANSWER_REWARD] * 3 == [-1.0] * 3
    assert scores[3] == pytest.approx(1 - 1 / MAX_CHARS)
    assert scores[5:] == [0.0, 0.0]  # the floor of an answer that says something lies above the empty one's
    assert min(scores[3:]) > EMPTY_ANSWER_REWARD


texts = st.text(alphabet=st.characters(codec="utf-8"), max_size=3 * MAX_CHARS)


@given(text=texts, more=texts)
def test_length_never_rewards_saying_more_and_never_rewards_saying_nothing(text, more):
    longer = text + more
    if text.strip():  # appending to an answer with text never raises its reward
        assert length_score(longer) <= length_score(text)
        assert length_score(text) > EMPTY_ANSWER_REWARD
    else:  # a blank answer has the minimum, below anything with text
        assert length_score(text) == EMPTY_ANSWER_REWARD
        assert length_score(longer) >= length_score(text)


# ---------------------------------------------------------------------------------------------- cut-off answers


@pytest.fixture(scope="module")
def reward_model(tiny_model_dir):
    """The tiny model as a reward model (a seeded random score head) and its tokenizer."""
    from alignment_pipelines.models.loading import load_model

    torch.manual_seed(0)
    return load_model(tiny_model_dir, "reward", dtype="float32", device="cpu")


def test_a_cut_off_answer_reaches_the_reward_model_without_an_end_of_turn_and_scores_apart(reward_model):
    model, tokenizer = reward_model
    fed: list[str] = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: fed.extend(
            tokenizer.decode(ids[mask.bool()]) for ids, mask in zip(kwargs["input_ids"], kwargs["attention_mask"])),
        with_kwargs=True)
    eos = tokenizer.eos_token_id
    answer_ids = tokenizer(ANSWER, add_special_tokens=False)["input_ids"]
    finished, cut_off = answer_ids + [eos], answer_ids  # as sampled: EOS is the last token only when emitted
    score = build_reward_funcs(["model"], model, tokenizer, end_ids=eos_token_ids(tokenizer, model))[0]
    try:
        scores = score(prompts=[PROMPT, PROMPT], completions=[ANSWER, ANSWER], completion_ids=[finished, cut_off])
    finally:
        hook.remove()

    opened = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    assert fed == [opened + ANSWER + END_OF_TURN + "\n", opened + ANSWER]
    assert fed[0] == reward_model_text(tokenizer, PROMPT, ANSWER)  # a finished one as TRL's reward trainer renders
    assert scores[0] != pytest.approx(scores[1], abs=1e-4)  # the model pools another token: it sees the difference
    # Whole texts (the report's pairs) have no completion_ids and read as finished; an evaluation passes its flags
    assert score(prompts=[PROMPT], completions=[ANSWER]) == pytest.approx(scores[:1], abs=1e-5)
    assert score(prompts=[PROMPT, PROMPT], completions=[ANSWER, ANSWER],
                 finished=[True, False]) == pytest.approx(scores, abs=1e-5)

    penalty = missing_eos_reward(1.0, [eos])
    penalties = penalty(prompts=[PROMPT, PROMPT], completions=[ANSWER, ANSWER], completion_ids=[finished, cut_off])
    assert penalties == [0.0, -1.0]
    totals = [s + p for s, p in zip(scores, penalties)]
    assert totals[1] < totals[0] - 0.5  # cut off, the same text is worth less than finished


def test_the_missing_eos_penalty_needs_the_sampled_ids():
    with pytest.raises(ValueError, match="completion_ids"):
        missing_eos_reward(1.0, [2])(prompts=[PROMPT], completions=[ANSWER])
    with pytest.raises(ValueError, match="non-negative"):
        missing_eos_reward(-1.0, [2])
    assert missing_eos_reward(0.5, [2])(prompts=[PROMPT] * 3, completions=["a", "b", ""],
                                        completion_ids=[[7, 2], [7, 8], []]) == [0.0, -0.5, -0.5]


def test_the_end_ids_are_those_trl_stops_at(reward_model, tiny_model_dir):
    from alignment_pipelines.models.loading import load_causal_lm

    policy, tokenizer = load_causal_lm(tiny_model_dir, dtype="float32", device="cpu")
    assert eos_token_ids(tokenizer, policy) == [tokenizer.eos_token_id] == [tokenizer.convert_tokens_to_ids(END_OF_TURN)]
    policy.generation_config.eos_token_id = [5, tokenizer.eos_token_id]
    assert eos_token_ids(tokenizer, policy) == sorted([5, tokenizer.eos_token_id])


# ---------------------------------------------------------------------------------------------- weights


@pytest.mark.parametrize("overrides, weights", [
    ({}, [1.0, 1.0, 1.0]),  # two sources, then the missing-EOS penalty (on by default)
    ({"reward_weights": [0.5, 2.0]}, [0.5, 2.0, 1.0]),
    ({"reward_weights": [0.5, 2.0], "missing_eos_penalty": None}, [0.5, 2.0]),
    ({"missing_eos_penalty": None}, None),  # TRL weighs each source 1
])
def test_rloo_hands_trl_one_weight_per_reward_function(overrides, weights, tiny_model_dir, tmp_path):
    from alignment_pipelines.methods.rloo import RLOO

    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "Hi?"}\n')
    config = config_from_dict("rloo", {"model": str(tiny_model_dir), "data": str(data), "output_dir": "o",
                                       "reward_funcs": ["length", "regex:a"]} | overrides)
    assert RLOO().trl_args(config, None)["reward_weights"] == weights
    assert RLOO().trl_args(config, None)["mask_truncated_completions"] is False
    config.mask_truncated_completions = True
    assert RLOO().trl_args(config, None)["mask_truncated_completions"] is True
