"""Judges: batch verdicts in both orders, position bias, rule judges, the factory, the local LLM judge."""

from __future__ import annotations

import math

import pytest

from alignment_pipelines.judges import (
    ContainsCodeJudge,
    JudgeError,
    LocalLLMJudge,
    PairwiseJudge,
    PositionJudge,
    RegexJudge,
    RuleJudge,
    ScoreJudge,
    ShorterJudge,
    Verdict,
    agreement_stats,
    build_judge,
    judge_pair,
)
from alignment_pipelines.judges.local_llm import letter_token_ids
from alignment_pipelines.judges.prompt import render_judge_prompt

TEA = [{"role": "user", "content": "How do I make green tea?"}]
SHORT = "Steep green tea in hot water for two minutes."
LONG = "Well, first you boil some water, then you wait, then you put the green tea in and wait a few minutes more."
CODE = "Use this:\n```python\nprint('tea')\n```"


class Recorder(PairwiseJudge):
    """Prefers answer text "good" and records every compare_batch call."""

    name = "recorder"

    def __init__(self):
        self.calls = []

    def compare_batch(self, prompts, firsts, seconds):
        self.calls.append((list(firsts), list(seconds)))
        return [(0.9 if f == "good" else 0.1 if s == "good" else 0.5, f"{f}|{s}") for f, s in zip(firsts, seconds)]


@pytest.mark.parametrize(
    "first, second, preferred, confidence, agrees, biased",
    [
        (0.9, 0.2, "a", 0.85, True, False),
        (0.2, 0.9, "b", 0.85, True, False),
        (1.0, 1.0, "tie", 1.0, False, True),  # always the first position
        (0.0, 0.0, "tie", 1.0, False, True),  # always the second position
        (0.5, 0.5, "tie", 1.0, True, False),  # no preference in either order
        (0.9, 0.5, "tie", 0.6, False, False),  # one order undecided
    ],
)
def test_verdict_from_both_orders(first, second, preferred, confidence, agrees, biased):
    verdict = Verdict.from_orders((first, "ab"), (second, "ba"))
    assert verdict.preferred == preferred
    assert verdict.confidence == pytest.approx(confidence)
    assert 0.0 <= verdict.confidence <= 1.0
    assert (verdict.agrees, verdict.position_biased) == (agrees, biased)
    assert (verdict.first_order, verdict.second_order, verdict.raw) == (first, second, ("ab", "ba"))
    with pytest.raises(JudgeError, match=r"\[0, 1\]"):
        Verdict.from_orders((1.5, ""), (0.5, ""))


def test_judge_asks_both_orders_in_one_batch():
    judge = Recorder()
    verdicts = judge.judge([TEA] * 3, ["good", "bad", "same"], ["bad", "good", "same"])
    assert judge.calls == [(["good", "bad", "same", "bad", "good", "same"], ["bad", "good", "same", "good", "bad", "same"])]
    assert [v.preferred for v in verdicts] == ["a", "b", "tie"]
    assert verdicts[0].raw == ("good|bad", "bad|good")
    assert judge.judge([], [], []) == [] and len(judge.calls) == 1
    with pytest.raises(ValueError, match="same length"):
        judge.judge([TEA], ["a"], [])


def test_failed_comparison_names_its_pair_and_order():
    class Failing(PairwiseJudge):
        name = "failing"

        def compare_batch(self, prompts, firsts, seconds):
            raise JudgeError("request 3 broke", request_index=3)

    with pytest.raises(JudgeError, match=r"pair 1 in order \(b, a\): request 3 broke") as caught:
        Failing().judge([TEA, TEA], ["x", "y"], ["z", "w"])
    assert (caught.value.pair, caught.value.order) == (1, "(b, a)")


@pytest.mark.parametrize("position", ["a", "b"])
def test_position_judge_yields_only_ties(position):
    verdicts = PositionJudge(position).judge([TEA] * 4, [SHORT, LONG, CODE, ""], [LONG, SHORT, SHORT, CODE])
    assert {v.preferred for v in verdicts} == {"tie"}
    assert agreement_stats(verdicts) == {"pairs": 4, "agreement_rate": 0.0, "position_bias_rate": 1.0, "ties": 4}
    assert judge_pair(PositionJudge(position), TEA, SHORT, LONG) == 0.5


def test_agreement_stats():
    verdicts = [
        Verdict.from_orders((0.9, ""), (0.1, "")),  # agrees on a
        Verdict.from_orders((0.2, ""), (0.7, "")),  # agrees on b
        Verdict.from_orders((0.8, ""), (0.6, "")),  # both picked the first position
        Verdict.from_orders((0.6, ""), (0.5, "")),  # one order undecided
    ]
    assert agreement_stats(verdicts) == {"pairs": 4, "agreement_rate": 0.5, "position_bias_rate": 0.25, "ties": 2}
    empty = agreement_stats([])
    assert empty["pairs"] == 0 and math.isnan(empty["agreement_rate"]) and math.isnan(empty["position_bias_rate"])


def test_rule_judges_in_batch():
    prompts = [TEA] * 4
    shorter = ShorterJudge().judge(prompts, [SHORT, LONG, "", SHORT], [LONG, SHORT, SHORT, f"  {SHORT}\n"])
    assert [v.preferred for v in shorter] == ["a", "b", "b", "tie"]  # the empty answer loses
    assert all(v.agrees and not v.position_biased for v in shorter)
    code = ContainsCodeJudge().judge(prompts, [CODE, SHORT, "Call `brew()` twice.", "def brew():\n    pass"],
                                     [SHORT, "import tea", SHORT, CODE])
    assert [v.preferred for v in code] == ["a", "b", "a", "tie"]
    regex = RegexJudge(r"(?i)\bminutes?\b").judge(prompts[:2], [SHORT, LONG], ["Steep it.", "Steep it briefly."])
    assert [v.preferred for v in regex] == ["a", "a"]
    rule = RuleJudge().judge(prompts[:2], [SHORT, "tea tea tea tea tea tea"], ["tea tea tea tea tea tea", SHORT])
    assert [v.preferred for v in rule] == ["a", "b"]
    assert [v.score_a for v in rule] == [judge_pair(RuleJudge(), TEA, SHORT, "tea tea tea tea tea tea"), 0.0]


def test_score_judge_scores_each_distinct_answer_once():
    calls = []

    def reward_model(prompts, answers):
        calls.append(list(answers))
        return [float(len(answer)) for answer in answers]

    judge = ScoreJudge(reward_model, "reward_model:v1")
    verdicts = judge.judge([TEA, TEA, TEA], [SHORT, LONG, SHORT], [LONG, SHORT, SHORT])
    assert [v.preferred for v in verdicts] == ["b", "a", "tie"]
    assert len(calls) == 1 and sorted(calls[0]) == sorted([SHORT, LONG])  # not 4N, not even 2N
    assert judge.id == "reward_model:v1"
    with pytest.raises(JudgeError, match="NaN"):
        ScoreJudge(lambda p, a: [math.nan] * len(a), "broken").judge([TEA], [SHORT], [LONG])
    with pytest.raises(JudgeError, match="scores for 2 answers"):
        ScoreJudge(lambda p, a: [1.0], "short").judge([TEA], [SHORT], [LONG])


@pytest.mark.parametrize("judge", [RuleJudge(), ShorterJudge(), ContainsCodeJudge(), RegexJudge("tea"),
                                   PositionJudge(), ScoreJudge(lambda p, a: [-len(x) for x in a], "neg_len")],
                         ids=lambda j: j.name)
@pytest.mark.parametrize("a, b", [(SHORT, LONG), (CODE, SHORT), (SHORT, SHORT)])
def test_judge_pair_works_for_every_judge(judge, a, b):
    p = judge_pair(judge, TEA, a, b)
    assert p in (0.0, 0.5, 1.0)
    assert p == 1.0 - judge_pair(judge, TEA, b, a)


def test_build_judge_from_config(tmp_path):
    assert isinstance(build_judge("rule"), RuleJudge)
    assert build_judge({"kind": "regex", "pattern": "tea"}).id == 'regex{"pattern": "tea"}'
    assert build_judge({"kind": "shorter"}).id == "shorter"
    short = build_judge({"kind": "llm", "model_dir": str(tmp_path), "instruction": "helpful and very short"})
    plain = build_judge({"kind": "llm", "model_dir": str(tmp_path)})
    assert isinstance(short, LocalLLMJudge) and short.id != plain.id and "helpful and very short" in short.id
    assert short.id == build_judge({"kind": "llm", "model_dir": str(tmp_path), "instruction": "helpful and very short"}).id
    remote = build_judge({"kind": "openai", "base_url": "http://127.0.0.1:1/v1", "model": "m", "instruction": "x"})
    assert remote.id == 'openai{"instruction": "x", "model": "m"}'
    with pytest.raises(ValueError, match="not one of"):
        build_judge({"kind": "oracle"})
    with pytest.raises(ValueError, match="takes"):
        build_judge({"kind": "shorter", "max_words": 3})
    with pytest.raises(ValueError, match="environment variable"):
        build_judge({"kind": "openai", "base_url": "http://127.0.0.1:1/v1", "model": "m", "api_key": "sk-secret"})
    with pytest.raises(ValueError, match="instruction"):
        build_judge({"kind": "llm", "model_dir": str(tmp_path), "instruction": " "})


def test_judge_prompt_carries_instruction_and_both_answers():
    text = render_judge_prompt("helpful and very short", TEA, "first answer", "second answer")
    assert text.index("How do I make green tea?") < text.index("first answer") < text.index("second answer")
    assert text.rstrip().endswith("Reply with the single letter A or B.")
    assert "criterion: helpful and very short." in text


@pytest.fixture(scope="module")
def llm_judge(tiny_model_dir):
    return LocalLLMJudge(tiny_model_dir, instruction="helpful and very short", batch_size=16, device="cpu")


def test_local_llm_judge_one_batched_pass(llm_judge):
    assert llm_judge._loaded is None  # building the judge does not load the model
    prompts = [TEA, [{"role": "user", "content": "Name a river."}], "Write python code."]
    answers_a, answers_b = [SHORT, "The Nile.", CODE], [LONG, "A long river in Egypt is the Nile.", "No."]
    batch_sizes = []
    hook = llm_judge.model.register_forward_hook(lambda module, args, kwargs, out: batch_sizes.append(
        kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        verdicts = llm_judge.judge(prompts, answers_a, answers_b)
    finally:
        hook.remove()
    assert batch_sizes == [6]  # 3 pairs x 2 orders, one forward pass
    for verdict in verdicts:
        assert verdict.preferred in ("a", "b", "tie")
        assert 0.0 <= verdict.confidence <= 1.0
        assert 0.0 < verdict.first_order < 1.0 and 0.0 < verdict.second_order < 1.0
        assert all(raw.startswith("logp(A)=") for raw in verdict.raw)

    # Left padding must not change a judgement: one prompt at a time gives the same probabilities.
    one_by_one = LocalLLMJudge(llm_judge.model_dir, instruction=llm_judge.instruction, batch_size=1, device="cpu")
    singles = one_by_one.judge(prompts, answers_a, answers_b)
    for batched, single in zip(verdicts, singles):
        assert batched.first_order == pytest.approx(single.first_order, abs=1e-4)
        assert batched.second_order == pytest.approx(single.second_order, abs=1e-4)


def test_local_llm_judge_with_judge_pair(llm_judge):
    assert judge_pair(llm_judge, TEA, SHORT, LONG) in (0.0, 0.5, 1.0)
    assert llm_judge.id == f'llm{{"instruction": "helpful and very short", "model": "{llm_judge.model_dir}"}}'


def test_letter_tokens_are_single_and_distinct(llm_judge):
    tokenizer = llm_judge._load()[1]
    a_ids, b_ids = letter_token_ids(tokenizer, "A"), letter_token_ids(tokenizer, "B")
    assert a_ids and b_ids and not set(a_ids) & set(b_ids)
    assert all(tokenizer.decode([i]).strip() == "A" for i in a_ids)
