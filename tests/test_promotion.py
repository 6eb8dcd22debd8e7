"""The promotion gate on synthetic metrics, and promote/rollback against a real MLflow registry."""

import json
from dataclasses import fields

import pytest

from alignment_pipelines.promotion import (
    GateConfig,
    GateDecision,
    PromotionRefused,
    choose_champion,
    current_version,
    decide,
    decide_all,
    promote,
    rollback,
)

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


def test_choose_champion_picks_the_strongest_passing_candidate():
    candidates = {
        "dpo": candidate(vs_champion=(0.70, 0.58, 0.80)),
        "kto": candidate(vs_champion=(0.80, 0.66, 0.90)),
        "orpo": candidate(vs_champion=(0.90, 0.80, 0.95), degenerate_rate=0.3),  # strongest, but degenerate
        "ppo": candidate(vs_champion=(0.55, 0.45, 0.65)),
    }
    name, decision = choose_champion(candidates, CHAMPION)
    assert name == "kto" and decision.promote
    assert [n for n, d in decide_all(candidates, CHAMPION).items() if d.promote] == ["dpo", "kto"]


def test_choose_champion_ranks_against_sft_when_there_is_no_champion_and_may_find_none():
    candidates = {"dpo": candidate(vs_champion=None, vs_sft=(0.80, 0.70, 0.88)),
                  "kto": candidate(vs_champion=None, vs_sft=(0.75, 0.62, 0.85))}
    assert choose_champion(candidates, None)[0] == "dpo"
    ties = {name: candidate(vs_champion=(0.5, 0.4, 0.6)) for name in ("dpo", "kto")}
    assert choose_champion(ties, CHAMPION) is None
    assert choose_champion({}, None) is None


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
