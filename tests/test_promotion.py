"""The promotion gate on synthetic metrics; promote/rollback on a real MLflow registry, through the CLI, the
Dagster jobs and after a real evaluation; and the exported champion."""

import json
import shutil
import subprocess
import sys
from dataclasses import fields

import dagster as dg
import pandas as pd
import pytest

from alignment_pipelines.cli import main
from alignment_pipelines.evaluation.schema import (
    ChampionRef,
    EvaluationReport,
    Evidence,
    JudgeIdentity,
    ModelEvaluation,
)
from alignment_pipelines.promotion import (
    ALIGNED_MODEL,
    GateConfig,
    GateDecision,
    PromotionRefused,
    StaleEvaluation,
    choose_candidate,
    current_champion,
    current_version,
    decide,
    decide_all,
    promote,
    promote_from_report,
    rollback,
)
from alignment_pipelines.tracking import Tracker
from test_cli_errors import one_line_error

CHAMPION = {"preference_accuracy": 0.70, "degenerate_rate": 0.05}


def candidate(vs_champion=(0.70, 0.60, 0.80), vs_sft=(0.75, 0.65, 0.85), preference_accuracy=0.72,
              degenerate_rate=0.04) -> dict:
    metrics = {"preference_accuracy": preference_accuracy, "degenerate_rate": degenerate_rate}
    for baseline, interval in (("champion", vs_champion), ("sft", vs_sft)):
        if interval is not None:
            rate, low, high = interval
            metrics |= {f"win_rate_vs_{baseline}": rate, f"win_rate_vs_{baseline}_ci_low": low,
                        f"win_rate_vs_{baseline}_ci_high": high}
    return metrics


# --------------------------------------------------------------------------------------
# The gate
# --------------------------------------------------------------------------------------


def test_a_clear_winner_without_regressions_is_promoted():
    decision = decide(candidate(), CHAMPION)
    assert decision.promote and decision.reason.startswith("passed:")
    assert decision.evidence["baseline"] == "champion"
    assert {c["check"] for c in decision.evidence["checks"]} == {
        "win_rate_vs_champion_ci_low", "preference_accuracy_regression", "degenerate_rate_regression",
        "preference_accuracy_limit", "degenerate_rate_limit"}
    json.dumps(decision.evidence, allow_nan=False)  # stored as a registry tag


def test_a_candidate_that_loses_is_refused():
    decision = decide(candidate(vs_champion=(0.30, 0.20, 0.42)), CHAMPION)
    assert not decision.promote and "loses" in decision.reason


@pytest.mark.parametrize("interval", [(0.55, 0.41, 0.68), (0.50, 0.35, 0.65), (0.60, 0.50, 0.70)])
def test_an_interval_that_includes_one_half_is_a_tie_and_refused(interval):
    decision = decide(candidate(vs_champion=interval), CHAMPION)
    assert not decision.promote and "tie" in decision.reason


def test_without_an_upper_bound_a_low_lower_bound_refuses_without_calling_it_a_tie():
    metrics = {**CHAMPION, "win_rate_vs_champion": 0.6, "win_rate_vs_champion_ci_low": 0.45}
    decision = decide(metrics, CHAMPION)
    assert not decision.promote and "lower bound not above 0.5" in decision.reason


def test_a_lower_bound_above_one_half_but_below_the_configured_bound_is_refused():
    config = GateConfig(min_win_rate_lower_bound=0.6)
    assert not decide(candidate(vs_champion=(0.70, 0.55, 0.80)), CHAMPION, config).promote
    assert decide(candidate(vs_champion=(0.75, 0.61, 0.85)), CHAMPION, config).promote


def test_the_first_model_is_judged_against_sft_on_its_own_checks():
    first = candidate(vs_champion=None)
    decision = decide(first, None)
    assert decision.promote and decision.evidence["baseline"] == "sft" and decision.evidence["champion"] is None
    assert not decide(candidate(vs_champion=None, vs_sft=(0.55, 0.45, 0.65)), None).promote
    assert not decide(candidate(vs_champion=None, degenerate_rate=0.5), None).promote  # the absolute ceiling
    assert not decide(candidate(vs_champion=None, preference_accuracy=0.4), None).promote  # the absolute floor


@pytest.mark.parametrize("metric, value, promoted", [
    ("preference_accuracy", 0.69, True),   # 1 point below the champion, within the 2-point tolerance
    ("preference_accuracy", 0.66, False),  # 4 points below
    ("degenerate_rate", 0.06, True),
    ("degenerate_rate", 0.10, False),
])
def test_regressions_beyond_the_tolerance_refuse(metric, value, promoted):
    decision = decide(candidate(**{metric: value}), CHAMPION)
    assert decision.promote is promoted
    if not promoted:
        assert "regression" in decision.reason and metric in decision.reason


def test_missing_or_nan_win_rate_refuses():
    assert not decide(candidate(vs_champion=None), CHAMPION).promote
    assert not decide(candidate(vs_champion=(float("nan"),) * 3), CHAMPION).promote


def test_a_metric_neither_model_has_is_skipped_but_one_only_the_champion_has_refuses():
    without_accuracy = {k: v for k, v in candidate().items() if k != "preference_accuracy"}
    decision = decide(without_accuracy, {"degenerate_rate": 0.05})
    assert decision.promote
    assert any("preference_accuracy" in note for note in decision.evidence["skipped"])
    assert not decide(without_accuracy, CHAMPION).promote


def test_gate_config_is_validated_and_documented():
    with pytest.raises(ValueError, match="min_win_rate_lower_bound"):
        GateConfig(min_win_rate_lower_bound=1.5)
    with pytest.raises(ValueError, match="max_degenerate_rate_increase"):
        GateConfig(max_degenerate_rate_increase=-0.1)
    assert all(f.metadata.get("help") for f in fields(GateConfig))


def test_choose_candidate_picks_the_strongest_passing_candidate():
    candidates = {
        "dpo": candidate(vs_champion=(0.70, 0.58, 0.80)),
        "kto": candidate(vs_champion=(0.80, 0.66, 0.90)),
        "orpo": candidate(vs_champion=(0.90, 0.80, 0.95), degenerate_rate=0.3),  # strongest, but degenerate
        "ppo": candidate(vs_champion=(0.55, 0.45, 0.65)),
    }
    name, decision = choose_candidate(candidates, CHAMPION)
    assert name == "kto" and decision.promote
    assert [n for n, d in decide_all(candidates, CHAMPION).items() if d.promote] == ["dpo", "kto"]


def test_choose_candidate_ranks_against_sft_when_there_is_no_champion_and_may_find_none():
    candidates = {"dpo": candidate(vs_champion=None, vs_sft=(0.80, 0.70, 0.88)),
                  "kto": candidate(vs_champion=None, vs_sft=(0.75, 0.62, 0.85))}
    assert choose_candidate(candidates, None)[0] == "dpo"
    ties = {name: candidate(vs_champion=(0.5, 0.4, 0.6)) for name in ("dpo", "kto")}
    assert choose_candidate(ties, CHAMPION) is None
    assert choose_candidate({}, None) is None


# --------------------------------------------------------------------------------------
# The registry: a real MLflow registry on SQLite (one database per module: migrations take seconds)
# --------------------------------------------------------------------------------------

PASSED = GateDecision(promote=True, reason="passed: synthetic", evidence={"win_rate_vs_champion_ci_low": 0.6})


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db", registry_uri=f"sqlite:///{root}/mlflow.db")
    client.create_experiment("promotion", artifact_location=(root / "artifacts").as_uri())
    return client


@pytest.fixture
def registered(client, request, tmp_path):
    """A registered model named after the test, with three versions of a tiny logged artifact."""
    name = request.node.name.replace("[", "_").replace("]", "")
    experiment = client.get_experiment_by_name("promotion").experiment_id
    client.create_registered_model(name)
    weights = tmp_path / "weights.txt"
    for version in range(3):
        weights.write_text(f"weights {version}")
        run_id = client.create_run(experiment).info.run_id
        client.log_artifact(run_id, str(weights), "model")
        client.set_terminated(run_id)
        client.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id)
    return name


def tags(client, name, version):
    return client.get_model_version(name, version).tags


def test_promote_records_who_why_and_evidence(client, registered):
    assert promote(client, registered, "1", PASSED, actor="alice") is None
    assert current_version(client, registered) == "1"
    recorded = tags(client, registered, "1")
    assert recorded["promotion.actor"] == "alice" and recorded["promotion.reason"] == "passed: synthetic"
    assert json.loads(recorded["promotion.evidence"]) == PASSED.evidence
    assert "promotion.previous_champion" not in recorded and "promotion.time" in recorded


def test_rollback_restores_the_exact_previous_version(client, registered):
    promote(client, registered, "1", PASSED, actor="alice")
    assert promote(client, registered, "3", PASSED, actor="bob") == "1"
    assert tags(client, registered, "3")["promotion.previous_champion"] == "1"
    assert rollback(client, registered, actor="carol", reason="complaints") == "1"
    assert current_version(client, registered) == "1"
    demoted = tags(client, registered, "3")
    assert (demoted["rollback.actor"], demoted["rollback.reason"], demoted["rollback.restored_version"]) == \
        ("carol", "complaints", "1")
    assert tags(client, registered, "1")["promotion.actor"] == "alice"  # the restored version is untouched


def test_promote_rollback_promote_is_consistent(client, registered):
    promote(client, registered, "1", PASSED, actor="alice")
    promote(client, registered, "2", PASSED, actor="bob")
    rollback(client, registered, actor="carol")
    assert promote(client, registered, "2", PASSED, actor="dave") == "1"
    assert current_version(client, registered) == "2"
    repromoted = tags(client, registered, "2")
    assert repromoted["promotion.actor"] == "dave" and repromoted["promotion.previous_champion"] == "1"
    assert not any(key.startswith("rollback.") for key in repromoted)
    assert rollback(client, registered, actor="erin") == "1" and current_version(client, registered) == "1"


def test_rollbacks_walk_back_through_earlier_champions_and_stop_at_the_first(client, registered):
    for version in ("1", "2", "3"):
        promote(client, registered, version, PASSED, actor="alice")
    assert rollback(client, registered, actor="bob") == "2"
    assert rollback(client, registered, actor="bob") == "1"
    with pytest.raises(ValueError, match="no previous"):
        rollback(client, registered, actor="bob")
    assert current_version(client, registered) == "1"


def test_rollback_without_a_champion_fails(client, registered):
    with pytest.raises(ValueError, match="no 'champion'"):
        rollback(client, registered, actor="bob")


def test_a_refused_decision_moves_nothing(client, registered):
    promote(client, registered, "1", PASSED, actor="alice")
    refused = GateDecision(promote=False, reason="refused: a tie", evidence={})
    with pytest.raises(PromotionRefused, match="a tie"):
        promote(client, registered, "2", refused, actor="bob")
    assert current_version(client, registered) == "1" and tags(client, registered, "2") == {}


def test_promoting_the_champion_again_changes_nothing(client, registered):
    promote(client, registered, "1", PASSED, actor="alice")
    before = tags(client, registered, "1")
    assert promote(client, registered, "1", PASSED, actor="bob") == "1"
    assert tags(client, registered, "1") == before


def test_a_failed_alias_move_leaves_alias_and_tags_as_they_were(client, registered, monkeypatch):
    for version in ("1", "2", "3"):
        promote(client, registered, version, PASSED, actor="alice")
    rollback(client, registered, actor="carol")  # champion 2 (previous: 1); 3 carries rollback tags
    before = {version: tags(client, registered, version) for version in ("1", "2", "3")}

    def registry_down(*args, **kwargs):
        raise RuntimeError("registry went away")

    monkeypatch.setattr(client, "set_registered_model_alias", registry_down)
    with pytest.raises(RuntimeError, match="went away"):
        promote(client, registered, "3", PASSED, actor="dave")
    with pytest.raises(RuntimeError, match="went away"):
        rollback(client, registered, actor="dave")
    assert current_version(client, registered) == "2"
    assert {version: tags(client, registered, version) for version in ("1", "2", "3")} == before


def test_a_promotion_cut_short_after_its_move_keeps_the_history_and_the_bar_and_a_rerun_finishes_it(
        client, registered, monkeypatch):
    promote(client, registered, "1", PASSED, actor="alice")
    promote(client, registered, "2", PASSED, actor="bob")
    rollback(client, registered, actor="carol", reason="complaints")  # champion 1; 2 carries the rollback bar
    move, tag = client.set_registered_model_alias, client.set_model_version_tag
    moved = []

    def move_and_remember(*args):
        move(*args)
        moved.append(args)

    def tag_until_the_move(*args):
        if moved:
            raise RuntimeError("registry went away")
        return tag(*args)

    monkeypatch.setattr(client, "set_registered_model_alias", move_and_remember)
    monkeypatch.setattr(client, "set_model_version_tag", tag_until_the_move)
    with pytest.raises(RuntimeError, match="went away"):
        promote(client, registered, "2", PASSED, actor="dave")  # readmitted, but the audit never gets written
    monkeypatch.undo()
    assert current_version(client, registered) == "2"
    cut_short = tags(client, registered, "2")
    assert cut_short["promotion.previous_champion"] == "1" and "promotion.pending" in cut_short
    assert cut_short["promotion.actor"] == "bob" and cut_short["rollback.reason"] == "complaints"  # stale, marked

    assert promote(client, registered, "2", PASSED, actor="dave") == "2"  # the re-run finishes the audit
    finished = tags(client, registered, "2")
    assert finished["promotion.actor"] == "dave" and finished["promotion.previous_champion"] == "1"
    assert "promotion.pending" not in finished and not any(key.startswith("rollback.") for key in finished)
    assert rollback(client, registered, actor="erin") == "1"


# --------------------------------------------------------------------------------------
# One champion for the project: the gate on evaluation reports, through the CLI and the jobs
# --------------------------------------------------------------------------------------

POLICIES = ("sft_model", "policy_dpo", "policy_kto")


@pytest.fixture(scope="module")
def empty_registry(tmp_path_factory):
    """A migrated, empty MLflow SQLite database, copied by each test (migrating takes seconds, copying none)."""
    root = tmp_path_factory.mktemp("empty-registry")
    Tracker(f"sqlite:///{root / 'mlflow.db'}", artifact_root=root / "artifacts")
    return root / "mlflow.db"


@pytest.fixture
def tracker(empty_registry, tmp_path):
    shutil.copy(empty_registry, tmp_path / "mlflow.db")
    return Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_root=tmp_path / "artifacts")


def register(tracker, name: str, folder, start_path=None) -> dict:
    """Log ``folder`` in a run and register it as the next version of ``name`` with `candidate`, as training
    does; its ModelRef as a dict."""
    client = tracker.client
    run_id = tracker.start_run(name)
    client.log_artifacts(run_id, str(folder), "model")
    tracker.end_run(run_id, succeeded=True)
    if not client.search_registered_models(f"name='{name}'"):
        client.create_registered_model(name)
    version = client.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id,
                                          tags={"lineage.method": name.removeprefix("policy_")}).version
    client.set_registered_model_alias(name, "candidate", version)
    return {"path": str(folder), "method": name, "base_model": "tiny", "role": "policy", "start_path": start_path,
            "registered_name": name, "registered_version": str(version), "mlflow_run_id": run_id}


@pytest.fixture
def versions(tracker, tmp_path):
    """Version 1 of the SFT model and two policies, each a folder with one small file."""
    refs = {}
    for name in POLICIES:
        folder = tmp_path / "models" / name
        folder.mkdir(parents=True)
        (folder / "weights.txt").write_text(name)
        refs[name] = register(tracker, name, folder)
    return refs


REWARD_MODEL_JUDGE = JudgeIdentity(kind="reward_model", id="models:/evaluation_reward_model/1", heuristic=False,
                                   source="evaluation_reward_model", model_uri="models:/evaluation_reward_model/1")
RULE_JUDGE = JudgeIdentity(kind="rule", id="rule", heuristic=True, source="resource")


def report(refs: dict, metrics: dict, champion: str | None = None, aligned_version: str | None = None,
           run: str = "evaluation-run-1", judge: JudgeIdentity = REWARD_MODEL_JUDGE) -> EvaluationReport:
    """An evaluation report as the evaluation writes it (``champion``: the entry holding the alias when measured)."""
    return EvaluationReport(
        judge=judge, baseline="sft_model", candidates=tuple(sorted(refs)),
        champion=ChampionRef(champion, aligned_version, f"models:/{champion}/1") if champion else None,
        models={name: ModelEvaluation(refs[name], metrics.get(name, {})) for name in refs},
        evidence=Evidence(mlflow_run_id=run, dagster_run_id="dagster-1", path=f"/runs/evaluation_report/{run}"))


FIRST = {"sft_model": {"preference_accuracy": 0.6, "degenerate_rate": 0.0},
         "policy_dpo": candidate(vs_champion=None, vs_sft=(0.80, 0.62, 0.90)),
         "policy_kto": candidate(vs_champion=None, vs_sft=(0.70, 0.55, 0.82))}
SECOND = {"sft_model": {"preference_accuracy": 0.6, "degenerate_rate": 0.0},
          "policy_dpo": {"preference_accuracy": 0.72, "degenerate_rate": 0.04},
          "policy_kto": candidate(vs_champion=(0.80, 0.61, 0.90))}


def champions(client) -> list[tuple[str, str]]:
    """Every (registered model, version) holding `champion`, anywhere in the registry."""
    return [(m.name, str(m.aliases["champion"])) for m in client.search_registered_models() if "champion" in m.aliases]


def test_the_first_champion_is_the_best_passing_candidate_and_the_registry_says_why(tracker, versions):
    client = tracker.client
    outcome = promote_from_report(client, report(versions, FIRST), actor="alice")
    assert outcome["chosen"] == "policy_dpo" and outcome["champion"]["version"] == "1"
    assert champions(client) == [(ALIGNED_MODEL, "1")]  # one champion for the project, not one per method
    aligned = client.get_model_version(ALIGNED_MODEL, "1")
    assert aligned.source == client.get_model_version("policy_dpo", "1").source  # the policy's own artifacts
    assert aligned.tags["source.uri"] == "models:/policy_dpo/1" and aligned.tags["lineage.method"] == "dpo"
    assert aligned.tags["gate.verdict"] == "passed"
    assert aligned.tags["gate.reason"].startswith("passed: win-rate vs sft")
    assert aligned.tags["eval.win_rate_vs_sft_ci_low"] == "0.62" and aligned.tags["eval.preference_accuracy"] == "0.72"
    assert aligned.tags["evidence.mlflow_run_id"] == "evaluation-run-1" and aligned.tags["promotion.actor"] == "alice"
    assert json.loads(aligned.tags["promotion.evidence"])["evaluation"]["mlflow_run_id"] == "evaluation-run-1"
    assert json.loads(aligned.tags["promotion.evidence"])["judge"] == {"id": REWARD_MODEL_JUDGE.id, "heuristic": False}
    assert (aligned.tags["evidence.judge"], aligned.tags["evidence.judge_heuristic"]) == \
        ("models:/evaluation_reward_model/1", "false")  # which judge decided
    assert {name: tags(client, name, "1")["evaluation.gate"] for name in POLICIES} == \
        {"sft_model": "refused", "policy_dpo": "passed", "policy_kto": "passed"}
    assert client.get_registered_model("policy_kto").aliases == {"candidate": 1}  # candidates keep theirs

    again = promote_from_report(client, report(versions, FIRST), actor="bob")  # the same report once more
    assert again["action"].startswith("unchanged") and len(client.search_model_versions(f"name='{ALIGNED_MODEL}'")) == 1


def test_a_report_measured_against_another_champion_moves_nothing(tracker, versions):
    client = tracker.client
    promote_from_report(client, report(versions, FIRST), actor="alice")
    kto_first = {**FIRST, "policy_kto": candidate(vs_champion=None, vs_sft=(0.9, 0.8, 0.95))}
    before = {name: tags(client, name, "1") for name in POLICIES}
    with pytest.raises(StaleEvaluation, match="re-run the evaluation"):
        promote_from_report(client, report(versions, kto_first), actor="bob")  # measured before dpo was champion
    assert champions(client) == [(ALIGNED_MODEL, "1")]
    assert {name: tags(client, name, "1") for name in POLICIES} == before


def test_when_no_candidate_beats_the_baseline_it_is_seated_and_a_challenger_must_then_beat_it(tracker, versions):
    client = tracker.client
    ties = {**{name: candidate(vs_champion=None, vs_sft=(0.5, 0.3, 0.7)) for name in POLICIES},
            "sft_model": {"preference_accuracy": 0.6, "degenerate_rate": 0.05}}
    outcome = promote_from_report(client, report(versions, ties, judge=RULE_JUDGE), actor="alice")
    assert outcome["chosen"] == "sft_model" and outcome["action"] == "seated the baseline sft_model as aligned_policy version 1"
    assert champions(client) == [(ALIGNED_MODEL, "1")]
    seated = client.get_model_version(ALIGNED_MODEL, "1")
    assert seated.tags["source.uri"] == "models:/sft_model/1"
    assert seated.tags["gate.reason"].startswith("incumbent: no candidate beat the baseline sft_model")
    assert json.loads(seated.tags["promotion.evidence"])["role"] == "incumbent"
    assert (seated.tags["evidence.judge"], seated.tags["evidence.judge_heuristic"]) == ("rule", "true")
    assert tags(client, "sft_model", "1")["evaluation.gate"] == "passed"
    assert tags(client, "policy_dpo", "1")["evaluation.gate"] == "refused"

    # The next evaluation measures against the seated baseline: a tie with it moves nothing, a clear win does.
    tie_again = {**ties, "policy_dpo": candidate(vs_champion=(0.5, 0.3, 0.7))}
    assert promote_from_report(client, report(versions, tie_again, "sft_model", "1"), actor="bob")["action"] == \
        "none passed the gate"
    beaten = {**ties, "policy_dpo": candidate(vs_champion=(0.8, 0.62, 0.9))}
    outcome = promote_from_report(client, report(versions, beaten, "sft_model", "1"), actor="bob")
    assert outcome["chosen"] == "policy_dpo" and champions(client) == [(ALIGNED_MODEL, "2")]


def test_a_broken_baseline_is_not_seated(tracker, versions):
    broken = {**{name: candidate(vs_champion=None, vs_sft=(0.5, 0.3, 0.7)) for name in POLICIES},
              "sft_model": {"preference_accuracy": 0.6, "degenerate_rate": 0.5}}
    assert promote_from_report(tracker.client, report(versions, broken), actor="alice")["chosen"] is None
    assert champions(tracker.client) == []


def test_when_no_candidate_passes_and_the_baseline_is_not_seated_nothing_is_created(tracker, versions, capsys):
    ties = {name: candidate(vs_champion=None, vs_sft=(0.5, 0.3, 0.7)) for name in POLICIES}
    outcome = promote_from_report(tracker.client, report(versions, ties), actor="alice", seat_baseline=False)
    assert outcome["chosen"] is None and outcome["action"] == "none passed the gate"
    assert champions(tracker.client) == [] and current_champion(tracker.client) is None
    assert main(["rollback", "--tracking-uri", tracker.tracking_uri]) == 1  # a refusal: one line, exit 1
    assert "no 'champion' to roll back" in one_line_error(capsys, "rollback")
    assert tags(tracker.client, "policy_dpo", "1")["evaluation.gate_reason"].startswith("refused:")


def test_promote_rollback_promote_through_the_command_line(tracker, versions, tmp_path, capsys):
    uri = tracker.tracking_uri
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    first.write_text(report(versions, FIRST).to_json())
    second.write_text(report(versions, SECOND, champion="policy_dpo", aligned_version="1",
                             run="evaluation-run-2").to_json())

    def cli(*args) -> dict:
        assert main([*args, "--tracking-uri", uri]) == 0
        return json.loads(capsys.readouterr().out)

    assert cli("promote", "--report", str(first), "--actor", "alice")["champion"]["version"] == "1"
    promoted = cli("promote", "--report", str(second), "--actor", "bob")
    assert promoted["chosen"] == "policy_kto" and promoted["champion"]["version"] == "2"
    assert tags(tracker.client, ALIGNED_MODEL, "2")["promotion.previous_champion"] == "1"
    rolled = cli("rollback", "--actor", "carol", "--reason", "complaints")
    assert (rolled["demoted"]["version"], rolled["restored"]["version"]) == ("2", "1")
    assert rolled["restored"]["source_uri"] == "models:/policy_dpo/1"
    assert tags(tracker.client, ALIGNED_MODEL, "2")["rollback.reason"] == "complaints"
    sticks = cli("promote", "--report", str(second), "--actor", "dave")  # the same evidence does not undo it
    assert sticks["chosen"] is None and sticks["champion"]["version"] == "1"
    assert sticks["verdicts"]["policy_kto"]["reason"].startswith("refused: rolled back by carol (complaints)")
    readmitted = cli("promote", "--report", str(second), "--actor", "dave", "--readmit-rolled-back")
    assert readmitted["champion"]["version"] == "2"  # the same aligned_policy version again
    assert tags(tracker.client, ALIGNED_MODEL, "2")["promotion.actor"] == "dave"
    assert len(tracker.client.search_model_versions(f"name='{ALIGNED_MODEL}'")) == 2
    assert cli("rollback", "--actor", "erin")["restored"]["version"] == "1"
    assert champions(tracker.client) == [(ALIGNED_MODEL, "1")]
    capsys.readouterr()
    assert main(["rollback", "--tracking-uri", uri]) == 1
    assert "no previous" in one_line_error(capsys, "rollback")


class StoredReport(dg.Config):
    path: str


@dg.asset(name="evaluation_report")
def stored_evaluation(config: StoredReport) -> dict:
    """Stands in for the evaluation: the report it would have produced, as stored (a dict)."""
    return json.loads(open(config.path).read())


def test_promote_rollback_promote_through_the_dagster_jobs(tracker, versions, tmp_path):
    from alignment_pipelines.assets.promotion import model_promotion, promote_job, rollback_job
    from alignment_pipelines.resources.mlflow import MlflowResource
    from alignment_pipelines.resources.storage import StorageResource

    first, second = tmp_path / "first.json", tmp_path / "second.json"
    first.write_text(report(versions, FIRST).to_json())
    second.write_text(report(versions, SECOND, champion="policy_dpo", aligned_version="1").to_json())
    mlflow = MlflowResource(storage=StorageResource(root=str(tmp_path / "data")), tracking_uri=tracker.tracking_uri)
    defs = dg.Definitions(assets=[stored_evaluation, model_promotion], jobs=[promote_job, rollback_job],
                          resources={"mlflow": mlflow})
    with dg.instance_for_test() as instance:
        def evaluate_then_gate(path):
            return dg.materialize([stored_evaluation, model_promotion], instance=instance, resources={"mlflow": mlflow},
                                  run_config={"ops": {"evaluation_report": {"config": {"path": str(path)}}}})

        evaluate_then_gate(first)
        gated = evaluate_then_gate(second).asset_materializations_for_node("model_promotion")[0].metadata
        assert gated["champion"].value["version"] == "2" and gated["verdicts"].value["policy_kto"]["promote"]
        rolled = defs.resolve_job_def("rollback").execute_in_process(instance=instance, run_config={
            "ops": {"restore_previous_champion": {"config": {"actor": "carol", "reason": "complaints"}}}})
        assert rolled.output_for_node("restore_previous_champion")["restored"]["version"] == "1"
        again = defs.resolve_job_def("promote").execute_in_process(instance=instance, run_config={
            "ops": {"model_promotion": {"config": {"actor": "dave", "readmit_rolled_back": True}}}})
        assert again.success  # the newest stored report, re-gated
        assert current_champion(tracker.client)["version"] == "2"
        assert tags(tracker.client, ALIGNED_MODEL, "2")["promotion.actor"] == "dave"
        strict = defs.resolve_job_def("promote").execute_in_process(
            instance=instance, raise_on_error=False,
            run_config={"ops": {"model_promotion": {"config": {"min_win_rate_lower_bound": 0.7}}}})
        assert not strict.success  # measured against version 1, but version 2 is champion now: refused
    assert champions(tracker.client) == [(ALIGNED_MODEL, "2")]


def unreadable_reports(refs: dict) -> dict[str, dict]:
    """Reports promotion must refuse, by the words that say why: one of a schema version this code does not read,
    one missing a field, and one whose candidate is not a model reference. Each would otherwise promote policy_kto
    over the champion policy_dpo version 1."""
    newer = report(refs, SECOND, "policy_dpo", "1").to_dict() | {"schema_version": 2}
    no_metrics = report(refs, SECOND, "policy_dpo", "1").to_dict()
    del no_metrics["models"]["policy_kto"]["metrics"]
    no_path = report(refs, SECOND, "policy_dpo", "1").to_dict()
    del no_path["models"]["policy_kto"]["model"]["path"]
    return {"has schema_version 2": newer, "missing field 'metrics'": no_metrics,
            "models.policy_kto.model is not a model reference": no_path}


def registry_state(client) -> tuple[dict, dict]:
    """Every alias of every registered model, and the tags of every version: what a refused promotion leaves."""
    return ({m.name: dict(m.aliases) for m in client.search_registered_models()},
            {(v.name, str(v.version)): v.tags for m in client.search_registered_models()
             for v in client.search_model_versions(f"name='{m.name}'")})


@pytest.mark.parametrize("flaw", ["has schema_version 2", "missing field 'metrics'"])
def test_promote_refuses_a_report_it_cannot_read_in_one_line_and_moves_no_alias(tracker, versions, tmp_path, flaw):
    promote_from_report(tracker.client, report(versions, FIRST), actor="alice")
    before = registry_state(tracker.client)
    unreadable = tmp_path / "evaluation.json"
    unreadable.write_text(json.dumps(unreadable_reports(versions)[flaw]))
    refused = subprocess.run([sys.executable, "-m", "alignment_pipelines.cli", "promote", "--report", str(unreadable),
                              "--actor", "bob", "--tracking-uri", tracker.tracking_uri], capture_output=True, text=True)
    assert refused.returncode == 1 and refused.stdout == ""
    said = [line for line in refused.stderr.splitlines() if line.startswith("alignment-pipelines promote:")]
    assert len(said) == 1 and str(unreadable) in said[0] and flaw in said[0], refused.stderr
    assert "Traceback" not in refused.stderr
    assert registry_state(tracker.client) == before
    readable = tmp_path / "readable.json"  # the same evaluation, as this code writes it, does promote
    readable.write_text(report(versions, SECOND, "policy_dpo", "1").to_json())
    assert main(["promote", "--report", str(readable), "--actor", "bob", "--tracking-uri", tracker.tracking_uri]) == 0
    assert current_champion(tracker.client)["source_uri"] == "models:/policy_kto/1"


def test_the_promotion_asset_fails_without_retrying_on_a_report_it_cannot_read(tracker, versions, tmp_path):
    from alignment_pipelines.assets.promotion import model_promotion
    from alignment_pipelines.resources.mlflow import MlflowResource
    from alignment_pipelines.resources.storage import StorageResource

    promote_from_report(tracker.client, report(versions, FIRST), actor="alice")
    before = registry_state(tracker.client)
    mlflow = MlflowResource(storage=StorageResource(root=str(tmp_path / "data")), tracking_uri=tracker.tracking_uri)
    retrying = dg.define_asset_job("gate_with_retries", selection=[stored_evaluation, model_promotion],
                                   op_retry_policy=dg.RetryPolicy(max_retries=2))  # retries anything not marked final
    job = dg.Definitions(assets=[stored_evaluation, model_promotion], jobs=[retrying],
                         resources={"mlflow": mlflow}).resolve_job_def("gate_with_retries")
    stored = tmp_path / "stored.json"
    with dg.instance_for_test() as instance:
        for flaw, unreadable in unreadable_reports(versions).items():
            stored.write_text(json.dumps(unreadable))
            result = job.execute_in_process(instance=instance, raise_on_error=False, run_config={
                "ops": {"evaluation_report": {"config": {"path": str(stored)}}}})
            failures = [e for e in result.all_events if e.is_step_failure]
            assert [e.step_key for e in failures] == ["model_promotion"]
            assert flaw in failures[0].step_failure_data.user_failure_data.description
            assert not [e for e in result.all_events if e.is_step_up_for_retry]  # the same report would fail again
    assert registry_state(tracker.client) == before


# --------------------------------------------------------------------------------------
# The real evaluation asset feeding the gate, and a failing evaluation (tiny models, no training)
# --------------------------------------------------------------------------------------

LENIENT_GATE = {"min_win_rate_lower_bound": 0.0, "min_preference_accuracy": 0.0, "max_degenerate_rate": 1.0}


def test_the_evaluation_feeds_the_gate_and_a_failed_evaluation_moves_no_alias(tracker, tmp_path):
    from alignment_pipelines.assets.evaluation import build_evaluation_asset
    from alignment_pipelines.assets.promotion import model_promotion
    from alignment_pipelines.models.tiny import build_tiny_model
    from alignment_pipelines.refs import DatasetRef
    from alignment_pipelines.resources.judge import JudgeResource
    from alignment_pipelines.resources.mlflow import MlflowResource
    from alignment_pipelines.resources.storage import StorageResource

    models = {name: build_tiny_model(tmp_path / name, seed=seed)
              for name, seed in (("base", 0), ("sft_model", 1), ("policy_dpo", 2), ("policy_kto", 3))}
    refs = {name: register(tracker, name, models[name], str(models["sft_model" if name != "sft_model" else "base"]))
            for name in ("sft_model", "policy_dpo", "policy_kto")}
    eval_path = tmp_path / "eval.parquet"
    pd.DataFrame({"prompt": ["How do I make tea?", "Name a colour.", "Say hi."],
                  "chosen": ["Boil water.", "Blue.", "Hi!"],
                  "rejected": ["No.", "I do not know.", "..."]}).to_parquet(eval_path)

    @dg.asset(name="preference_pairs")
    def held_out_pairs() -> DatasetRef:
        return DatasetRef("preference_pairs", "v1", str(eval_path), str(eval_path), ("batch",), 3, 3)

    evaluation_report = build_evaluation_asset(["policy_dpo", "policy_kto"], reward_names=[])
    storage = StorageResource(root=str(tmp_path / "data"))
    resources = {"storage": storage, "judge": JudgeResource(),
                 "mlflow": MlflowResource(storage=storage, tracking_uri=tracker.tracking_uri)}
    run_config = {"ops": {"evaluation_report": {"config": {"max_new_tokens": 4}},
                          "model_promotion": {"config": LENIENT_GATE}}}
    with dg.instance_for_test() as instance:
        for name, ref in refs.items():  # as the training assets record their newest model
            instance.report_runless_asset_event(dg.AssetMaterialization(name, metadata={
                "model_ref": dg.MetadataValue.json(ref)}))
        evaluated = dg.materialize([held_out_pairs, evaluation_report, model_promotion], instance=instance,
                                   resources=resources, run_config=run_config)
        metadata = evaluated.asset_materializations_for_node("evaluation_report")[0].metadata
        assert metadata["report"].value.count("data:image/png;base64,") == 4
        assert "| policy_dpo |" in metadata["comparison"].value and "| policy_kto |" in metadata["comparison"].value
        assert metadata["policy_dpo/judged_vs_sft"].value == 3
        evidence = tracker.client.get_run(metadata["mlflow_run_id"].value)
        assert evidence.data.metrics["policy_kto/judged_vs_sft"] == 3
        assert {a.path for a in tracker.client.list_artifacts(evidence.info.run_id, "evaluation")} >= {
            "evaluation/report.md", "evaluation/evaluation.json", "evaluation/win_rate_vs_sft.png"}
        champion = current_champion(tracker.client)
        assert champions(tracker.client) == [(ALIGNED_MODEL, "1")]
        promoted = tags(tracker.client, ALIGNED_MODEL, "1")
        assert promoted["evidence.mlflow_run_id"] == evidence.info.run_id
        assert promoted["evidence.judge"] == metadata["judge"].value["id"]
        assert promoted["evidence.judge_heuristic"] == str(metadata["judge"].value["heuristic"]).lower()

        aliases = {m.name: dict(m.aliases) for m in tracker.client.search_registered_models()}
        shutil.rmtree(models["policy_kto"])  # a model that cannot be loaded: the evaluation fails
        failed = dg.materialize([held_out_pairs, evaluation_report, model_promotion], instance=instance,
                                resources=resources, run_config=run_config, raise_on_error=False)
        assert not failed.success and not failed.asset_materializations_for_node("model_promotion")
    assert {m.name: dict(m.aliases) for m in tracker.client.search_registered_models()} == aliases
    assert current_champion(tracker.client) == champion
    assert len(list((tmp_path / "data" / "runs" / "evaluation_report").glob("*/evaluation.json"))) == 1


# --------------------------------------------------------------------------------------
# Handoff: the exported champion is the registered model, merged
# --------------------------------------------------------------------------------------


def test_the_exported_champion_loads_with_transformers_and_generates_the_same_tokens(tracker, tmp_path, tiny_model_dir,
                                                                                     capsys):
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignment_pipelines.models.loading import MODEL_CARD, load_causal_lm

    torch.manual_seed(0)
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter = tmp_path / "policy_dpo"
    lora.save_pretrained(adapter)
    (adapter / MODEL_CARD).write_text(json.dumps({"role": "policy", "format": "adapter",
                                                  "parent": str(tiny_model_dir), "method": "dpo"}))
    refs = {"sft_model": register(tracker, "sft_model", tiny_model_dir),
            "policy_dpo": register(tracker, "policy_dpo", adapter, str(tiny_model_dir))}
    promote_from_report(tracker.client, report(refs, FIRST), actor="alice")

    out = tmp_path / "served"
    assert main(["export", str(out), "--alias", "champion", "--tracking-uri", tracker.tracking_uri]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "models:/aligned_policy@champion"
    with safe_open(str(out / "model.safetensors"), "pt") as weights:
        assert not any("lora" in key for key in weights.keys())  # merged: no PEFT needed to serve it
    exported = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template  # what `vllm serve` renders chats with
    registered, _ = load_causal_lm(adapter, device="cpu")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "How do I make green tea?"}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    generate = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    from_export = exported.generate(**ids, **generate)[0].tolist()
    assert from_export == registered.generate(**ids, **generate)[0].tolist()
    assert from_export != AutoModelForCausalLM.from_pretrained(tiny_model_dir).generate(**ids, **generate)[0].tolist()
