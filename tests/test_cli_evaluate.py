"""`alignment-pipelines evaluate`: the evaluation asset's measurement and report on models given by hand."""

from __future__ import annotations

from alignment_pipelines.cli import main
from alignment_pipelines.data.demo import demo_feedback_path
from alignment_pipelines.evaluation.plots import training_curves
from alignment_pipelines.evaluation.report import TRAINING_CURVE_KEYS
from alignment_pipelines.evaluation.schema import EvaluationReport
from alignment_pipelines.tracking import Lineage, Tracker


def test_evaluate_a_folder_and_a_registered_version_against_a_baseline(tmp_path, capsys, tiny_model_dir):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, artifact_root=tmp_path / "artifacts")
    run_id = tracker.start_run("sft")
    for step, loss in enumerate([2.0, 1.5, 1.2], start=1):
        tracker.log_metrics(run_id, {"loss": loss}, step=step)
    registered = tracker.register_model(run_id, tiny_model_dir, "sft_model",
                                        Lineage(method="sft", base_model="tiny", dataset_version="v1"))
    tracker.end_run(run_id, succeeded=True)
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("\n".join(demo_feedback_path().read_text().splitlines()[:6]) + "\n")

    status = main(["evaluate", "--baseline", str(tiny_model_dir), f"registered=models:/sft_model/{registered.version}",
                   "--data", str(held_out), "--output-dir", str(tmp_path / "report"), "--tracking-uri", uri,
                   "--max-pairs", "4", "--max-prompts", "2", "--max-new-tokens", "4", "--batch-size", "2"])

    assert status == 0
    out, err = capsys.readouterr()
    assert "evaluating" not in err  # stderr is no terminal here: no bar
    assert out.startswith("**Judged by a heuristic judge (`rule`)**") and "| registered |" in out
    report = EvaluationReport.read(tmp_path / "report" / "evaluation.json")  # what `promote --report` reads
    assert (report.baseline, report.candidates, report.judge.source) == ("baseline", ("registered",), "resource")
    entry = report.models["registered"]
    assert entry.model["registered_name"] == "sft_model" and entry.model["registered_version"] == registered.version
    assert entry.metrics["answers"] == 2 and entry.win_rates["sft"].judged == 2  # both prompts, judged vs the baseline
    assert (tmp_path / "report" / "report.md").read_text().startswith("**Judged by a heuristic judge")
    # the registered version's training run drew its curve: not the empty plot of models without a run
    assert (tmp_path / "report" / "training_curves.png").read_bytes() != training_curves({}, keys=TRAINING_CURVE_KEYS)
