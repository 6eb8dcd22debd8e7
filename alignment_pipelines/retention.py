"""Retention: what the data root and the registry keep, so storage stays flat however often the graph retrains.

Every registered version of a method keeps its registry entry and lineage tags forever. Its artifacts are
kept while it is needed: it holds an alias (``champion``, ``candidate``, ...), a rollback can reach it (the
champion's ``promotion.previous_champion``, that version's, and so on back to the first champion), it is among
the newest ``keep_last`` versions, or a kept version loads onto it, was trained from it or re-registers it
(``aligned_policy`` versions share their source's artifacts). Any other version loses its artifacts and is tagged
``storage.pruned``. Beside the registry, leftovers are swept: checkpoints of assets no run is training,
hidden staging folders of killed runs, run folders nothing references, and dataset versions that neither
a kept model nor the newest materializations use. A run folder holding a model that finished training but was
not registered (the registry was down) is kept for the retry that registers it, until a newer version of its
asset is registered.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from alignment_pipelines.layout import DataRoot, folder_bytes
from alignment_pipelines.methods.training import METRICS_FILE
from alignment_pipelines.models.registry import artifact_location
from alignment_pipelines.promotion import PREVIOUS_CHAMPION_TAG, SOURCE_URI_TAG
from alignment_pipelines.tracking import (BYTES_TAG, CHAMPION_ALIAS, DEPENDS_ON_TAG, PRUNED_AT_TAG, PRUNED_TAG,
                                         Tracker)

FREED_TAG = "storage.freed_bytes"
LEFTOVER_PATTERNS = (".*.staging-*", ".*.old-*", ".*.tmp-*")  # StagingDir, its replaced output, model builds
# Tags naming another version that a version needs, and why.
NEEDS_TAGS = {DEPENDS_ON_TAG: "loads onto it", "lineage.parent_model": "was trained from it",
              SOURCE_URI_TAG: "re-registers it"}


@dataclass(frozen=True)
class RetentionPolicy:
    """How much to keep. The champion, every version a rollback can reach and every aliased version are always
    kept."""

    keep_last: int = field(default=3, metadata={
        "help": "Newest versions kept per registered model (one per method), champion or not."})
    keep_dataset_versions: int = field(default=1, metadata={
        "help": "Newest versions kept per dataset, beside those a kept model was trained on."})
    min_age_hours: float = field(default=6.0, metadata={
        "help": "Checkpoints, staging folders, run folders and dataset versions younger than this are left "
                "alone: a run may still be writing them."})

    def __post_init__(self):
        if self.keep_last < 1 or self.keep_dataset_versions < 1:
            raise ValueError("keep_last and keep_dataset_versions must be at least 1 (the newest is in use)")
        if self.min_age_hours < 0:
            raise ValueError(f"min_age_hours must be >= 0, got {self.min_age_hours}")


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: str
    tags: dict[str, str]
    aliases: tuple[str, ...] = ()
    location: str = ""  # where its artifacts are; versions of `aligned_policy` share their source's
    created_ms: int = 0  # when it was registered (milliseconds since the epoch)

    @property
    def key(self) -> str:
        return f"{self.name}/{self.version}"

    @property
    def pruned(self) -> bool:
        return self.tags.get(PRUNED_TAG) == "true"


@dataclass
class RetentionReport:
    kept: dict[str, list[str]] = field(default_factory=dict)  # "name/version" -> why
    pruned: list[str] = field(default_factory=list)
    freed_bytes: dict[str, int] = field(default_factory=dict)  # category -> bytes
    removed: list[str] = field(default_factory=list)  # folders swept
    awaiting_registration: list[str] = field(default_factory=list)  # trained models kept for the retry

    @property
    def total_freed(self) -> int:
        return sum(self.freed_bytes.values())

    def to_dict(self) -> dict:
        return asdict(self) | {"total_freed": self.total_freed}


def versions_to_keep(versions: list[VersionInfo], keep_last: int) -> dict[str, list[str]]:
    """Which versions keep their artifacts, and why (pure: the registry's state in, the decision out)."""
    reasons: dict[str, list[str]] = {}
    by_key = {v.key: v for v in versions}
    for name in {v.name for v in versions}:
        newest = sorted((v for v in versions if v.name == name), key=lambda v: int(v.version), reverse=True)
        for v in newest[:keep_last]:
            reasons.setdefault(v.key, []).append(f"among the newest {keep_last}")
    for v in versions:
        for alias in v.aliases:
            reasons.setdefault(v.key, []).append(f"alias {alias}")
        if CHAMPION_ALIAS in v.aliases:
            for target in rollback_targets(v, by_key):
                reasons.setdefault(target, []).append("rollback target")
    pending = list(reasons)
    while pending:  # what a kept version loads onto or was trained from stays loadable
        kept = by_key.get(pending.pop())
        for tag, why in NEEDS_TAGS.items() if kept else ():
            uri = kept.tags.get(tag, "")
            if uri.startswith("models:/"):
                needed = uri[len("models:/"):]
                if needed not in reasons:
                    pending.append(needed)
                reasons.setdefault(needed, []).append(f"{kept.key} {why}")
    return {key: why for key, why in reasons.items() if key in by_key}


def rollback_targets(champion: VersionInfo, by_key: dict[str, VersionInfo]) -> list[str]:
    """Every version repeated rollbacks from ``champion`` walk back to, nearest first (a link to a version that is
    gone ends the walk, as it ends a rollback)."""
    targets: list[str] = []
    current = champion
    while (previous := current.tags.get(PREVIOUS_CHAMPION_TAG)) and f"{current.name}/{previous}" not in targets:
        targets.append(f"{current.name}/{previous}")
        if targets[-1] not in by_key:
            break
        current = by_key[targets[-1]]
    return targets


def registry_versions(tracker: Tracker) -> list[VersionInfo]:
    """Every version this project registered (those with lineage tags), with its aliases."""
    found = []
    for model in tracker.client.search_registered_models():
        aliases: dict[str, list[str]] = {}
        for alias, version in tracker.client.get_registered_model(model.name).aliases.items():
            aliases.setdefault(str(version), []).append(alias)
        for v in tracker.client.search_model_versions(f"name='{model.name}'"):
            if "lineage.method" in v.tags:
                location = artifact_location(tracker.client, model.name, str(v.version))
                found.append(VersionInfo(model.name, str(v.version), dict(v.tags),
                                         tuple(aliases.get(str(v.version), ())), location, v.creation_timestamp))
    return found


def prune_versions(tracker: Tracker, versions: list[VersionInfo]) -> int:
    """Remove the artifacts the ``versions`` share, tag each pruned (lineage tags untouched); the bytes freed."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    repo = get_artifact_repository(versions[0].location)
    local = isinstance(repo, LocalArtifactRepository)
    freed = folder_bytes(repo.artifact_dir) if local and Path(repo.artifact_dir).exists() \
        else max(int(v.tags.get(BYTES_TAG, 0)) for v in versions)
    repo.delete_artifacts()
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for version in versions:
        for key, value in ((PRUNED_TAG, "true"), (PRUNED_AT_TAG, stamp), (FREED_TAG, str(freed))):
            tracker.client.set_model_version_tag(version.name, version.version, key, value)
    return freed


def apply_retention(tracker: Tracker, layout: DataRoot, policy: RetentionPolicy, busy_assets: set[str] | None,
                    in_use: set[str] = frozenset()) -> RetentionReport:
    """Prune the registry, then sweep the data root. ``busy_assets``: assets a run is materializing now (None:
    unknown, so no checkpoint or run folder is touched); ``in_use``: paths the newest materializations point at."""
    report = RetentionReport()
    versions = registry_versions(tracker)
    report.kept = versions_to_keep(versions, policy.keep_last)
    kept_locations = {v.location for v in versions if v.key in report.kept}
    doomed: dict[str, list[VersionInfo]] = {}
    for version in versions:
        if version.key not in report.kept and not version.pruned and version.location not in kept_locations:
            doomed.setdefault(version.location, []).append(version)
    report.freed_bytes["model_versions"] = sum(prune_versions(tracker, group) for group in doomed.values())
    report.pruned = sorted(v.key for group in doomed.values() for v in group)
    cached = [layout.registry_cache / name / version for name, version in (key.split("/") for key in report.pruned)]
    report.freed_bytes["registry_cache"] = _sweep(report, [p for p in cached if p.is_dir()], time.time(), set())

    cutoff = time.time() - policy.min_age_hours * 3600
    live_datasets = {v.tags.get("lineage.dataset_version") for v in versions if v.key in report.kept}
    report.freed_bytes["datasets"] = _sweep(report, _stale_datasets(layout, policy, live_datasets), cutoff, in_use)
    report.freed_bytes["staging"] = _sweep(report, [p for root in (layout.runs, layout.model_store,
                                                                   layout.registry_cache)
                                                    for pattern in LEFTOVER_PATTERNS for p in root.rglob(pattern)
                                                    if p.is_dir()], cutoff, in_use)
    if busy_assets is not None:
        report.freed_bytes["checkpoints"] = _sweep(report, _idle(layout.checkpoints, busy_assets), cutoff, in_use)
        model_runs = [p for p in _idle(layout.runs, busy_assets) if any(p.rglob("*.safetensors"))]
        report.awaiting_registration = [str(p) for p in model_runs if awaiting_registration(p, versions)]
        report.freed_bytes["run_folders"] = _sweep(report, [p for p in model_runs
                                                            if str(p) not in report.awaiting_registration],
                                                   cutoff, in_use)
    return report


def awaiting_registration(run_folder: Path, versions: list[VersionInfo]) -> bool:
    """Whether ``runs/<asset>/<key>`` holds a model that finished training and no version of its asset was
    registered since: the asset's retry registers it as it is."""
    finished = run_folder / "model" / METRICS_FILE
    if not finished.is_file():
        return False
    done_ms = finished.stat().st_mtime * 1000
    return not any(v.name == run_folder.parent.name and v.created_ms > done_ms for v in versions)


def _children(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def _idle(parent: Path, busy_assets: set[str]) -> list[Path]:
    """``<parent>/<asset>/<key>`` folders of assets no run is materializing."""
    return [p for asset in _children(parent) if asset.name not in busy_assets for p in _children(asset)]


def _stale_datasets(layout: DataRoot, policy: RetentionPolicy, live_versions: set) -> list[Path]:
    stale = []
    for dataset in _children(layout.datasets):
        newest_first = sorted(_children(dataset), key=lambda p: p.stat().st_mtime, reverse=True)
        stale += [p for p in newest_first[policy.keep_dataset_versions:] if p.name not in live_versions]
    return stale


def _sweep(report: RetentionReport, folders: list[Path], cutoff: float, in_use: set[str]) -> int:
    """Remove the folders last written before ``cutoff`` that hold nothing in use; the bytes freed."""
    freed = 0
    for folder in folders:
        newest = max([folder.stat().st_mtime, *(p.stat().st_mtime for p in folder.iterdir())])
        if newest > cutoff or any(Path(path).is_relative_to(folder) for path in in_use):
            continue
        freed += folder_bytes(folder)
        shutil.rmtree(folder, ignore_errors=True)
        report.removed.append(str(folder))
    return freed
