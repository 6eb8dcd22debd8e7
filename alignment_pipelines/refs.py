"""Small, picklable references that assets hand to each other: paths plus lineage, never tensors."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class DatasetRef:
    """A versioned, split training dataset on disk."""

    name: str
    version: str  # content hash of the deduplicated rows
    train_path: str
    eval_path: str
    batches: tuple[str, ...]
    train_rows: int
    eval_rows: int
    balance: dict | None = None  # binary feedback: desirable/undesirable counts and KTO class weights

    def stats(self) -> dict:
        """What a method may adapt its config to (``MethodConfig.adapt_to_data``)."""
        return dict(self.balance or {})


@dataclass(frozen=True)
class ModelRef:
    """A trained (or converted base) model folder, its role and where it is registered."""

    path: str  # loads with load_model: the registry's own copy (models.registry.fetch_model) or a base model folder
    method: str
    base_model: str
    role: str = "policy"  # policy, reference, reward or value
    start_path: str | None = None  # the model it was trained from (its reference for implicit rewards)
    dataset_version: str | None = None
    registered_name: str | None = None
    registered_version: str | None = None
    mlflow_run_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def uri(self) -> str | None:
        if self.registered_name and self.registered_version:
            return f"models:/{self.registered_name}/{self.registered_version}"
        return None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelRef":
        return cls(**values)
