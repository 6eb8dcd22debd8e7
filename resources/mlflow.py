import dagster as dg

from alignment_pipelines.tracking import Tracker, local_tracking_uri
from resources.storage import StorageResource


class MlflowResource(dg.ConfigurableResource):
    """MLflow tracking and registry. Defaults to SQLite + local artifacts under the data root."""

    storage: StorageResource
    tracking_uri: str | None = None
    experiment: str = "alignment-pipelines"

    def resolved_uri(self) -> str:
        return self.tracking_uri or local_tracking_uri(self.storage.layout.mlflow_dir)

    def tracker(self) -> Tracker:
        return Tracker(
            self.resolved_uri(),
            artifact_root=self.storage.layout.mlflow_dir / "artifacts",
            experiment=self.experiment,
        )
