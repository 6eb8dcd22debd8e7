"""The report renders for one method and for every method, with valid PNG plots inline."""

import base64
import io
import json
import math
import re

import pytest
from PIL import Image

from alignment_pipelines.evaluation.compare import Evaluation, ModelResult
from alignment_pipelines.evaluation.metrics import Answer
from alignment_pipelines.evaluation.report import (comparison_table, evaluation_plots, newest_report,
                                                   render_report)
from alignment_pipelines.evaluation.schema import (SCHEMA_VERSION, ChampionRef, EvaluationReport, Evidence,
                                                   JudgeIdentity, JudgeIsOptimisationTarget, ModelEvaluation,
                                                   ReportSchemaError, WinRate)
from alignment_pipelines.evaluation.stats import wilson_interval
from alignment_pipelines.judges import RuleJudge
from alignment_pipelines.judges.reward_model import RewardModelJudge

ALL_METHODS = ["policy_dpo", "policy_kto", "policy_orpo", "policy_ppo", "policy_rloo", "policy_online_dpo"]
PROMPTS = ["How do I make green tea?", "Name a colour.", "Say hi."]


def result(name: str, index: int, against: tuple[str, ...] = ("sft",), reward: bool = False) -> ModelResult:
    metrics = {"answers": 3, "mean_tokens": 10.0 + index, "mean_chars": 40.0, "empty_rate": 0.0,
               "unfinished_rate": 0.0, "degenerate_rate": 1 / 3, "preference_accuracy": 0.5 + index / 20,
               "kl_to_reference": 0.1 * index}
    for label in against:
        wins = min(3, index)
        low, high = wilson_interval(wins + 0.5 * (3 - wins), 3)
        metrics |= {f"win_rate_vs_{label}": (wins + 0.5 * (3 - wins)) / 3, f"win_rate_vs_{label}_ci_low": low,
                    f"win_rate_vs_{label}_ci_high": high, f"wins_vs_{label}": wins, f"losses_vs_{label}": 0,
                    f"ties_vs_{label}": 3 - wins, f"judged_vs_{label}": 3}
    if reward:
        metrics |= {"reward_mean": 0.2 * index, "reward_mean_ci_low": 0.2 * index - 0.1,
                    "reward_mean_ci_high": 0.2 * index + 0.1}
    answers = [Answer(f"{name} answer {i} | with a pipe", 10 + index + i, True) for i in range(3)]
    outcomes = {label: ["win"] * min(3, index) + ["tie"] * (3 - min(3, index)) for label in against}
    return ModelResult(name, metrics, answers, outcomes)


RULE = JudgeIdentity.of(RuleJudge(), source="resource")
EVALUATION_RM = JudgeIdentity.of(RewardModelJudge("/models/evaluation_reward_model/3",
                                                  model_uri="models:/evaluation_reward_model/3"),
                                 source="evaluation_reward_model", metrics={"eval_accuracy": 0.9, "eval_pairs_scored": 20.0})


def evaluation_of(policies: list[str], champion: str | None = None, reward: bool = False,
                  judge: JudgeIdentity = RULE) -> Evaluation:
    against = ("sft", "champion") if champion else ("sft",)
    results = {"sft_model": result("sft_model", 0, against=(), reward=reward)}
    results |= {name: result(name, i + 1, against, reward) for i, name in enumerate(policies)}
    return Evaluation(prompts=PROMPTS, results=results, baseline="sft_model", champion=champion, judge=judge, pairs=9,
                      reward_model={"preference_accuracy": 0.75, "reward_margin_mean": 0.4, "pairs": 8} if reward
                      else None,
                      reward_model_scores={"chosen": [1.0, 2.0], "rejected": [0.0, 0.5]} if reward else {})


def pngs_in(markdown: str) -> dict[str, bytes]:
    return {alt: base64.b64decode(data)
            for alt, data in re.findall(r"!\[([^\]]*)\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", markdown)}


def assert_png(png: bytes):
    Image.open(io.BytesIO(png)).verify()
    assert Image.open(io.BytesIO(png)).size[0] == 480


def test_the_report_for_one_method():
    evaluation = evaluation_of(["policy_dpo"])
    plots = evaluation_plots(evaluation, {"policy_dpo": [{"step": s, "loss": 1 / (s + 1)} for s in range(5)]})
    assert set(plots) == {"win_rate_vs_sft", "reward_vs_kl", "lengths", "training_curves"}
    markdown = render_report(evaluation, plots, notes=["Not evaluated (never trained): policy_kto"])
    assert markdown.splitlines()[0].startswith("**Judged by a heuristic judge (`rule`)**")
    table = comparison_table(evaluation)
    assert table in markdown
    rows = table.splitlines()
    assert len(rows) == 4 and rows[2].startswith("| sft_model (baseline) |")
    # win-rate 2/3 (one win, two ties counted half) with its Wilson interval, and the counts
    low, high = wilson_interval(2, 3)
    assert f"| 0.667 [{low:.3g}, {high:.3g}] 1/0/2 |" in rows[3]
    assert "vs. champion" not in table  # no champion yet: no column for it
    assert "- Not evaluated (never trained): policy_kto" in markdown
    embedded = pngs_in(markdown)
    assert list(embedded) == ["win rate vs sft", "reward vs kl", "lengths", "training curves"]
    for name, png in plots.items():
        assert embedded[name.replace("_", " ")] == png
        assert_png(png)
    samples = markdown.split("## Side by side")[1]
    assert samples.count("### Prompt") == 3 and samples.count("**policy_dpo** (win vs. sft_model)") == 1
    assert "> policy_dpo answer 0 | with a pipe" in samples and "> sft_model answer 2 | with a pipe" in samples


def test_the_report_for_every_method_with_a_champion_and_a_reward_model():
    evaluation = evaluation_of(ALL_METHODS, champion="policy_dpo", reward=True, judge=EVALUATION_RM)
    plots = evaluation_plots(evaluation, {})
    assert set(plots) == {"win_rate_vs_sft", "win_rate_vs_champion", "reward_vs_kl", "lengths", "training_curves",
                          "reward_model_scores"}
    markdown = render_report(evaluation, plots, max_examples=2)
    first = markdown.splitlines()[0]
    assert first.startswith("**Judged by `reward_model` models:/evaluation_reward_model/3**, the evaluation reward "
                            "model trained on the judge split") and "heuristic" not in first
    assert "The judge prefers the human-chosen answer on 18 of the 20 held-out pairs it was scored on after training (accuracy 0.90" in markdown
    table = comparison_table(evaluation).splitlines()
    assert len(table) == 2 + 1 + len(ALL_METHODS)
    assert "win-rate vs. policy_dpo [CI] W/L/T" in table[0]
    assert table[3].startswith("| policy_dpo (champion) |")
    assert all(f"| {name} |" in "\n".join(table) for name in ALL_METHODS[1:])
    assert "| 0.2 [0.1, 0.3] |" in table[3]  # reward-model score with its interval
    assert "it never judges): preference accuracy 0.75 on 8 held-out pairs." in markdown
    assert len(pngs_in(markdown)) == 6 and all(Image.open(io.BytesIO(p)).verify() is None
                                               for p in pngs_in(markdown).values())
    assert markdown.count("### Prompt") == 2 and markdown.count("**policy_online_dpo**") == 2


def test_missing_numbers_render_as_such():
    evaluation = evaluation_of(["policy_dpo"])
    evaluation.results["policy_dpo"].metrics["preference_accuracy"] = math.nan
    del evaluation.results["policy_dpo"].metrics["kl_to_reference"]
    row = comparison_table(evaluation).splitlines()[3]
    assert row.startswith("| policy_dpo | n/a |") and "| — |" in row


def test_the_newest_report_is_found(tmp_path):
    import os

    assert newest_report(tmp_path) is None
    for i, run in enumerate(["b", "a"]):
        (tmp_path / run).mkdir()
        (tmp_path / run / "evaluation.json").write_text("{}")
        os.utime(tmp_path / run / "evaluation.json", (1000 + i, 1000 + i))
    (tmp_path / "failed").mkdir()  # a failed evaluation writes no evaluation.json
    assert newest_report(tmp_path) == tmp_path / "a" / "evaluation.json"


@pytest.mark.parametrize("policies", [[], ["policy_dpo"]])
def test_plots_render_without_answers_or_curves(policies):
    evaluation = evaluation_of(policies)
    for result_ in evaluation.results.values():
        result_.answers = []
    for png in evaluation_plots(evaluation, {}).values():
        assert_png(png)


# --------------------------------------------------------------------------------------
# The typed report: what the evaluation writes and promotion reads
# --------------------------------------------------------------------------------------


def report_of(evaluation: Evaluation, optimised: dict[str, tuple[str, ...]] | None = None) -> EvaluationReport:
    optimised = optimised or {"policy_ppo": ("models:/reward_model/2",), "policy_rloo": ("models:/reward_model/2",)}
    models = {name: ModelEvaluation(
        {"path": f"/models/{name}", "registered_name": name, "registered_version": "1"}, r.metrics,
        {label: rate for label in ("sft", "champion") if (rate := WinRate.from_metrics(r.metrics, label))},
        optimised.get(name, ())) for name, r in evaluation.results.items()}
    return EvaluationReport(judge=evaluation.judge, baseline="sft_model",
                            champion=ChampionRef("policy_dpo", "2", "models:/policy_dpo/1") if evaluation.champion
                            else None, candidates=tuple(sorted(models)), models=models,
                            evidence=Evidence("run-1", "dagster-1", "/reports/1"))


def test_the_report_round_trips_through_json_with_typed_win_rates():
    report = report_of(evaluation_of(ALL_METHODS, champion="policy_dpo", judge=EVALUATION_RM))
    text = report.to_json()
    again = EvaluationReport.from_json(text)
    assert again == report and again.schema_version == SCHEMA_VERSION == json.loads(text)["schema_version"]
    dpo = again.models["policy_dpo"].win_rates
    assert set(dpo) == {"sft", "champion"} and dpo["sft"].wins == 1 and dpo["sft"].judged == 3
    assert (dpo["sft"].ci_low, dpo["sft"].ci_high) == wilson_interval(2, 3)
    assert again.judge.model_uri == "models:/evaluation_reward_model/3" and not again.judge.heuristic
    assert again.models["policy_ppo"].optimised_against == ("models:/reward_model/2",)
    # nothing judged: a NaN rate is written as null and read back as missing
    nothing = report_of(evaluation_of(["policy_dpo"]))
    nothing.models["policy_dpo"].metrics["win_rate_vs_sft"] = math.nan
    assert EvaluationReport.from_json(nothing.to_json()).models["policy_dpo"].metrics["win_rate_vs_sft"] is None


def test_an_unknown_or_missing_schema_version_is_refused(tmp_path):
    data = report_of(evaluation_of(["policy_dpo"])).to_dict()
    with pytest.raises(ReportSchemaError, match=r"schema_version 2; this code reads version 1 only"):
        EvaluationReport.from_dict(data | {"schema_version": 2})
    path = tmp_path / "evaluation.json"
    path.write_text(json.dumps({k: v for k, v in data.items() if k != "schema_version"}))
    with pytest.raises(ReportSchemaError, match=f"{path} has no schema_version: it was written before the typed"):
        EvaluationReport.read(path)


@pytest.mark.parametrize("breakage, message", [
    (lambda d: d.pop("judge"), "missing field 'judge'"),
    (lambda d: d["models"]["policy_dpo"]["win_rates"]["sft"].update(wins="one"), "wins must be a number"),
    (lambda d: d["judge"].update(strictness=1), r"judge has unknown fields \['strictness'\]"),
    (lambda d: d.update(candidates=["policy_dpo", "policy_gone"]), "the candidate 'policy_gone' is not among"),
    (lambda d: d.update(models=[]), "models must be a dict"),
])
def test_a_malformed_report_is_refused_naming_the_field(breakage, message):
    data = report_of(evaluation_of(["policy_dpo"])).to_dict()
    breakage(data)
    with pytest.raises(ReportSchemaError, match=message):
        EvaluationReport.from_dict(data, source="evaluation.json")


def test_a_report_judged_by_a_reward_model_a_policy_optimised_is_refused():
    training_rm = JudgeIdentity.of(RewardModelJudge("/models/reward_model/2", model_uri="models:/reward_model/2"),
                                   source="explicit")
    with pytest.raises(JudgeIsOptimisationTarget, match="reward_model/2, the reward model policy_ppo optimised"):
        report_of(evaluation_of(["policy_dpo", "policy_ppo"], judge=training_rm))
    data = report_of(evaluation_of(["policy_dpo", "policy_ppo"], judge=EVALUATION_RM)).to_dict()
    data["judge"] |= {"model_uri": "models:/reward_model/2"}  # a report edited to say so is refused on reading
    with pytest.raises(JudgeIsOptimisationTarget):
        EvaluationReport.from_dict(data)
    assert EvaluationReport.from_dict(data | {"models": {k: v for k, v in data["models"].items()
                                                         if k != "policy_ppo"},
                                              "candidates": ["policy_dpo", "sft_model"]}).judge.model_uri
