"""The promotion gate (challenger against champion) and the registry moves it allows.

Evaluation measures; this module decides. The gate is pure functions over the metrics
dicts an evaluation produces, so it can be tested on synthetic numbers and re-run from
the CLI or a manual job on stored metrics. The registry layer works on a plain
``mlflow.MlflowClient`` and writes who, why and the evidence onto the model version, so
the registry itself answers "why is this the champion?" and "what was it before?".

Metrics read from each model's dict: ``win_rate_vs_champion`` and
``win_rate_vs_champion_ci_low`` (``_ci_high`` optional), the same with ``_vs_sft`` for
the first champion, ``preference_accuracy`` and ``degenerate_rate``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from typing import Any

from alignment_pipelines.tracking import CHAMPION_ALIAS

EVEN = 0.5
ACTOR_TAG = "promotion.actor"
REASON_TAG = "promotion.reason"
EVIDENCE_TAG = "promotion.evidence"
PREVIOUS_CHAMPION_TAG = "promotion.previous_champion"
PROMOTED_AT_TAG = "promotion.time"
ROLLBACK_ACTOR_TAG = "rollback.actor"
ROLLBACK_REASON_TAG = "rollback.reason"
ROLLBACK_AT_TAG = "rollback.time"
ROLLBACK_RESTORED_TAG = "rollback.restored_version"
ROLLBACK_TAGS = (ROLLBACK_ACTOR_TAG, ROLLBACK_REASON_TAG, ROLLBACK_AT_TAG, ROLLBACK_RESTORED_TAG)


@dataclass(frozen=True)
class GateConfig:
    """What a candidate must show to become champion. All rates and accuracies are in [0, 1]."""

    min_win_rate_lower_bound: float = field(default=0.5, metadata={
        "help": "The lower bound of the candidate's 95% win-rate interval against the champion (against the "
                "SFT model while there is no champion) must be strictly above this. At 0.5 an interval that "
                "includes 0.5 (a tie) refuses."})
    max_preference_accuracy_drop: float = field(default=0.02, metadata={
        "help": "How far held-out preference accuracy may fall below the champion's before it counts as a "
                "regression (absolute, e.g. 0.02 = two points)."})
    max_degenerate_rate_increase: float = field(default=0.02, metadata={
        "help": "How far the share of empty or degenerate answers may rise above the champion's before it "
                "counts as a regression (absolute)."})
    min_preference_accuracy: float = field(default=0.5, metadata={
        "help": "Floor on held-out preference accuracy, champion or not: below 0.5 the model prefers the "
                "rejected answers. Skipped for a model without the metric (no implicit reward, no reward model)."})
    max_degenerate_rate: float = field(default=0.2, metadata={
        "help": "Ceiling on the share of empty or degenerate answers, champion or not."})

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"GateConfig.{f.name} must be in [0, 1], got {value}")


@dataclass(frozen=True)
class GateDecision:
    """The verdict, a one-line reason a person can read, and the numbers it rests on (JSON-safe)."""

    promote: bool
    reason: str
    evidence: dict[str, Any]


def decide(candidate: dict, champion: dict | None, config: GateConfig = GateConfig()) -> GateDecision:
    """Whether ``candidate`` may replace ``champion`` (its metrics dict; None when there is none yet).

    With a champion: the win-rate against it must clear the bound, and preference
    accuracy and the degenerate rate must not regress beyond the tolerances. Without one,
    the candidate is judged on its own: the win-rate against SFT must clear the bound.
    The absolute floor and ceiling apply in both cases. A missing win-rate refuses; a
    regression check whose champion value is missing is skipped and listed as such.
    """
    baseline = "champion" if champion is not None else "sft"
    checks = [_win_rate_check(candidate, baseline, config.min_win_rate_lower_bound)]
    skipped: list[str] = []
    if champion is not None:
        checks += _regression_checks(candidate, champion, config, skipped)
    checks += _absolute_checks(candidate, config, skipped)
    failed = [c for c in checks if not c["passed"]]
    reason = "; ".join(c["detail"] for c in (failed or checks))
    evidence = {
        "baseline": baseline,
        "checks": checks,
        "skipped": skipped,
        "candidate": _json_safe_metrics(candidate),
        "champion": _json_safe_metrics(champion) if champion is not None else None,
        "config": asdict(config),
    }
    return GateDecision(promote=not failed, reason=("refused: " if failed else "passed: ") + reason,
                        evidence=evidence)


def decide_all(candidates: dict[str, dict], champion: dict | None,
               config: GateConfig = GateConfig()) -> dict[str, GateDecision]:
    """The gate's verdict for every candidate, for the report's table."""
    return {name: decide(metrics, champion, config) for name, metrics in sorted(candidates.items())}


def choose_champion(candidates: dict[str, dict], champion: dict | None,
                    config: GateConfig = GateConfig()) -> tuple[str, GateDecision] | None:
    """The passing candidate with the highest win-rate lower bound against the champion (against
    SFT when there is none), then the highest win-rate, then the first name; None when none passes.
    One champion for the whole project, whichever method trained it."""
    baseline = "champion" if champion is not None else "sft"
    passing = [(name, decision) for name, decision in decide_all(candidates, champion, config).items()
               if decision.promote]
    if not passing:
        return None

    def strength(item):
        metrics = candidates[item[0]]
        key = f"win_rate_vs_{baseline}"
        return _metric(metrics, f"{key}_ci_low"), _metric(metrics, key) or 0.0

    return max(passing, key=strength)


def _win_rate_check(candidate: dict, baseline: str, bound: float) -> dict:
    key = f"win_rate_vs_{baseline}"
    rate, low, high = (_metric(candidate, key + suffix) for suffix in ("", "_ci_low", "_ci_high"))
    check = {"check": f"{key}_ci_low", "value": low, "threshold": bound, "win_rate": rate, "ci_high": high}
    if low is None:
        return {**check, "passed": False, "detail": f"no win-rate interval against the {baseline}"}
    shown = f"win-rate vs {baseline} {_fmt(rate)} [{_fmt(low)}, {_fmt(high)}]"
    if low > bound:
        return {**check, "passed": True, "detail": f"{shown} is above {bound:g}"}
    if high is not None and high < EVEN:
        verdict = f"{shown}: the candidate loses"
    elif high is not None and low <= EVEN:
        verdict = f"{shown} includes {EVEN:g}: a tie"
    else:
        verdict = f"{shown}: lower bound not above {bound:g}"
    return {**check, "passed": False, "detail": verdict}


def _regression_checks(candidate: dict, champion: dict, config: GateConfig, skipped: list[str]) -> list[dict]:
    checks = []
    for key, tolerance, higher_is_better in (
            ("preference_accuracy", config.max_preference_accuracy_drop, True),
            ("degenerate_rate", config.max_degenerate_rate_increase, False)):
        reference, value = _metric(champion, key), _metric(candidate, key)
        if reference is None:
            skipped.append(f"{key} regression: the champion has no {key}")
            continue
        limit = reference - tolerance if higher_is_better else reference + tolerance
        passed = value is not None and (value >= limit if higher_is_better else value <= limit)
        relation = "at least" if higher_is_better else "at most"
        checks.append({"check": f"{key}_regression", "value": value, "threshold": limit, "champion": reference,
                       "passed": passed,
                       "detail": f"{key} {_fmt(value)} vs champion {_fmt(reference)} "
                                 f"({'ok' if passed else 'regression'}: must be {relation} {limit:.3f})"})
    return checks


def _absolute_checks(candidate: dict, config: GateConfig, skipped: list[str]) -> list[dict]:
    checks = []
    for key, limit, higher_is_better in (("preference_accuracy", config.min_preference_accuracy, True),
                                         ("degenerate_rate", config.max_degenerate_rate, False)):
        value = _metric(candidate, key)
        if value is None:
            skipped.append(f"{key} limit: the candidate has no {key}")
            continue
        passed = value >= limit if higher_is_better else value <= limit
        relation = "at least" if higher_is_better else "at most"
        checks.append({"check": f"{key}_limit", "value": value, "threshold": limit, "passed": passed,
                       "detail": f"{key} {_fmt(value)} (must be {relation} {limit:g})"})
    return checks


def _metric(metrics: dict, key: str) -> float | None:
    """A finite number, or None: a NaN (nothing judged) is as good as missing."""
    value = metrics.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _json_safe_metrics(metrics: dict) -> dict:
    return {key: _metric(metrics, key) for key in sorted(metrics) if isinstance(metrics[key], (int, float))}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


# --------------------------------------------------------------------------------------
# The registry: move the alias, record why, and undo
# --------------------------------------------------------------------------------------


class PromotionRefused(ValueError):
    """Raised when asked to promote on a decision that refused."""


def current_version(client, registered_name: str, alias: str = CHAMPION_ALIAS) -> str | None:
    """The version ``alias`` points to, or None when no version holds it."""
    version = client.get_registered_model(registered_name).aliases.get(alias)
    return None if version is None else str(version)


def promote(client, registered_name: str, version: str | int, decision: GateDecision, actor: str,
            alias: str = CHAMPION_ALIAS) -> str | None:
    """Point ``alias`` at ``version`` and record who, why, the evidence and the champion it replaces.

    The tags go first and the alias last, in one step; if anything fails the version's tags
    are put back as they were and the alias stays where it was. Returns the version that held
    the alias before (None if none). When ``version`` already holds it nothing changes, so a
    re-run promote job is harmless.
    """
    if not decision.promote:
        raise PromotionRefused(f"the gate refused version {version}: {decision.reason}")
    if not actor.strip():
        raise ValueError("a promotion needs an actor (who promoted)")
    version = str(version)
    previous = current_version(client, registered_name, alias)
    if previous == version:
        return previous
    tags: dict[str, str | None] = {
        ACTOR_TAG: actor,
        REASON_TAG: decision.reason,
        EVIDENCE_TAG: json.dumps(decision.evidence, sort_keys=True, allow_nan=False),
        PROMOTED_AT_TAG: _now(),
        PREVIOUS_CHAMPION_TAG: previous,
        **{key: None for key in ROLLBACK_TAGS},  # an earlier rollback of this version no longer applies
    }
    _retag_then_move_alias(client, registered_name, version, tags, alias)
    return previous


def rollback(client, registered_name: str, actor: str, reason: str = "manual rollback",
             alias: str = CHAMPION_ALIAS) -> str:
    """Give ``alias`` back to the version it held before the current one, as recorded at promotion.

    The demoted version is tagged with who, why and what was restored. Repeated rollbacks walk
    back through earlier champions. Returns the restored version.
    """
    if not actor.strip():
        raise ValueError("a rollback needs an actor (who rolled back)")
    demoted = current_version(client, registered_name, alias)
    if demoted is None:
        raise ValueError(f"{registered_name} has no {alias!r} to roll back")
    restored = client.get_model_version(registered_name, demoted).tags.get(PREVIOUS_CHAMPION_TAG)
    if not restored:
        raise ValueError(f"{registered_name} version {demoted} has no previous {alias} recorded")
    client.get_model_version(registered_name, restored)  # raises before any change if it was deleted
    tags = {ROLLBACK_ACTOR_TAG: actor, ROLLBACK_REASON_TAG: reason, ROLLBACK_AT_TAG: _now(),
            ROLLBACK_RESTORED_TAG: restored}
    _retag_then_move_alias(client, registered_name, demoted, tags, alias, alias_version=restored)
    return restored


def _retag_then_move_alias(client, name: str, version: str, tags: dict[str, str | None], alias: str,
                           alias_version: str | None = None) -> None:
    """Set (value) or delete (None) ``tags`` on ``version``, then point ``alias`` at ``alias_version``
    (default ``version``). On failure the tags are restored; the alias move is the registry's single write."""
    before = client.get_model_version(name, version).tags
    try:
        _write_tags(client, name, version, tags)
        client.set_registered_model_alias(name, alias, alias_version or version)
    except Exception:
        _write_tags(client, name, version, {key: before.get(key) for key in tags})
        raise


def _write_tags(client, name: str, version: str, tags: dict[str, str | None]) -> None:
    present = client.get_model_version(name, version).tags
    for key, value in tags.items():
        if value is not None:
            client.set_model_version_tag(name, version, key, value)
        elif key in present:
            client.delete_model_version_tag(name, version, key)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
