"""Judges, evaluation metrics and the markdown report."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from alignment_pipelines.evaluation import build_report, generate_answers, length_stats, preference_accuracy, win_rate
from alignment_pipelines.evaluation.metrics import encode_answer
from alignment_pipelines.judges import Judge, RuleJudge, judge_pair

TEA = [{"role": "user", "content": "How do I make green tea?"}]
SHORT = "Boil water, let it cool a little, then steep the green tea for two minutes."
RAMBLING = (
    "Well, honestly, I think it basically depends on many things. Maybe you could actually make tea, "
    "make tea, make tea, make tea, and it really depends, I guess you could kind of sort of make tea. " * 3
)
OFF_TOPIC = "Paris is the capital of France."


class PositionBiased:
    """A pairwise judge that always prefers whichever answer it sees first."""

    name = "biased"

    def score(self, prompt, answer):
        return 0.0

    def compare(self, prompt, first, second):
        return 1.0


def test_rule_judge_prefers_short_correct_answer():
    judge = RuleJudge()
    assert isinstance(judge, Judge)
    assert judge.score(TEA, SHORT) > judge.score(TEA, RAMBLING)
    assert judge.score(TEA, SHORT) > judge.score(TEA, OFF_TOPIC)
    assert judge.score(TEA, "") < judge.score(TEA, OFF_TOPIC)
    assert judge.score(TEA, "   ") == judge.score(TEA, "")
    assert judge.score(TEA, "word " * 500) < judge.score(TEA, SHORT)
    assert judge.score(TEA, SHORT) == judge.score(TEA, SHORT)  # deterministic
    assert judge_pair(judge, TEA, SHORT, RAMBLING) == 1.0
    assert judge_pair(judge, TEA, RAMBLING, SHORT) == 0.0
    assert "Repetition" in RuleJudge.__doc__ and "Hedging" in RuleJudge.__doc__


@pytest.mark.parametrize("a, b", [(SHORT, RAMBLING), (SHORT, OFF_TOPIC), (SHORT, SHORT), ("", OFF_TOPIC)])
@pytest.mark.parametrize("judge", [RuleJudge(), PositionBiased()])
def test_judge_pair_is_order_symmetric(judge, a, b):
    p_ab, p_ba = judge_pair(judge, TEA, a, b), judge_pair(judge, TEA, b, a)
    assert p_ab in (0.0, 0.5, 1.0)
    assert p_ab == 1.0 - p_ba


def test_position_bias_cancels_to_tie():
    assert judge_pair(PositionBiased(), TEA, SHORT, RAMBLING) == 0.5


def test_win_rate_counts():
    prompts = [TEA, TEA, TEA, "Explain tea."]
    policy = [SHORT, SHORT, RAMBLING, "same"]
    baseline = [RAMBLING, OFF_TOPIC, SHORT, "same"]
    result = win_rate(policy, baseline, prompts, RuleJudge())
    assert result == {"win_rate": (2 + 0.5) / 4, "wins": 2, "losses": 1, "ties": 1, "judged": 4}
    assert win_rate(policy, baseline, prompts, PositionBiased())["ties"] == 4
    assert math.isnan(win_rate([], [], [], RuleJudge())["win_rate"])
    with pytest.raises(ValueError):
        win_rate([SHORT], [], [TEA], RuleJudge())


def test_length_stats():
    stats = length_stats(["ab", "", "abcd ef"])
    assert stats["count"] == 3 and stats["max_chars"] == 7 and stats["median_chars"] == 2.0
    assert stats["mean_chars"] == 3.0 and stats["mean_words"] == 1.0
    assert stats["empty_fraction"] == pytest.approx(1 / 3)
    assert length_stats([])["count"] == 0


def test_build_report():
    examples = [{"prompt": TEA, "policy": SHORT, "baseline": "a | b\nsecond line", "verdict": "win"}] * 7
    md = build_report({"win_rate": 0.75, "dpo": {"preference_accuracy": 1.0}, "empty": math.nan}, examples)
    assert md.startswith("# Evaluation report")
    assert "| metric | value |" in md and "| win_rate | 0.75 |" in md and "| dpo/preference_accuracy | 1 |" in md
    assert "| empty | n/a |" in md
    assert md.count("### Example") == 5 and "### Example 1 (win)" in md
    assert "> user: How do I make green tea?" in md and "> " + SHORT in md and "> second line" in md
    assert "*(no examples)*" in build_report({}, [])


def test_encode_answer_marks_answer_tokens(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids, n_prompt = encode_answer(tok, TEA, "Boil water.", max_length=512)
    assert tok.decode(ids[n_prompt:]).startswith("Boil water.<|im_end|>")
    assert tok.decode(ids[:n_prompt]).endswith("<|im_start|>assistant\n")
    ids, n_prompt = encode_answer(tok, TEA, "Boil water. " * 50, max_length=20)
    assert len(ids) == 20 and n_prompt < 20


def test_generation_and_preference_accuracy_on_tiny_model(tiny_model_dir):
    prompts = [TEA, [{"role": "user", "content": "Give a short list."}], "Tell me a story about a cat."]
    answers = generate_answers(tiny_model_dir, prompts, max_new_tokens=8, batch_size=2)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    assert answers == generate_answers(tiny_model_dir, prompts, max_new_tokens=8, batch_size=2)  # greedy
    assert generate_answers(tiny_model_dir, [], max_new_tokens=8) == []

    class Echo:  # the backend boundary: anything with generate(prompts, max_new_tokens, seed)
        def generate(self, prompts, max_new_tokens, seed):
            return [p[-1]["content"] if not isinstance(p, str) else p for p in prompts]

    assert generate_answers(None, [TEA], backend=Echo()) == [TEA[0]["content"]]

    pairs = pd.DataFrame({"prompt": [TEA, TEA], "chosen": [SHORT, "yes"], "rejected": [RAMBLING, "no"]})
    same = preference_accuracy(tiny_model_dir, tiny_model_dir, pairs, batch_size=1)
    assert same == {"preference_accuracy": 0.0, "reward_margin_mean": 0.0, "reward_chosen_mean": 0.0,
                    "reward_rejected_mean": 0.0, "pairs": 2}
