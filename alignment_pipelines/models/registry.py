"""One way to get a model out of the MLflow registry: ``fetch_model(uri_or_ref) -> local folder``.

A registered version's artifacts are an MLflow model (see ``alignment_pipelines.mlflow_models``) with the
project's model folder inside it (``peft/`` for an adapter, ``model/`` for full weights, ``artifacts/model/``
for a scorer). With a local artifact store the folder is returned where it lies: the registry's copy is the
only copy. With a remote store the version is downloaded once into a cache, and an adapter's start model
(``parent_uri`` in its card) is fetched the same way, so the folder always loads with ``load_model``.

Weights are checked against registration: the registry's ``storage.weights_sha256`` must be what the folder's
card records (``fetch_model``), and loading hashes the safetensors against the card (``loading.verify_weights``),
so a changed or corrupt version is refused by every load and export, whichever way its folder was found.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from alignment_pipelines.tracking import WEIGHTS_SHA256_TAG

from .loading import (MODEL_CARD, PARENT_SHA256_KEY, WEIGHTS_SHA256_KEY, ModelFolderError, WeightsMismatchError,
                      load_tokenizer, load_weights, model_role, read_model_card, safetensors_sha256)

if TYPE_CHECKING:  # pragma: no cover
    from alignment_pipelines.refs import ModelRef

# Where the project's folder sits inside an MLflow model, by how it was logged (adapter, full weights, scorer).
PROJECT_FOLDERS = ("peft", "model", "artifacts/*")
HASH_CACHE = ".alignment_sha256.json"


class ModelPrunedError(ModelFolderError):
    """The version exists in the registry (with its lineage) but retention removed its artifacts."""


def parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/name/3`` -> (name, "3", None); ``models:/name@champion`` -> (name, None, "champion")."""
    if not uri.startswith("models:/"):
        raise ValueError(f"{uri!r} is not a models:/ URI")
    rest = uri[len("models:/"):].strip("/")
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        return name, None, alias
    name, _, version = rest.rpartition("/")
    if not name or not version.isdigit():
        raise ValueError(f"{uri!r}: expected models:/<name>/<version> or models:/<name>@<alias>")
    return name, version, None


def artifact_location(client, name: str, version: str) -> str:
    """Where the version's artifacts are stored (a ``runs:/`` source resolved to its run's artifact store)."""
    location = client.get_model_version_download_uri(name, version)
    if location.startswith("runs:/"):
        run_id, _, path = location[len("runs:/"):].partition("/")
        location = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{path}"
    return location


def mlflow_model_dir(client, name: str, version: str, cache_dir: Path, tracking_uri: str) -> Path:
    """The version's MLflow model as a local folder: in place for a local store, else a cached download."""
    location = artifact_location(client, name, version)
    parsed = urlparse(location)
    if parsed.scheme in ("", "file"):
        path = Path(parsed.path if parsed.scheme else location)
        if not path.is_dir():
            raise ModelPrunedError(f"models:/{name}/{version} has no artifacts at {path} (pruned by retention?)")
        return path
    target = cache_dir / name / str(version)
    if target.is_dir():
        return target
    import mlflow.artifacts

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}.staging-", dir=target.parent))
    try:
        mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=str(staging),
                                            tracking_uri=tracking_uri)
        downloaded = staging if (staging / "MLmodel").is_file() else next(staging.iterdir())
        os.replace(downloaded, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def project_folder(mlflow_dir: str | Path) -> Path:
    """The loadable model folder inside an MLflow model folder."""
    for pattern in PROJECT_FOLDERS:
        for candidate in sorted(Path(mlflow_dir).glob(pattern)):
            if (candidate / MODEL_CARD).is_file():
                return candidate
    raise ModelFolderError(f"{mlflow_dir} holds no model folder of this project (looked in {PROJECT_FOLDERS})")


def fetch_model(source: "str | Path | ModelRef", tracking_uri: str | None = None,
                cache_dir: str | Path | None = None) -> Path:
    """A local folder that ``load_model`` loads, for a ``models:/`` URI (version or alias), a ModelRef or a path.

    A ModelRef's ``path`` is used while it exists (the asset that made the ref fetched it), else its URI.

    ``tracking_uri`` defaults to ``MLFLOW_TRACKING_URI``, else the data root's SQLite store; ``cache_dir``
    to the data root's registry cache (used only for remote artifact stores).
    """
    from alignment_pipelines.layout import DataRoot, default_data_root

    if not isinstance(source, (str, Path)):  # a ModelRef: its path, fetched on this machine, while it exists
        source = source.path if Path(source.path).exists() or not source.uri else source.uri
    uri = str(source)
    if not uri.startswith("models:/"):
        return Path(uri)
    layout = DataRoot(default_data_root())
    tracking_uri = tracking_uri or layout.tracking_uri
    cache_dir = Path(cache_dir or layout.registry_cache)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    name, version, alias = parse_models_uri(uri)
    entry = client.get_model_version_by_alias(name, alias) if alias is not None else \
        client.get_model_version(name, version)
    version = str(entry.version)
    folder = project_folder(mlflow_model_dir(client, name, version, cache_dir, tracking_uri))
    check_recorded_sha256(folder, entry.tags.get(WEIGHTS_SHA256_TAG), f"models:/{name}/{version}")
    card = read_model_card(folder)
    if card.get("parent") and not Path(card["parent"]).exists() and card.get("parent_uri"):
        # A downloaded adapter: its start model is fetched too, and the cached card points at it.
        card["parent"] = str(fetch_model(card["parent_uri"], tracking_uri, cache_dir))
        (folder / MODEL_CARD).write_text(json.dumps(card, indent=2))
    return folder


def check_recorded_sha256(folder: Path, registered: str | None, what: str) -> None:
    """Refuse a folder whose card does not carry the weights hash the registry recorded for ``what`` (the load
    then checks the bytes against the card). Versions registered before hashes were recorded pass."""
    recorded = read_model_card(folder).get(WEIGHTS_SHA256_KEY)
    if registered and recorded != registered:
        raise WeightsMismatchError(f"{what}: the registry recorded weights sha256 {registered}, but the folder at "
                                   f"{folder} records {recorded}: its artifacts were replaced after registration")


def weights_sha256(folder: str | Path) -> str:
    """Content hash of a model folder's safetensors weights (the lineage of a base model), cached beside them
    (keyed by size and mtime). Verification does not use the cache: see ``loading.verify_weights``."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelFolderError(f"{folder} has no safetensors weights to hash")
    stamp = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    cache = folder / HASH_CACHE
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("files") == stamp:
            return cached["sha256"]
    digest = safetensors_sha256(folder)
    try:
        cache.write_text(json.dumps({"files": stamp, "sha256": digest}))
    except OSError:  # a read-only model store still hashes, only more slowly
        pass
    return digest


def export_model(source: "str | Path | ModelRef", target: str | Path, tracking_uri: str | None = None,
                 cache_dir: str | Path | None = None) -> Path:
    """Write a registered model as one plain folder (an adapter merged onto its start models), for use
    anywhere transformers runs. Safetensors only; the tokenizer goes with it. Weights that changed since
    registration are refused (``fetch_model`` and ``load_weights`` check them); the export records its own hash."""
    folder = fetch_model(source, tracking_uri, cache_dir)
    role = model_role(folder)
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    model = load_weights(folder, role)
    model.save_pretrained(target, safe_serialization=True)
    load_tokenizer(folder).save_pretrained(target)
    card = {key: value for key, value in read_model_card(folder).items() if key != PARENT_SHA256_KEY} | {
        "format": "full", "exported_from": str(source if isinstance(source, (str, Path)) else source.uri),
        "parent": None, WEIGHTS_SHA256_KEY: safetensors_sha256(target)}
    (target / MODEL_CARD).write_text(json.dumps(card, indent=2))
    return target
