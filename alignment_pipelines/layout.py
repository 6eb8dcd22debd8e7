"""Where everything lives under the one data root (local path today, object store later)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DATA_ROOT_ENV = "ALIGNMENT_PIPELINES_HOME"
MLFLOW_URI_ENV = "MLFLOW_TRACKING_URI"


def folder_bytes(folder: str | Path) -> int:
    """Bytes of the files under ``folder`` (0 if it does not exist; links not followed)."""
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file() and not f.is_symlink())


def default_data_root() -> Path:
    return Path(os.environ.get(DATA_ROOT_ENV, ".data")).resolve()


@dataclass(frozen=True)
class DataRoot:
    root: Path

    @property
    def inbox(self) -> Path:
        """Drop feedback files here; the inbox sensor turns each into a batch."""
        return self.root / "inbox"

    def batch_dir(self, batch_key: str) -> Path:
        return self.root / "batches" / batch_key

    def dataset_dir(self, name: str, version: str) -> Path:
        return self.root / "datasets" / name / version

    @property
    def model_store(self) -> Path:
        """Base models converted once to safetensors (SmolLM2, GGUF imports, the tiny model)."""
        return self.root / "models"

    @property
    def datasets(self) -> Path:
        return self.root / "datasets"

    @property
    def runs(self) -> Path:
        """Staging: a training run writes its model here; registration moves it into MLflow and removes the rest."""
        return self.root / "runs"

    def training_dir(self, asset_name: str, run_id: str) -> Path:
        return self.runs / asset_name / run_id

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoints_dir(self, asset_name: str) -> Path:
        """In-flight checkpoints of one training asset, removed after its run succeeds."""
        return self.checkpoints / asset_name

    @property
    def ai_feedback(self) -> Path:
        """The AI-feedback store: every judgement an online method asked for, kept apart from human feedback."""
        return self.root / "ai_feedback"

    @property
    def mlflow_dir(self) -> Path:
        return self.root / "mlflow"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.mlflow_dir / "artifacts"

    @property
    def registry_cache(self) -> Path:
        """Registered models downloaded from a remote artifact store; a local store is read in place."""
        return self.root / "registry-cache"

    @property
    def local_tracking_uri(self) -> str:
        """SQLite backend under the data root: works offline, no server needed."""
        return f"sqlite:///{self.mlflow_dir / 'mlflow.db'}"

    @property
    def tracking_uri(self) -> str:
        """``MLFLOW_TRACKING_URI`` when set (a shared server), else the local store."""
        return os.environ.get(MLFLOW_URI_ENV) or self.local_tracking_uri

    def ensure(self) -> "DataRoot":
        for path in (self.inbox, self.model_store, self.mlflow_dir):
            path.mkdir(parents=True, exist_ok=True)
        return self
