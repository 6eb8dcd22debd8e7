from pathlib import Path

import dagster as dg
from pydantic import Field

from alignment_pipelines.layout import DataRoot, default_data_root
from alignment_pipelines.resources import Bound


class StorageResource(dg.ConfigurableResource):
    """The one data root: inbox, batches, datasets, model store, training runs, MLflow store."""

    root: Bound[str] = Field(default_factory=lambda: str(default_data_root()),
                             description="Local folder for all pipeline outputs (env ALIGNMENT_PIPELINES_HOME); "
                                         "bound by the deployment, not run config.")

    @property
    def layout(self) -> DataRoot:
        return DataRoot(root=Path(self.root).resolve()).ensure()
