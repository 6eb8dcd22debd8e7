"""The report renders for one method and for every method, with valid PNG plots inline."""

import base64
import io
import math
import re

import pytest
from PIL import Image

from alignment_pipelines.evaluation.compare import Evaluation, ModelResult
from alignment_pipelines.evaluation.metrics import Answer
from alignment_pipelines.evaluation.report import (comparison_table, evaluation_plots, newest_report,
                                                   render_report)
from alignment_pipelines.evaluation.stats import wilson_interval

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


def evaluation_of(policies: list[str], champion: str | None = None, reward: bool = False) -> Evaluation:
    against = ("sft", "champion") if champion else ("sft",)
    results = {"sft_model": result("sft_model", 0, against=(), reward=reward)}
    results |= {name: result(name, i + 1, against, reward) for i, name in enumerate(policies)}
    return Evaluation(prompts=PROMPTS, results=results, baseline="sft_model", champion=champion, judge="rule", pairs=9,
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
    evaluation = evaluation_of(ALL_METHODS, champion="policy_dpo", reward=True)
    plots = evaluation_plots(evaluation, {})
    assert set(plots) == {"win_rate_vs_sft", "win_rate_vs_champion", "reward_vs_kl", "lengths", "training_curves",
                          "reward_model_scores"}
    markdown = render_report(evaluation, plots, max_examples=2)
    table = comparison_table(evaluation).splitlines()
    assert len(table) == 2 + 1 + len(ALL_METHODS)
    assert "win-rate vs. policy_dpo [CI] W/L/T" in table[0]
    assert table[3].startswith("| policy_dpo (champion) |")
    assert all(f"| {name} |" in "\n".join(table) for name in ALL_METHODS[1:])
    assert "| 0.2 [0.1, 0.3] |" in table[3]  # reward-model score with its interval
    assert "Reward model: preference accuracy 0.75 on 8 held-out pairs." in markdown
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
