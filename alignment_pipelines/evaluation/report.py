"""The evaluation report: one markdown text with the comparison table, the plots and side-by-side answers.

The same text is the asset's metadata in Dagster (which renders the inline PNGs) and an artifact of
the evaluation's MLflow run, so a reviewer sees the same thing in both places. Its first line says which judge
judged, and that a heuristic judge is one.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from alignment_pipelines.data.schemas import render_prompt
from alignment_pipelines.evaluation.compare import BASELINE, CHAMPION, Evaluation, ModelUnderTest
from alignment_pipelines.evaluation.plots import (length_distributions, markdown_image, reward_vs_kl, score_histogram,
                                                  training_curves, win_rate_bars)
from alignment_pipelines.evaluation.schema import ChampionRef, EvaluationReport, Evidence, ModelEvaluation, WinRate

TRAINING_CURVE_KEYS = ("loss",)
REPORT_FILE = "evaluation.json"  # the gate's input; an evaluation writes it last, only when it succeeded


def newest_report(evaluations_dir: str | Path) -> Path | None:
    """The most recent evaluation's ``evaluation.json`` under ``evaluations_dir`` (one folder per run)."""
    reports = sorted(Path(evaluations_dir).glob(f"*/{REPORT_FILE}"), key=lambda path: path.stat().st_mtime)
    return reports[-1] if reports else None


def training_history(client, run_id: str | None) -> list[dict]:
    """The per-step training curves (``TRAINING_CURVE_KEYS``) a model's MLflow run recorded, for the report's plot;
    none for a model without a run (a folder trained elsewhere)."""
    if not run_id:
        return []
    steps: dict[int, dict] = {}
    for key in TRAINING_CURVE_KEYS:
        for metric in client.get_metric_history(run_id, key):
            steps.setdefault(metric.step, {"step": metric.step})[key] = metric.value
    return [steps[step] for step in sorted(steps)]


def write_report(folder: Path, evaluation: Evaluation, histories: dict[str, Sequence[dict]],
                 notes: Sequence[str] = ()) -> str:
    """report.md and its plots (PNG files) in ``folder``; returns the markdown. ``evaluation.json`` is not among
    them: the caller writes it last, once the evaluation is recorded, so that promotion never reads a partial one."""
    plots = evaluation_plots(evaluation, histories)
    markdown = render_report(evaluation, plots, notes=notes)
    folder.mkdir(parents=True, exist_ok=True)
    for name, png in plots.items():
        (folder / f"{name}.png").write_bytes(png)
    (folder / "report.md").write_text(markdown)
    return markdown


def build_report(evaluation: Evaluation, models: Sequence[ModelUnderTest], entries: dict[str, dict],
                      evidence: Evidence, candidates: Sequence[str], *, champion: ChampionRef | None = None,
                      not_evaluated: Sequence[str] = (),
                      training_reward_model: dict[str, Any] | None = None) -> EvaluationReport:
    """What ``evaluation.json`` holds: each model's entry (``entries``: its ModelRef as a dict), numbers, win-rates
    and the reward models it optimised; the evaluation's judge and baseline; ``training_reward_model`` (where it
    came from) with its accuracy on the held-out pairs."""
    optimised_against = {m.name: m.optimised_against for m in models}
    return EvaluationReport(
        judge=evaluation.judge, baseline=evaluation.baseline, champion=champion, candidates=tuple(candidates),
        models={name: ModelEvaluation(entries[name], result.metrics, win_rates={
            label: rate for label in (BASELINE, CHAMPION) if (rate := WinRate.from_metrics(result.metrics, label))},
            optimised_against=optimised_against[name]) for name, result in evaluation.results.items()},
        evidence=evidence, not_evaluated=tuple(not_evaluated),
        training_reward_model=None if training_reward_model is None else {
            **training_reward_model, **(evaluation.reward_model or {})})


def evaluation_plots(evaluation: Evaluation, histories: dict[str, Sequence[dict]]) -> dict[str, bytes]:
    """Every picture of the report as PNG bytes, by file stem: win-rate bars against the SFT model and the
    champion, reward against KL, answer lengths, the training curves in ``histories`` (model → steps) and,
    with a reward model, its scores of the chosen and rejected answers."""
    results = evaluation.results.values()
    plots = {}
    for label in (BASELINE, CHAMPION):
        key = f"win_rate_vs_{label}"
        rows = [{"name": r.name, "win_rate": r.metrics[key], "ci_low": r.metrics[f"{key}_ci_low"],
                 "ci_high": r.metrics[f"{key}_ci_high"]} for r in results if key in r.metrics]
        if label == BASELINE or evaluation.champion is not None:
            plots[key] = win_rate_bars(rows, title=f"Win-rate vs. {_against(evaluation, label)} (95% interval)")
    with_reward = any("reward_mean" in r.metrics for r in results)
    y_key = "reward_mean" if with_reward else "win_rate_vs_sft"
    plots["reward_vs_kl"] = reward_vs_kl(
        [{"name": r.name, "reward": r.metrics.get(y_key), "kl": r.metrics.get("kl_to_reference")} for r in results],
        title="Reward vs. KL to the reference" if with_reward else "Win-rate vs. SFT against KL to the reference",
        ylabel="mean reward-model score" if with_reward else "win-rate vs. SFT")
    plots["lengths"] = length_distributions({r.name: [a.tokens for a in r.answers] for r in results})
    plots["training_curves"] = training_curves(histories, keys=TRAINING_CURVE_KEYS)
    if evaluation.reward_model_scores:
        plots["reward_model_scores"] = score_histogram(evaluation.reward_model_scores["chosen"],
                                                       evaluation.reward_model_scores["rejected"],
                                                       title="Reward model on the held-out pairs")
    return plots


def comparison_table(evaluation: Evaluation) -> str:
    """One row per model, the numbers a reviewer compares methods by; intervals are 95%."""
    champion = evaluation.champion is not None
    header = ["model", "preference accuracy", f"win-rate vs. {_against(evaluation, BASELINE)} [CI] W/L/T"]
    header += [f"win-rate vs. {_against(evaluation, CHAMPION)} [CI] W/L/T"] if champion else []
    header += ["reward-model score [CI]", "KL to reference", "mean tokens", "empty", "degenerate"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for r in evaluation.results.values():
        m = r.metrics
        name = r.name + (" (champion)" if r.name == evaluation.champion else "") + \
            (" (baseline)" if r.name == evaluation.baseline else "")
        cells = [name, _fmt(m.get("preference_accuracy")), _win_rate_cell(m, BASELINE)]
        cells += [_win_rate_cell(m, CHAMPION)] if champion else []
        cells += [_with_interval(m, "reward_mean"), _fmt(m.get("kl_to_reference")), _fmt(m.get("mean_tokens")),
                  _fmt(m.get("empty_rate")), _fmt(m.get("degenerate_rate"))]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def side_by_side(evaluation: Evaluation, max_examples: int = 3) -> str:
    """The first prompts with every model's answer under each other, marked win/loss/tie against the baseline."""
    blocks = []
    for i, prompt in enumerate(evaluation.prompts[:max_examples]):
        blocks += [f"### Prompt {i + 1}", "", _quote(render_prompt(prompt)), ""]
        for r in evaluation.results.values():
            verdicts = [f"{outcomes[i]} vs. {_against(evaluation, label)}"
                        for label, outcomes in r.outcomes.items() if i < len(outcomes)]
            blocks += [f"**{r.name}**" + (f" ({', '.join(verdicts)})" if verdicts else ""), "",
                       _quote(r.answers[i].text), ""]
    return "\n".join(blocks) if blocks else "*(no prompts)*"


def render_report(evaluation: Evaluation, plots: dict[str, bytes], *, title: str = "Evaluation",
                  notes: Sequence[str] = (), max_examples: int = 3) -> str:
    """The whole report: which judge judged (first line), table, notes, the reward models' own accuracy, the plots
    inline, and samples."""
    judge = evaluation.judge
    lines = [judge.headline(), "", f"# {title}", "", comparison_table(evaluation), ""]
    lines += [f"Judge: `{judge.id}`, every pair judged in both orders (a pair whose orders disagree is a "
              f"tie; ties count half). {evaluation.pairs} held-out pairs, {len(evaluation.prompts)} prompts. "
              "KL: mean log-ratio of each model's own answers to its reference.", ""]
    if "eval_accuracy" in judge.metrics:
        accuracy, scored = judge.metrics["eval_accuracy"], judge.metrics.get("eval_pairs_scored")
        share = f"{accuracy * scored:g} of the {scored:g}" if scored else "a share of the"
        lines += [f"The judge prefers the human-chosen answer on {share} held-out pairs it was scored on after "
                  f"training (accuracy {accuracy:.2f}; a tie counts half).", ""]
    lines += [f"- {note}" for note in notes] + ([""] if notes else [])
    if evaluation.reward_model is not None:
        lines += [f"Training reward model (what PPO and RLOO optimised; its score is shown, it never judges): "
                  f"preference accuracy {_fmt(evaluation.reward_model['preference_accuracy'])} on "
                  f"{evaluation.reward_model['pairs']} held-out pairs.", ""]
    lines += ["## Plots", ""] + [markdown_image(png, name.replace("_", " ")) + "\n" for name, png in plots.items()]
    lines += ["## Side by side", "", side_by_side(evaluation, max_examples)]
    return "\n".join(lines).rstrip() + "\n"


def _against(evaluation: Evaluation, label: str) -> str:
    return evaluation.baseline if label == BASELINE else (evaluation.champion or "champion")


def _win_rate_cell(metrics: dict, label: str) -> str:
    key = f"win_rate_vs_{label}"
    if key not in metrics:
        return "—"
    return (f"{_with_interval(metrics, key)} {metrics[f'wins_vs_{label}']}/{metrics[f'losses_vs_{label}']}/"
            f"{metrics[f'ties_vs_{label}']}")


def _with_interval(metrics: dict, key: str) -> str:
    if key not in metrics:
        return "—"
    return f"{_fmt(metrics[key])} [{_fmt(metrics.get(f'{key}_ci_low'))}, {_fmt(metrics.get(f'{key}_ci_high'))}]"


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.3g}"
    return str(value)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _quote(text: str) -> str:
    text = (text or "").strip()
    if not text:
        return "> *(empty)*"
    return "\n".join("> " + line if line else ">" for line in text.splitlines())
