import dagster as dg

from alignment_pipelines.resources import Bound
from alignment_pipelines.resources.storage import StorageResource
from alignment_pipelines.tracking import Tracker


class MlflowResource(dg.ConfigurableResource):
    """MLflow tracking and registry. Unset URI: SQLite + local artifacts under the data root. The URI is bound by
    the deployment (a run config cannot send models and metrics to another server)."""

    storage: StorageResource
    tracking_uri: Bound[str | None] = None
    experiment: str = "alignment-pipelines"

    def resolved_uri(self) -> str:
        return self.tracking_uri or self.storage.layout.local_tracking_uri

    def tracker(self) -> Tracker:
        return Tracker(self.resolved_uri(), artifact_root=self.storage.layout.mlflow_artifacts,
                       experiment=self.experiment)
