"""Retention on a schedule: the registry and the data root keep what is needed and nothing more.

``storage_retention`` prunes registered versions nobody needs (their registry entries and lineage stay) and
sweeps leftovers (see ``alignment_pipelines.retention``); its metadata is the storage line in the UI: bytes
freed by this run, by kind, and what the data root holds afterwards.
"""

import dataclasses

import dagster as dg
import pydantic

from alignment_pipelines.layout import folder_bytes
from alignment_pipelines.methods import METHODS
from alignment_pipelines.refs import ModelRef
from alignment_pipelines.resources.mlflow import MlflowResource
from alignment_pipelines.resources.storage import StorageResource
from alignment_pipelines.retention import RetentionPolicy, apply_retention

IN_FLIGHT = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
             dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]

RetentionConfig = pydantic.create_model(
    "RetentionConfig", __base__=dg.Config, __doc__=RetentionPolicy.__doc__,
    **{f.name: (type(f.default), pydantic.Field(f.default, description=f.metadata["help"]))
       for f in dataclasses.fields(RetentionPolicy)})


def busy_assets(instance: dg.DagsterInstance, own_run_id: str) -> set[str] | None:
    """Assets that runs in flight are materializing; None when a run in flight does not say (a whole job)."""
    busy: set[str] = set()
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=IN_FLIGHT)):
        if run.run_id == own_run_id:
            continue
        if run.asset_selection is None:
            return None
        busy |= {key.to_user_string() for key in run.asset_selection}
    return busy


def paths_in_use(instance: dg.DagsterInstance) -> set[str]:
    """The model folders the newest materialization of each training asset points at."""
    paths = set()
    for spec in METHODS.values():
        event = instance.get_latest_materialization_event(dg.AssetKey(spec.asset))
        entry = event.asset_materialization.metadata.get("model_ref") if event and event.asset_materialization else None
        if entry is not None:
            ref = ModelRef.from_dict(entry.value)
            paths |= {p for p in (ref.path, ref.start_path) if p}
    return paths


@dg.asset(group_name="storage", kinds={"mlflow"})
def storage_retention(context: dg.AssetExecutionContext, config: RetentionConfig, storage: StorageResource,
                      mlflow: MlflowResource) -> dg.MaterializeResult:
    """Keep the champion, every version a rollback can reach and the newest versions of each method; prune the
    other versions' artifacts (tagged `storage.pruned`, lineage kept); sweep finished runs' leftovers, but keep a
    model that trained and awaits registration by its retry."""
    layout = storage.layout
    report = apply_retention(mlflow.tracker(), layout, RetentionPolicy(**config.model_dump()),
                             busy_assets(context.instance, context.run_id), paths_in_use(context.instance))
    context.log.info(f"retention pruned {report.pruned}, freed {report.total_freed} bytes")
    held = {folder.name: folder_bytes(folder) for folder in sorted(layout.root.iterdir()) if folder.is_dir()}
    return dg.MaterializeResult(metadata={
        "bytes_freed": dg.MetadataValue.int(report.total_freed),
        **{f"bytes_freed/{kind}": dg.MetadataValue.int(n) for kind, n in report.freed_bytes.items()},
        "data_root_bytes": dg.MetadataValue.int(sum(held.values())),
        **{f"data_root_bytes/{name}": dg.MetadataValue.int(n) for name, n in held.items()},
        "pruned_versions": dg.MetadataValue.json(report.pruned),
        "kept_versions": dg.MetadataValue.json(report.kept),
        "removed_folders": dg.MetadataValue.json(report.removed),
        "awaiting_registration": dg.MetadataValue.json(report.awaiting_registration),
    })


storage_retention_job = dg.define_asset_job("storage_retention_job", selection=[storage_retention],
                                            description="Prune unneeded model versions and sweep leftovers.")

storage_retention_schedule = dg.ScheduleDefinition(
    name="storage_retention_schedule",
    job=storage_retention_job,
    cron_schedule="30 3 * * *",  # after nightly_retraining (02:00)
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Runs retention every night with the default policy: storage stays flat as the graph retrains.",
)
