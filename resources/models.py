import dagster as dg

from alignment_pipelines.models.loading import resolve_model
from alignment_pipelines.models.spec import DEFAULT_MODEL, parse_model_spec
from alignment_pipelines.resources import Bound
from alignment_pipelines.resources.storage import StorageResource


class BaseModelResource(dg.ConfigurableResource):
    """The base model every method starts from; converted once into the model store."""

    storage: StorageResource
    model: str = DEFAULT_MODEL  # `smollm2-135m-instruct`, `tiny-random`, a folder, a .gguf file or a hub id
    allow_hub: Bound[bool] = False  # hub downloads are opt-in, by the deployment (network access), not a run

    def describe(self) -> str:
        return parse_model_spec(self.model, allow_hub=self.allow_hub).describe()

    def resolve(self) -> str:
        return str(resolve_model(self.model, self.storage.layout.model_store, allow_hub=self.allow_hub))
