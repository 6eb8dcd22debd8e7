"""Judges, evaluation metrics and the markdown report."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from alignment_pipelines.evaluation import Answer, generate_answers, preference_accuracy, win_rate
from alignment_pipelines.evaluation.metrics import encode_answer
from alignment_pipelines.evaluation.stats import wilson_interval
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


def test_win_rate_counts_ties_and_gives_a_wilson_interval():
    prompts = [TEA, TEA, TEA, "Explain tea."]
    policy = [SHORT, SHORT, RAMBLING, "same"]
    baseline = [RAMBLING, OFF_TOPIC, SHORT, "same"]
    result = win_rate(policy, baseline, prompts, RuleJudge())
    assert {k: result[k] for k in ("win_rate", "wins", "losses", "ties", "judged")} == \
        {"win_rate": (2 + 0.5) / 4, "wins": 2, "losses": 1, "ties": 1, "judged": 4}
    assert (result["ci_low"], result["ci_high"]) == wilson_interval(2.5, 4)
    assert result["judge_agreement_rate"] == 1.0
    biased = win_rate(policy, baseline, prompts, PositionBiased())
    assert biased["ties"] == 4 and biased["judge_position_bias_rate"] == 1.0
    empty = win_rate([], [], [], RuleJudge())
    assert math.isnan(empty["win_rate"]) and (empty["ci_low"], empty["ci_high"]) == (0.0, 1.0)
    with pytest.raises(ValueError):
        win_rate([SHORT], [], [TEA], RuleJudge())


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
            return [Answer(p[-1]["content"] if not isinstance(p, str) else p, 1, True) for p in prompts]

    assert generate_answers(None, [TEA], backend=Echo()) == [TEA[0]["content"]]

    pairs = pd.DataFrame({"prompt": [TEA, TEA], "chosen": [SHORT, "yes"], "rejected": [RAMBLING, "no"]})
    same = preference_accuracy(tiny_model_dir, tiny_model_dir, pairs, batch_size=1)
    assert same == {"preference_accuracy": 0.0, "reward_margin_mean": 0.0, "reward_chosen_mean": 0.0,
                    "reward_rejected_mean": 0.0, "pairs": 2}


# --------------------------------------------------------------------------------------
# Every model on the same data, each loaded once
# --------------------------------------------------------------------------------------

PAIRS = pd.DataFrame({"prompt": [TEA, "Name a colour.", "Say hi."], "chosen": [SHORT, "Blue.", "Hi!"],
                      "rejected": [RAMBLING, "I do not know.", "..."]})


@pytest.fixture(scope="module")
def lineage(tmp_path_factory):
    """base → sft → dpo, and kto identical to sft: three distinct tiny models and a copy; and a reward model."""
    import shutil

    import torch

    from alignment_pipelines.models.loading import load_model
    from alignment_pipelines.models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("lineage")
    paths = {name: str(build_tiny_model(root / name, seed=seed)) for name, seed in (("base", 0), ("sft", 1),
                                                                                   ("dpo", 2))}
    paths["kto"] = str(shutil.copytree(paths["sft"], root / "kto"))
    paths["reward"] = str(root / "reward")  # the base with a (seeded, untrained) score head, saved: role reward
    torch.manual_seed(0)
    model, tokenizer = load_model(paths["base"], "reward")
    model.save_pretrained(paths["reward"], safe_serialization=True)
    tokenizer.save_pretrained(paths["reward"])
    return paths


def test_each_model_is_loaded_once_and_serves_every_role(lineage, monkeypatch):
    from alignment_pipelines.evaluation import compare
    from alignment_pipelines.evaluation.compare import ModelUnderTest, evaluate_models

    loads = []
    real_load = compare.load_for_evaluation
    monkeypatch.setattr(compare, "load_for_evaluation", lambda path, role="policy": (loads.append(path),
                                                                                     real_load(path, role))[1])
    models = [ModelUnderTest("sft_model", lineage["sft"], lineage["base"]),
              ModelUnderTest("policy_dpo", lineage["dpo"], lineage["sft"]),
              ModelUnderTest("policy_kto", lineage["kto"], lineage["sft"])]
    steps = []
    evaluation = evaluate_models(models, "sft_model", PAIRS, list(PAIRS["prompt"]), RuleJudge(),
                                 champion="policy_dpo", max_new_tokens=6, batch_size=2,
                                 progress=lambda done, total, what: steps.append((done, total, what)))

    # four models, four loads: sft served as policy and reference
    assert sorted(loads) == sorted(lineage[k] for k in ("base", "sft", "dpo", "kto"))
    # a step a load, and one a model judged against each of the baseline and the champion (two each): 8 in all
    assert [(done, total) for done, total, _ in steps] == [(n, 8) for n in range(1, 9)]
    assert [what for _, _, what in steps][:4] == ["policy_dpo measured", "policy_kto measured", "sft_model measured",
                                                  "base measured"]
    assert sorted(what for _, _, what in steps[4:]) == [
        "policy_dpo judged against sft_model", "policy_kto judged against policy_dpo",
        "policy_kto judged against sft_model", "sft_model judged against policy_dpo"]
    assert loads.index(lineage["dpo"]) < loads.index(lineage["sft"]) < loads.index(lineage["base"])
    dpo, kto, sft = (evaluation.results[name].metrics for name in ("policy_dpo", "policy_kto", "sft_model"))
    # kto's weights equal its reference's: zero implicit reward, zero log-ratio, same greedy answers as sft
    assert (kto["preference_accuracy"], kto["reward_margin_mean"], kto["kl_to_reference"]) == (0.0, 0.0, 0.0)
    assert [a.text for a in evaluation.results["policy_kto"].answers] == \
        [a.text for a in evaluation.results["sft_model"].answers]
    assert kto["ties_vs_sft"] == 3 and kto["win_rate_vs_sft"] == 0.5
    assert (kto["win_rate_vs_sft_ci_low"], kto["win_rate_vs_sft_ci_high"]) == pytest.approx(wilson_interval(1.5, 3))
    assert dpo["pairs"] == 3 and dpo["kl_to_reference"] != 0.0 and dpo["reward_margin_mean"] != 0.0
    assert "win_rate_vs_sft" not in sft  # the baseline is not judged against itself
    assert "win_rate_vs_champion" not in dpo and kto["judged_vs_champion"] == 3  # nor the champion
    for metrics in (dpo, kto, sft):
        assert metrics["answers"] == 3 and metrics["mean_tokens"] <= 6
        assert 0.0 <= metrics["empty_rate"] <= metrics["degenerate_rate"] <= 1.0
    assert evaluation.results["policy_kto"].outcomes == {"sft": ["tie"] * 3, "champion": ["tie"] * 3}


def test_a_reward_model_scores_every_answer_and_the_pairs(lineage, tmp_path):
    from alignment_pipelines.evaluation.compare import ModelUnderTest, evaluate_models

    evaluation = evaluate_models([ModelUnderTest("sft_model", lineage["sft"], lineage["base"]),
                                  ModelUnderTest("policy_dpo", lineage["dpo"], lineage["sft"])],
                                 "sft_model", PAIRS, list(PAIRS["prompt"]), RuleJudge(),
                                 reward_model_path=lineage["base"], max_new_tokens=4)
    assert evaluation.reward_model["pairs"] == 3 and 0.0 <= evaluation.reward_model["preference_accuracy"] <= 1.0
    assert len(evaluation.reward_model_scores["chosen"]) == len(evaluation.reward_model_scores["rejected"]) == 3
    for result in evaluation.results.values():
        low, high = result.metrics["reward_mean_ci_low"], result.metrics["reward_mean_ci_high"]
        assert low <= result.metrics["reward_mean"] <= high


def test_a_reward_model_judges_by_its_scores_in_both_orders_in_one_batch(lineage):
    from alignment_pipelines.judges.reward_model import RewardModelJudge

    class Counting(RewardModelJudge):
        batches: list = []

        def score_batch(self, prompts, answers):
            self.batches.append(len(answers))
            return super().score_batch(prompts, answers)

    judge = Counting(lineage["reward"], model_uri="models:/evaluation_reward_model/1", batch_size=2)
    prompts, firsts, seconds = list(PAIRS["prompt"]), list(PAIRS["chosen"]), list(PAIRS["rejected"])
    verdicts = judge.judge(prompts, firsts, seconds)
    assert Counting.batches == [6]  # 3 pairs in both orders: 6 distinct answers scored in one call
    # the reward model's own scores, read without the judge: a judge that inverted them would disagree
    from alignment_pipelines.methods.rewards import reward_model_reward
    from alignment_pipelines.models.loading import load_model

    model, tokenizer = load_model(lineage["reward"], "reward", padding_side="right")
    scores = reward_model_reward(model, tokenizer, 2, max_length=1024)(prompts * 2, firsts + seconds)
    for i, verdict in enumerate(verdicts):
        assert verdict.agrees and not verdict.position_biased
        assert verdict.preferred == ("a" if scores[i] > scores[3 + i] else "b" if scores[i] < scores[3 + i] else "tie")
        assert judge_pair(judge, prompts[i], seconds[i], firsts[i]) == 1.0 - verdict.score_a
    assert judge.id == 'reward_model{"model": "models:/evaluation_reward_model/1"}'
    judge.release()
    assert judge.judge(prompts[:1], firsts[:1], seconds[:1])[0] == verdicts[0]  # loads again after release


def test_the_evaluation_refuses_a_judge_that_a_policy_optimised(lineage, tmp_path):
    import json

    from alignment_pipelines.evaluation.compare import ModelUnderTest, evaluate_models
    from alignment_pipelines.evaluation.schema import JudgeIdentity, JudgeIsOptimisationTarget, optimisation_targets
    from alignment_pipelines.judges.reward_model import RewardModelJudge
    from alignment_pipelines.methods.training import CONFIG_FILE

    # what a PPO policy records: its reward model's registry URI in lineage tags, its folder in the saved config
    ppo_folder = tmp_path / "ppo"
    ppo_folder.mkdir()
    (ppo_folder / CONFIG_FILE).write_text(json.dumps({"reward_model": lineage["base"], "kl_coef": 0.05}))
    targets = optimisation_targets(str(ppo_folder), {"lineage.uses.reward_model": "models:/reward_model/4",
                                                     "lineage.method": "ppo"})
    assert targets == ("models:/reward_model/4", lineage["base"])
    ppo = ModelUnderTest("policy_ppo", lineage["dpo"], lineage["sft"], optimised_against=targets)
    sft = ModelUnderTest("sft_model", lineage["sft"], lineage["base"])

    for training_reward_model in (RewardModelJudge(lineage["base"]),  # its folder
                                  RewardModelJudge(tmp_path / "elsewhere", model_uri="models:/reward_model/4")):
        with pytest.raises(JudgeIsOptimisationTarget, match="the reward model policy_ppo optimised"):
            evaluate_models([sft, ppo], "sft_model", PAIRS, list(PAIRS["prompt"]), training_reward_model,
                            max_new_tokens=4)
        assert training_reward_model._score is None  # refused before any model loaded
    judged = evaluate_models([sft, ppo], "sft_model", PAIRS, list(PAIRS["prompt"]),
                             RewardModelJudge(lineage["reward"], model_uri="models:/evaluation_reward_model/1"),
                             max_new_tokens=4, judge_identity=None)
    assert judged.judge == JudgeIdentity("reward_model", 'reward_model{"model": "models:/evaluation_reward_model/1"}',
                                         heuristic=False, source="explicit",
                                         model_uri="models:/evaluation_reward_model/1", model_path=lineage["reward"])
    assert judged.results["policy_ppo"].metrics["judged_vs_sft"] == 3


def test_the_evaluation_reward_model_judges_when_it_exists_else_the_judge_resource():
    from alignment_pipelines.evaluation.judge_choice import evaluation_judge
    from alignment_pipelines.judges.factory import build_judge
    from alignment_pipelines.judges.reward_model import RewardModelJudge
    from alignment_pipelines.refs import ModelRef

    trained = ModelRef(path="/models/erm", method="reward", base_model="tiny", role="reward",
                       registered_name="evaluation_reward_model", registered_version="2",
                       metrics={"eval_accuracy": 0.8, "eval_pairs_scored": 17, "train_loss": 0.4})
    judge, identity, notes = evaluation_judge("evaluation_reward_model", trained, lambda: build_judge("rule"),
                                              batch_size=4)
    assert isinstance(judge, RewardModelJudge) and judge.model_dir == "/models/erm" and notes == []
    assert (identity.source, identity.model_uri, identity.heuristic) == \
        ("evaluation_reward_model", "models:/evaluation_reward_model/2", False)
    assert identity.metrics == {"eval_accuracy": 0.8, "eval_pairs_scored": 17}  # its accuracy on held-out pairs
    judge, identity, notes = evaluation_judge("evaluation_reward_model", None, lambda: build_judge("rule"),
                                              batch_size=4)
    assert isinstance(judge, RuleJudge) and identity.heuristic and identity.source == "resource"
    assert "No evaluation_reward_model has been trained yet" in notes[0]
    assert identity.headline().startswith("**Judged by a heuristic judge (`rule`)**")
    judge, identity, notes = evaluation_judge("resource", trained, lambda: build_judge("shorter"), batch_size=4)
    assert identity.kind == "shorter" and identity.heuristic and notes == []
    # the command line's --judge-model: the reward model given by hand judges; without it, the deployment's judge
    judge, identity, notes = evaluation_judge("explicit", trained, lambda: build_judge("rule"), batch_size=4)
    assert isinstance(judge, RewardModelJudge) and identity.source == "explicit" and notes == []
    judge, identity, notes = evaluation_judge("resource", None, lambda: build_judge("rule"), batch_size=4)
    assert identity.kind == "rule" and notes == []


def test_an_online_dpo_annotated_by_a_reward_model_never_has_it_as_judge(tiny_model_dir, tmp_path):
    """Online DPO may take a reward model as its annotator; that model is then what the policy optimised."""
    import json

    from alignment_pipelines.evaluation.schema import optimisation_targets
    from alignment_pipelines.judges import build_judge
    from alignment_pipelines.judges.reward_model import RewardModelJudge
    from alignment_pipelines.methods import config_from_dict
    from alignment_pipelines.methods.config import ConfigError
    from alignment_pipelines.methods.training import CONFIG_FILE

    import pandas as pd

    pd.DataFrame({"prompt": ["How do I make green tea?"]}).to_parquet(tmp_path / "prompts.parquet")
    where = {"model": str(tiny_model_dir), "data": str(tmp_path / "prompts.parquet"), "output_dir": str(tmp_path)}
    with pytest.raises(ConfigError, match="judge_model"):
        config_from_dict("online_dpo", where | {"judge": "reward_model"})
    config = config_from_dict("online_dpo", where | {"judge": "reward_model", "judge_model": str(tmp_path / "rm")})
    judge = build_judge(config.judge_spec())
    assert isinstance(judge, RewardModelJudge) and judge.model_dir == str(tmp_path / "rm")

    folder = tmp_path / "online_dpo"
    folder.mkdir()
    (folder / CONFIG_FILE).write_text(json.dumps({"judge": "reward_model", "judge_model": str(tmp_path / "rm")}))
    assert optimisation_targets(str(folder), {}) == (str(tmp_path / "rm"),)
