"""The promotion gate (challenger against champion) and the registry moves it allows.

Evaluation measures; this module decides. The gate is pure functions over the metrics
dicts an evaluation produces, so it can be tested on synthetic numbers and re-run from
the CLI or a manual job on stored metrics; :func:`promote_from_report` runs it on the typed
``EvaluationReport`` (never an untyped dict). The registry layer works on a plain
``mlflow.MlflowClient`` and writes who, why, the evidence and the judge onto the model version,
so the registry itself answers "why is this the champion?" and "what was it before?".

"Champion" means one thing, as in the report's schema: the `aligned_policy` version that holds
the `champion` alias (the gate's ``champion`` argument is that version's metrics, as measured).
What the gate picks among the candidates is its pick (:func:`choose_candidate`), which becomes
the champion only when the alias moves.

Metrics read from each model's dict: ``win_rate_vs_champion`` and
``win_rate_vs_champion_ci_low`` (``_ci_high`` optional), the same with ``_vs_sft`` for
the first champion, ``preference_accuracy`` and ``degenerate_rate``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import tempfile
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignment_pipelines.models.registry import check_recorded_sha256
from alignment_pipelines.refs import ModelRef
from alignment_pipelines.tracking import (CHAMPION_ALIAS, PRUNED_AT_TAG, PRUNED_TAG, WEIGHTS_SHA256_TAG,
                                         card_with_verdict)

if TYPE_CHECKING:  # importing it loads the evaluation package (plots, torch): the CLI's promote loads it itself
    from alignment_pipelines.evaluation.schema import EvaluationReport

log = logging.getLogger(__name__)

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
# Set with the history link before the alias moves, removed once the promotion's audit tags are written: a version
# holding the alias with this tag was promoted by a move whose audit was cut short (a re-run promote finishes it).
PENDING_TAG = "promotion.pending"
# How long a promotion or rollback waits for another one of the same registry on this host to finish.
LOCK_TIMEOUT_SECONDS = 120.0


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
    return GateDecision(promote=not failed, reason=("refused: " if failed else "passed: ") + reason,
                        evidence=_evidence(baseline, checks, skipped, candidate, champion, config))


def _evidence(baseline: str, checks: list[dict], skipped: list[str], candidate: dict, champion: dict | None,
              config: GateConfig, **extra: Any) -> dict:
    """What a verdict rests on, in the one shape every promotion records (JSON-safe)."""
    return {"baseline": baseline, **extra, "checks": checks, "skipped": skipped,
            "candidate": _json_safe_metrics(candidate),
            "champion": _json_safe_metrics(champion) if champion is not None else None, "config": asdict(config)}


def decide_all(candidates: dict[str, dict], champion: dict | None,
               config: GateConfig = GateConfig()) -> dict[str, GateDecision]:
    """The gate's verdict for every candidate, for the report's table."""
    return {name: decide(metrics, champion, config) for name, metrics in sorted(candidates.items())}


def choose_candidate(candidates: dict[str, dict], champion: dict | None,
                     config: GateConfig = GateConfig()) -> tuple[str, GateDecision] | None:
    """The gate's pick: the passing candidate with the highest win-rate lower bound against the champion
    (against SFT when there is none), then the highest win-rate, then the first name; None when none passes.
    At most one pick for the whole project, whichever method trained it; it becomes the champion only when
    :func:`promote` moves the alias."""
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


class PromotionBusy(PromotionRefused):
    """Another promotion or rollback of the same registry is in progress on this host."""


class AliasMoved(PromotionRefused):
    """The alias moved between the decision and the move (another host promoted or rolled back): nothing changed."""


def _lock_path(client) -> Path:
    """One lock file per registry on this host, keyed by its tracking URI (a SQLite path resolved)."""
    uri = client.tracking_uri
    if uri.startswith("sqlite:///"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"alignment-pipelines-promotion-{digest}.lock"


@contextlib.contextmanager
def registry_lock(client):
    """One promotion or rollback at a time per registry on this host, whoever asks (the CLI, a Dagster run, another
    process): a file lock keyed by the tracking URI. Across hosts the Dagster pool ``promotion`` serializes the
    asset and the jobs, and every move re-reads the alias first (:func:`_move_alias`)."""
    from filelock import FileLock, Timeout

    path = _lock_path(client)
    lock = FileLock(path, mode=0o666)  # every user on the host promotes through the same file
    try:
        lock.acquire(timeout=LOCK_TIMEOUT_SECONDS)
    except Timeout as error:
        raise PromotionBusy(f"another promotion or rollback of {client.tracking_uri} has held {path} for "
                            f"{LOCK_TIMEOUT_SECONDS:g}s; try again once it is done") from error
    try:
        yield
    finally:
        lock.release()


def current_version(client, registered_name: str, alias: str = CHAMPION_ALIAS) -> str | None:
    """The version ``alias`` points to, or None when no version holds it."""
    version = client.get_registered_model(registered_name).aliases.get(alias)
    return None if version is None else str(version)


def promote(client, registered_name: str, version: str | int, decision: GateDecision, actor: str,
            alias: str = CHAMPION_ALIAS) -> str | None:
    """Point ``alias`` at ``version`` and record who, why, the evidence and the champion it replaces.

    The history link (the version that held the alias) is written first, with a pending mark: it is read only
    while the version holds the alias, so it changes nothing until the move. The alias move is the one decisive
    write; it re-reads the alias and fails (:class:`AliasMoved`) if another promotion moved it. Only then are the
    audit tags written and an earlier rollback's tags (its bar against re-promotion) removed: a failed move leaves
    the bar and the alias as they were, and puts the link back. A version whose weights retention pruned is
    refused. Returns the version that held the alias before (None if none). When ``version`` already holds it
    nothing changes, so a re-run promote job is harmless, except that a promotion whose audit was cut short after
    its move is finished.
    """
    if not decision.promote:
        raise PromotionRefused(f"the gate refused version {version}: {decision.reason}")
    if not actor.strip():
        raise ValueError("a promotion needs an actor (who promoted)")
    version = str(version)
    _refuse_pruned(client, registered_name, version)
    previous = current_version(client, registered_name, alias)
    audit = {ACTOR_TAG: actor, REASON_TAG: decision.reason,
             EVIDENCE_TAG: json.dumps(decision.evidence, sort_keys=True, allow_nan=False), PROMOTED_AT_TAG: _now(),
             PENDING_TAG: None, **{key: None for key in ROLLBACK_TAGS}}
    if previous == version:
        if PENDING_TAG in client.get_model_version(registered_name, version).tags:
            _write_tags(client, registered_name, version, audit)
        return previous
    link = {PREVIOUS_CHAMPION_TAG: previous, PENDING_TAG: audit[PROMOTED_AT_TAG]}
    _tag_then_move_alias(client, registered_name, version, link, alias, version, expected=previous)
    _write_tags(client, registered_name, version, audit)
    return previous


def rollback(client, registered_name: str, actor: str, reason: str = "manual rollback",
             alias: str = CHAMPION_ALIAS) -> str:
    """Give ``alias`` back to the version it held before the current one, as recorded at promotion.

    The demoted version is tagged with who, why and what was restored before the alias moves, so no moment leaves
    it demoted without the bar that keeps the gate from picking it again. Repeated rollbacks walk back through
    earlier champions; a version whose weights retention pruned is refused. Returns the restored version.
    """
    if not actor.strip():
        raise ValueError("a rollback needs an actor (who rolled back)")
    demoted = current_version(client, registered_name, alias)
    if demoted is None:
        raise ValueError(f"{registered_name} has no {alias!r} to roll back")
    restored = client.get_model_version(registered_name, demoted).tags.get(PREVIOUS_CHAMPION_TAG)
    if not restored:
        raise ValueError(f"{registered_name} version {demoted} has no previous {alias} recorded")
    _refuse_pruned(client, registered_name, restored)  # raises before any change if deleted or pruned
    tags = {ROLLBACK_ACTOR_TAG: actor, ROLLBACK_REASON_TAG: reason, ROLLBACK_AT_TAG: _now(),
            ROLLBACK_RESTORED_TAG: restored}
    _tag_then_move_alias(client, registered_name, demoted, tags, alias, restored, expected=demoted)
    return restored


def _refuse_pruned(client, name: str, version: str) -> None:
    """Raise unless ``version`` (and the version whose artifacts it shares, for `aligned_policy`) still has weights:
    `champion` never points at a version that cannot be loaded."""
    entry = client.get_model_version(name, version)
    holders = [(name, version, entry.tags)]
    source = entry.tags.get(SOURCE_URI_TAG, "")
    if source.startswith("models:/"):
        source_name, _, source_version = source[len("models:/"):].rpartition("/")
        holders.append((source_name, source_version, client.get_model_version(source_name, source_version).tags))
    for holder_name, holder_version, tags in holders:
        if tags.get(PRUNED_TAG) == "true":
            raise PromotionRefused(f"{name} version {version} cannot hold the alias: retention pruned the weights "
                                   f"of {holder_name} version {holder_version} on {tags.get(PRUNED_AT_TAG, '?')}; "
                                   "nothing was changed")


def _tag_then_move_alias(client, name: str, version: str, tags: dict[str, str | None], alias: str,
                         alias_version: str, expected: str | None) -> None:
    """Set (value) or delete (None) ``tags`` on ``version``, then move ``alias`` to ``alias_version``. If the move
    fails the tags are put back as they were (as far as the registry answers) and the error is raised."""
    before = client.get_model_version(name, version).tags
    _write_tags(client, name, version, tags)
    try:
        _move_alias(client, name, alias, alias_version, expected)
    except Exception:
        try:
            _write_tags(client, name, version, {key: before.get(key) for key in tags})
        except Exception as error:  # the registry is gone: what was written stays, and is harmless (see callers)
            log.warning("could not put back the tags of %s version %s after a failed move: %s", name, version, error)
        raise


def _move_alias(client, name: str, alias: str, version: str, expected: str | None) -> None:
    """Point ``alias`` at ``version`` if it still points at ``expected`` (re-read just before the move)."""
    now = current_version(client, name, alias)
    if now != expected:
        raise AliasMoved(f"{name}@{alias} moved from version {expected} to {now} while this move was being "
                         "decided; nothing was changed: decide again")
    client.set_registered_model_alias(name, alias, version)


def _write_tags(client, name: str, version: str, tags: dict[str, str | None]) -> None:
    present = client.get_model_version(name, version).tags
    for key, value in tags.items():
        if value is not None:
            client.set_model_version_tag(name, version, key, value)
        elif key in present:
            client.delete_model_version_tag(name, version, key)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------
# One champion for the project: the registered model `aligned_policy`
# --------------------------------------------------------------------------------------
#
# Each training asset registers its own model (`policy_dpo`, `policy_kto`, ...) and tags new versions
# `candidate`. The gate picks one of them; the pick becomes a version of `aligned_policy` whose source
# is the picked version's artifacts, and `champion` moves there. Serving, export and rollback look only
# at `aligned_policy@champion`, whichever method trained it; its tags say where it came from and why.

ALIGNED_MODEL = "aligned_policy"
SOURCE_URI_TAG = "source.uri"
SOURCE_PATH_TAG = "source.path"
SOURCE_START_PATH_TAG = "source.start_path"
GATE_VERDICT_TAG = "gate.verdict"
GATE_REASON_TAG = "gate.reason"
EVIDENCE_RUN_TAG = "evidence.mlflow_run_id"
EVIDENCE_DAGSTER_RUN_TAG = "evidence.dagster_run_id"
EVIDENCE_JUDGE_TAG = "evidence.judge"  # the judge whose win-rates the gate read (JudgeIdentity.id)
EVIDENCE_JUDGE_HEURISTIC_TAG = "evidence.judge_heuristic"  # "true" when that judge is a rule of thumb
CANDIDATE_GATE_TAG = "evaluation.gate"
CANDIDATE_GATE_REASON_TAG = "evaluation.gate_reason"
TAG_LIMIT = 5000  # the registry's column width for tag values (enforced by Postgres, not by SQLite)
GATE_KEYS = ("preference_accuracy", "degenerate_rate", "empty_rate")


class StaleEvaluation(PromotionRefused):
    """The evaluation measured the candidates against a champion that is no longer the champion."""


def current_champion(client) -> dict | None:
    """The `aligned_policy` version holding `champion` and where it came from, or None."""
    registered = client.search_registered_models(f"name='{ALIGNED_MODEL}'")
    if not registered or CHAMPION_ALIAS not in registered[0].aliases:
        return None
    version = client.get_model_version(ALIGNED_MODEL, str(registered[0].aliases[CHAMPION_ALIAS]))
    return {"version": str(version.version), "source_uri": version.tags.get(SOURCE_URI_TAG),
            "path": version.tags.get(SOURCE_PATH_TAG), "start_path": version.tags.get(SOURCE_START_PATH_TAG)}


def gate_metrics(metrics: dict) -> dict:
    """The numbers the gate reads, so its evidence fits one registry tag; the full set lives in the report."""
    return {key: value for key, value in metrics.items()
            if key in GATE_KEYS or key.startswith(("win_rate_vs_", "wins_vs_", "losses_vs_", "ties_vs_"))}


def promote_from_report(client, report: EvaluationReport, actor: str, config: GateConfig = GateConfig(),
                        readmit_rolled_back: bool = False, seat_baseline: bool = True) -> dict:
    """Run the gate on an evaluation report and, when a candidate passes, make it the project's champion.

    ``report`` is the typed :class:`EvaluationReport` the evaluation wrote (``evaluation.json``; read it with
    ``EvaluationReport.read`` or ``from_dict``, which refuse another schema version or a missing field): its
    ``candidates`` are the entries the gate may pick, its ``champion`` the ``aligned_policy`` version that held
    `champion` when it measured, its ``judge`` who judged and its ``evidence`` the MLflow and Dagster runs. Every
    candidate's registered version gets the gate's verdict as tags. A report measured against another champion than
    today's moves nothing (:class:`StaleEvaluation`), unless its pick already is the champion. A model that was
    rolled back is refused until someone readmits it (``readmit_rolled_back``), so the next evaluation does not
    quietly undo a rollback. While the project has no champion and no candidate beats the baseline, the baseline
    itself is seated as the incumbent (``seat_baseline``; it must pass the gate's absolute checks): it is what
    candidates were measured against, so serving it changes nothing the gate decided, and from then on a challenger
    must beat it. The promoted version's tags name the judge that decided. Returns the verdicts and what moved.

    Serialized with every other promotion and rollback of the registry (:func:`registry_lock`), so the champion the
    gate reads is the one it replaces.
    """
    from alignment_pipelines.evaluation.schema import EvaluationReport

    if not isinstance(report, EvaluationReport):
        raise TypeError(f"promotion reads an EvaluationReport, got {type(report).__name__}: read evaluation.json with "
                        "EvaluationReport.read or EvaluationReport.from_dict")
    refs = _pickable_refs(report)  # a malformed entry is refused before the lock, and before any move
    with registry_lock(client):
        return _promote_from_report(client, report, refs, actor, config, readmit_rolled_back, seat_baseline)


def _pickable_refs(report: EvaluationReport) -> dict[str, ModelRef]:
    """The ModelRef of every entry the gate may pick (the candidates and the baseline); raises
    ``ReportSchemaError`` naming the entry whose ``model`` is not one."""
    from alignment_pipelines.evaluation.schema import ReportSchemaError

    refs = {}
    for name in (*report.candidates, report.baseline):
        try:
            refs[name] = ModelRef.from_dict(report.models[name].model)
        except TypeError as error:
            raise ReportSchemaError(f"the evaluation report of {report.evidence.path}: models.{name}.model is not a "
                                    f"model reference ({error}); re-run evaluation_report") from None
    return refs


def _promote_from_report(client, report: EvaluationReport, refs: dict[str, ModelRef], actor: str,
                         config: GateConfig, readmit_rolled_back: bool, seat_baseline: bool) -> dict:
    models, measured = report.models, report.champion
    champion_metrics = gate_metrics(models[measured.name].metrics) if measured else None
    barred = {} if readmit_rolled_back else rolled_back_sources(client)
    barred_names = {name: barred[refs[name].uri] for name in report.candidates if refs[name].uri in barred}
    candidates = {name: gate_metrics(models[name].metrics) for name in report.candidates
                  if name not in barred_names}
    decisions = decide_all(candidates, champion_metrics, config) | {
        name: GateDecision(False, f"refused: {why}; readmit it to let the gate pick it again", {})
        for name, why in barred_names.items()}
    choice = choose_candidate(candidates, champion_metrics, config)
    current = current_champion(client)
    if choice is None and current is None and seat_baseline:
        choice = _incumbent(report, refs[report.baseline], config)
        if choice is not None:  # its verdict as incumbent replaces "no win-rate against itself"
            decisions[choice[0]] = choice[1]
    verdicts = {name: {"promote": d.promote, "reason": d.reason} for name, d in decisions.items()}
    chosen_uri = refs[choice[0]].uri if choice else None
    outcome = {"verdicts": verdicts, "chosen": choice[0] if choice else None, "previous_champion": current,
               "champion": current}
    if current is not None and chosen_uri is not None and current["source_uri"] == chosen_uri:
        promote(client, ALIGNED_MODEL, current["version"], choice[1], actor)  # finishes a cut-short audit, if any
        return outcome | {"action": "unchanged: the gate's pick already is the champion"}
    measured_version = measured.aligned_version if measured else None
    if measured_version != (current or {}).get("version"):
        raise StaleEvaluation(f"the evaluation measured against champion {measured_version} "
                              f"but the champion is now {(current or {}).get('version')}: re-run the evaluation")
    for name, decision in decisions.items():
        _tag_candidate(client, refs[name], decision, _judge_line(report), models[name].metrics)
    if choice is None:
        return outcome | {"action": "none passed the gate"}
    name, decision = choice
    decision = GateDecision(decision.promote, decision.reason, decision.evidence | {
        "evaluation": asdict(report.evidence), "judge": {"id": report.judge.id, "heuristic": report.judge.heuristic}})
    version = _aligned_version(client, refs[name], models[name].metrics, decision, report)
    promote(client, ALIGNED_MODEL, version, decision, actor)
    moved = "seated the baseline" if name == report.baseline else "promoted"
    return outcome | {"action": f"{moved} {name} as {ALIGNED_MODEL} version {version}",
                      "champion": current_champion(client)}


def _incumbent(report: EvaluationReport, baseline: ModelRef, config: GateConfig) -> tuple[str, GateDecision] | None:
    """The baseline as the first champion when no candidate beat it, if it passes the absolute checks itself."""
    name = report.baseline
    if baseline.uri is None:
        return None
    metrics = gate_metrics(report.models[name].metrics)
    skipped: list[str] = []
    checks = _absolute_checks(metrics, config, skipped)
    if not all(c["passed"] for c in checks):
        return None
    reason = (f"incumbent: no candidate beat the baseline {name}, so it serves until a challenger beats it; "
              + "; ".join(c["detail"] for c in checks))
    return name, GateDecision(promote=True, reason=reason,
                              evidence=_evidence(name, checks, skipped, metrics, None, config, role="incumbent"))


def rolled_back_sources(client) -> dict[str, str]:
    """Source model URI → who rolled it back and why, for each `aligned_policy` version demoted by a rollback
    and not promoted again since (a promotion clears the rollback tags)."""
    if not client.search_registered_models(f"name='{ALIGNED_MODEL}'"):
        return {}
    return {v.tags[SOURCE_URI_TAG]: f"rolled back by {v.tags.get(ROLLBACK_ACTOR_TAG)} "
                                    f"({v.tags.get(ROLLBACK_REASON_TAG)})"
            for v in client.search_model_versions(f"name='{ALIGNED_MODEL}'")
            if ROLLBACK_RESTORED_TAG in v.tags and SOURCE_URI_TAG in v.tags}


def rollback_champion(client, actor: str, reason: str = "manual rollback") -> dict:
    """Give `champion` back to the `aligned_policy` version that held it before; returns both versions. Serialized
    with every other promotion and rollback of the registry (:func:`registry_lock`)."""
    with registry_lock(client):
        demoted = current_champion(client)
        if demoted is None:
            raise ValueError(f"{ALIGNED_MODEL} has no {CHAMPION_ALIAS!r} to roll back")
        rollback(client, ALIGNED_MODEL, actor, reason)
        return {"demoted": demoted, "restored": current_champion(client)}


def _tag_candidate(client, model: ModelRef, decision: GateDecision, judge: str, metrics: dict) -> None:
    """The verdict on the candidate's own registered version, as tags and in its model card, so `policy_kto` shows
    why it was not picked."""
    if model.uri is None:
        return
    name, version = model.registered_name, model.registered_version
    verdict = "passed" if decision.promote else "refused"
    client.set_model_version_tag(name, version, CANDIDATE_GATE_TAG, verdict)
    client.set_model_version_tag(name, version, CANDIDATE_GATE_REASON_TAG, decision.reason[:TAG_LIMIT])
    card = client.get_model_version(name, version).description or ""
    client.update_model_version(name, version, description=card_with_verdict(card, verdict, decision.reason, judge,
                                                                             metrics))


def _judge_line(report: EvaluationReport) -> str:
    return f"{report.judge.id}" + (" (heuristic)" if report.judge.heuristic else "")


def _aligned_version(client, model: ModelRef, metrics: dict, decision: GateDecision, report: EvaluationReport) -> str:
    """The `aligned_policy` version of ``model`` (created on its first promotion, reused after), tagged with
    where it came from, this evaluation's metrics, the gate's verdict, the evidence run and the judge that
    decided (a heuristic judge says so)."""
    from mlflow.exceptions import MlflowException

    uri = model.uri
    if uri is None:
        raise PromotionRefused(f"{model.path} is not a registered model version; only those can be champion")
    try:
        client.create_registered_model(ALIGNED_MODEL, description="The project's champion, whichever method "
                                                                  "trained it: the gate's pick among candidates.")
    except MlflowException as error:
        if "RESOURCE_ALREADY_EXISTS" not in str(error.error_code):
            raise
    existing = [v for v in client.search_model_versions(f"name='{ALIGNED_MODEL}'")
                if v.tags.get(SOURCE_URI_TAG) == uri]
    if existing:
        version = str(existing[0].version)
    else:
        source = client.get_model_version(model.registered_name, model.registered_version)
        inherited = {k: v for k, v in source.tags.items() if k.startswith("lineage.") or k == WEIGHTS_SHA256_TAG}
        version = str(client.create_model_version(ALIGNED_MODEL, source.source, run_id=source.run_id,
                                                  tags=inherited).version)
    tags = {SOURCE_URI_TAG: uri, SOURCE_PATH_TAG: model.path, SOURCE_START_PATH_TAG: model.start_path,
            "source.method": model.method, GATE_VERDICT_TAG: "passed", GATE_REASON_TAG: decision.reason,
            EVIDENCE_RUN_TAG: report.evidence.mlflow_run_id, EVIDENCE_DAGSTER_RUN_TAG: report.evidence.dagster_run_id,
            EVIDENCE_JUDGE_TAG: report.judge.id, EVIDENCE_JUDGE_HEURISTIC_TAG: str(report.judge.heuristic).lower(),
            **{f"eval.{key}": f"{value:.6g}" for key, value in metrics.items()
               if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}}
    for key, value in tags.items():
        if value is not None:
            client.set_model_version_tag(ALIGNED_MODEL, version, key, str(value)[:TAG_LIMIT])
    card = client.get_model_version(model.registered_name, model.registered_version).description or ""
    client.update_model_version(ALIGNED_MODEL, version, description=card_with_verdict(
        f"Champion candidate from {uri}.\n\n{card}", "passed", decision.reason, _judge_line(report), metrics))
    return version


# --------------------------------------------------------------------------------------
# Handoff to serving
# --------------------------------------------------------------------------------------


def registered_model_folder(client, alias: str = CHAMPION_ALIAS, name: str = ALIGNED_MODEL) -> str:
    """The local model folder behind ``name@alias``: the folder its training run wrote (the one place that
    resolves it, until the registry's ``fetch_model`` reads the version's own artifacts). A folder whose recorded
    weights hash is not the registry's is refused; loading it checks the weights against that hash."""
    version = client.get_model_version_by_alias(name, alias)
    folder = version.tags.get(SOURCE_PATH_TAG)
    if not folder:
        raise ValueError(f"{name} version {version.version} records no {SOURCE_PATH_TAG}")
    check_recorded_sha256(Path(folder), version.tags.get(WEIGHTS_SHA256_TAG), f"models:/{name}/{version.version}")
    return folder

