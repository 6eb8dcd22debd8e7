"""The evaluation report as a versioned type: what the evaluation writes (``evaluation.json``) and promotion reads.

:class:`EvaluationReport` is the contract between the two. ``to_dict`` / ``to_json`` write it; ``from_dict`` /
``from_json`` read it back and refuse what this code cannot vouch for: another ``schema_version``, a missing or
mistyped field, a candidate or champion that is not among the models, and a judge that is a reward model one of the
models optimised (a PPO or RLOO policy is never judged by its own reward model: Goodhart, not quality).

"Champion" means one thing here and everywhere: the ``aligned_policy`` version that held the ``champion`` alias
when the evaluation measured (:class:`ChampionRef`), and the entry of ``models`` that is it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
WIN_RATE_FIELDS = ("win_rate", "ci_low", "ci_high", "wins", "losses", "ties", "judged")
JUDGE_SOURCES = ("evaluation_reward_model", "resource", "explicit")


class ReportSchemaError(ValueError):
    """An evaluation report this code cannot read, or one that breaks the contract."""


class JudgeIsOptimisationTarget(ReportSchemaError):
    """The judge is a reward model that a model under evaluation optimised."""


@dataclass(frozen=True)
class JudgeIdentity:
    """Which judge judged: its kind (``reward_model``, ``rule``, ``llm``, ``openai``...), its stable ``id``,
    whether it is a heuristic, where it came from (``source``: the ``evaluation_reward_model`` asset, the judge
    ``resource``, or passed ``explicit``-ly), the model it judges by and, for a reward model, its accuracy on the
    held-out pairs (``metrics``)."""

    kind: str
    id: str
    heuristic: bool
    source: str
    model_uri: str | None = None
    model_path: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, judge, source: str = "explicit", metrics: dict | None = None) -> JudgeIdentity:
        """The identity of a judge object (rule judges are heuristics; a model judge names its model)."""
        from alignment_pipelines.judges.rule import PositionJudge, RegexJudge, RuleJudge, ShorterJudge

        kind = getattr(judge, "name", type(judge).__name__)
        return cls(kind=kind, id=getattr(judge, "id", kind),
                   heuristic=isinstance(judge, (RuleJudge, ShorterJudge, RegexJudge, PositionJudge)), source=source,
                   model_uri=getattr(judge, "model_uri", None), model_path=getattr(judge, "model_dir", None),
                   metrics=dict(metrics or {}))

    def judges_by(self) -> set[str]:
        """The model it judges by, as its registry URI and its resolved folder."""
        return {self.model_uri, _resolved(self.model_path)} - {None}

    def headline(self) -> str:
        """The report's first line: which judge judged, and that a heuristic is one."""
        if self.heuristic:
            return (f"**Judged by a heuristic judge (`{self.kind}`)**: a rule of thumb, not a measure of quality; "
                    "promotion should rest on a reward-model or a named external judge.")
        model = f" {self.model_uri or self.model_path}" if (self.model_uri or self.model_path) else ""
        where = {"evaluation_reward_model": ", the evaluation reward model trained on the judge split (no policy "
                                            "and no training reward model saw it)",
                 "resource": ", the deployment's judge resource"}.get(self.source, "")
        return f"**Judged by `{self.kind}`{model}**{where}."


@dataclass(frozen=True)
class WinRate:
    """Wins against one other model on the eval prompts, both orders judged; ties count half; 95% interval."""

    win_rate: float
    ci_low: float
    ci_high: float
    wins: int
    losses: int
    ties: int
    judged: int

    def __post_init__(self):
        for name in WIN_RATE_FIELDS:
            value = getattr(self, name)
            no_rate = value is None and name in ("win_rate", "ci_low", "ci_high")  # nothing judged: written as null
            if not no_rate and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ReportSchemaError(f"win-rate field {name} must be a number, got {value!r}")

    @classmethod
    def from_metrics(cls, metrics: dict, label: str) -> WinRate | None:
        """The win-rate against ``label`` (``sft`` or ``champion``) from the flat metrics, None when not judged."""
        keys = {"win_rate": f"win_rate_vs_{label}", "ci_low": f"win_rate_vs_{label}_ci_low",
                "ci_high": f"win_rate_vs_{label}_ci_high", "wins": f"wins_vs_{label}",
                "losses": f"losses_vs_{label}", "ties": f"ties_vs_{label}", "judged": f"judged_vs_{label}"}
        if keys["win_rate"] not in metrics:
            return None
        return cls(**{name: metrics[key] for name, key in keys.items()})


@dataclass(frozen=True)
class ModelEvaluation:
    """One model's results: ``model`` (a ``ModelRef`` dict; for a champion no method's newest model is, its
    ``path``, ``start_path`` and ``uri``), every number measured (``metrics``, flat, as logged to MLflow), its
    ``win_rates`` by label (``sft``, ``champion``) and the reward models its training optimised."""

    model: dict[str, Any]
    metrics: dict[str, float]
    win_rates: dict[str, WinRate] = field(default_factory=dict)
    optimised_against: tuple[str, ...] = ()


@dataclass(frozen=True)
class ChampionRef:
    """The ``aligned_policy`` version holding ``champion`` when the evaluation measured, and its entry in
    ``models`` (``name``)."""

    name: str
    aligned_version: str
    source_uri: str | None


@dataclass(frozen=True)
class Evidence:
    """Where the evaluation is recorded."""

    mlflow_run_id: str
    dagster_run_id: str
    path: str


@dataclass(frozen=True)
class EvaluationReport:
    """What one evaluation measured, for promotion to decide on. ``candidates`` are the entries the gate may pick;
    ``baseline`` the SFT model's entry; ``training_reward_model`` the reward model PPO and RLOO optimised (it
    scores every answer, ``reward_mean``, and is never the judge) with its accuracy on the held-out pairs."""

    judge: JudgeIdentity
    baseline: str
    champion: ChampionRef | None
    candidates: tuple[str, ...]
    models: dict[str, ModelEvaluation]
    evidence: Evidence
    not_evaluated: tuple[str, ...] = ()
    training_reward_model: dict[str, Any] | None = None
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """The contract's rules beyond types (see the module doc); raises :class:`ReportSchemaError`."""
        if self.schema_version != SCHEMA_VERSION:
            raise ReportSchemaError(f"evaluation report schema_version {self.schema_version!r} is not {SCHEMA_VERSION}"
                                    ", the one this code reads: re-run evaluation_report to write a current one")
        if self.judge.source not in JUDGE_SOURCES:
            raise ReportSchemaError(f"judge.source {self.judge.source!r} is not one of {JUDGE_SOURCES}")
        for role, name in [("baseline", self.baseline), *(("candidate", c) for c in self.candidates),
                           *([("champion", self.champion.name)] if self.champion else [])]:
            if name not in self.models:
                raise ReportSchemaError(f"the {role} {name!r} is not among the evaluated models {sorted(self.models)}")
        check_judge_independent(self.judge, {name: m.optimised_against for name, m in self.models.items()})

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str, source: str = "evaluation report") -> EvaluationReport:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ReportSchemaError(f"{source} is not JSON: {error}") from None
        return cls.from_dict(data, source)

    @classmethod
    def from_dict(cls, data: Any, source: str = "evaluation report") -> EvaluationReport:
        """The report in ``data`` (as :meth:`to_dict` wrote it), validated; the error names ``source`` and the
        field."""
        if not isinstance(data, dict):
            raise ReportSchemaError(f"{source}: expected a JSON object, got {type(data).__name__}")
        if "schema_version" not in data:
            raise ReportSchemaError(f"{source} has no schema_version: it was written before the typed report "
                                    f"(version {SCHEMA_VERSION}); re-run evaluation_report")
        version = data["schema_version"]
        if version != SCHEMA_VERSION:
            raise ReportSchemaError(f"{source} has schema_version {version!r}; this code reads version "
                                    f"{SCHEMA_VERSION} only: re-run evaluation_report, or read it with the release "
                                    "that wrote it")
        try:
            judge = _build(JudgeIdentity, data["judge"], "judge")
            models = {}
            for name, entry in _typed(data["models"], dict, "models").items():
                entry = _typed(entry, dict, f"models.{name}")
                win_rates = {label: _build(WinRate, values, f"models.{name}.win_rates.{label}")
                             for label, values in _typed(entry.get("win_rates", {}), dict,
                                                         f"models.{name}.win_rates").items()}
                models[name] = ModelEvaluation(
                    model=_typed(entry["model"], dict, f"models.{name}.model"),
                    metrics=_typed(entry["metrics"], dict, f"models.{name}.metrics"), win_rates=win_rates,
                    optimised_against=tuple(_typed(entry.get("optimised_against", []), list,
                                                   f"models.{name}.optimised_against")))
            champion = None if data.get("champion") is None else _build(ChampionRef, data["champion"], "champion")
            return cls(judge=judge, baseline=_typed(data["baseline"], str, "baseline"), champion=champion,
                       candidates=tuple(_typed(data["candidates"], list, "candidates")), models=models,
                       evidence=_build(Evidence, data["evidence"], "evidence"),
                       not_evaluated=tuple(_typed(data.get("not_evaluated", []), list, "not_evaluated")),
                       training_reward_model=data.get("training_reward_model"), schema_version=version)
        except KeyError as error:
            raise ReportSchemaError(f"{source}: missing field {error.args[0]!r}") from None
        except ReportSchemaError as error:
            raise type(error)(f"{source}: {error}") from None

    @classmethod
    def read(cls, path: str | Path) -> EvaluationReport:
        """An ``evaluation.json`` from disk."""
        return cls.from_json(Path(path).read_text(), source=str(path))


def check_judge_independent(judge: JudgeIdentity, optimised_against: dict[str, tuple[str, ...]]) -> None:
    """Refuse a judge that is a reward model one of the models optimised (by registry URI or folder)."""
    judged_by = judge.judges_by()
    for name, targets in optimised_against.items():
        same = judged_by & ({_resolved(t) if not str(t).startswith("models:/") else t for t in targets} - {None})
        if same:
            raise JudgeIsOptimisationTarget(
                f"the judge {judge.id} is {sorted(same)[0]}, the reward model {name} optimised: its win-rates would "
                "measure how well it fooled that model, not its quality; judge with evaluation_reward_model (trained "
                "on the judge split) or an external judge")


def optimisation_targets(model_path: str | None, tags: dict[str, str]) -> tuple[str, ...]:
    """The reward models a model's training optimised: its ``lineage.uses.*`` registry tags and the
    ``reward_model`` its saved training config names."""
    from alignment_pipelines.methods.training import CONFIG_FILE

    targets = [value for key, value in sorted(tags.items()) if key.startswith("lineage.uses.") and value]
    config = Path(model_path) / CONFIG_FILE if model_path else None
    if config is not None and config.is_file():
        saved = json.loads(config.read_text())
        if saved.get("reward_model"):
            targets.append(str(saved["reward_model"]))
        if saved.get("judge") == "reward_model" and saved.get("judge_model"):  # online DPO's annotator
            targets.append(str(saved["judge_model"]))
    return tuple(dict.fromkeys(targets))


def _resolved(path: str | None) -> str | None:
    return str(Path(path).resolve()) if path else None


def _typed(value: Any, kind: type, where: str) -> Any:
    if not isinstance(value, kind):
        raise ReportSchemaError(f"{where} must be a {kind.__name__}, got {type(value).__name__}")
    return value


def _build(cls, values: Any, where: str):
    values = _typed(values, dict, where)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ReportSchemaError(f"{where} has unknown fields {unknown}")
    try:
        return cls(**values)
    except TypeError as error:
        raise ReportSchemaError(f"{where}: {error}") from None


def _jsonable(value: Any) -> Any:
    """NaN and infinities as null (JSON has none: nothing judged reads as missing), tuples as lists."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalars
        return _jsonable(value.item())
    return value
