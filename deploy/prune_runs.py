"""Run and event-log retention for the Dagster instance (dagster.yaml's `retention` covers only ticks).

Deletes finished runs older than ``--days``, with their event logs, except a run that still holds
- the latest materialization of an asset (or of one of its partitions): the evaluation and the datasets read
  the newest materialization's metadata (model refs, data versions), and the UI shows it;
- the latest verdict of an asset check on an asset or partition: the datasets admit a feedback batch on its
  blocking check's recorded verdict.
Runs in progress are never touched. ``--dry-run`` lists what would go.

    python deploy/prune_runs.py --days 90 [--dry-run]       # DAGSTER_HOME names the instance

The compose file runs it daily (the `retention` service). Compute logs of deleted runs stay on the
`dagster-logs` volume until removed by hand (they are small and named by run id).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import dagster as dg
from dagster import DagsterEventType


def _latest_materialization_id(instance: dg.DagsterInstance, key: dg.AssetKey, partition: str | None) -> int | None:
    if partition is None:
        records = instance.fetch_materializations(key, limit=1).records
        return records[0].storage_id if records else None
    latest = instance.event_log_storage.get_latest_storage_id_by_partition(
        key, DagsterEventType.ASSET_MATERIALIZATION, partitions={partition})
    return latest.get(partition)


def holds_current_state(instance: dg.DagsterInstance, run_id: str) -> str | None:
    """Why the run must stay (a current materialization or check verdict), or None."""
    for record in instance.get_records_for_run(run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION).records:
        event = record.event_log_entry.dagster_event
        key, partition = event.asset_key, event.partition
        if _latest_materialization_id(instance, key, partition) == record.storage_id:
            return f"latest materialization of {key.to_user_string()}{f'[{partition}]' if partition else ''}"
    for record in instance.get_records_for_run(run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION).records:
        evaluation = record.event_log_entry.dagster_event.event_specific_data
        check_key = dg.AssetCheckKey(evaluation.asset_key, evaluation.check_name)
        partition = getattr(evaluation, "partition", None)
        infos = instance.event_log_storage.get_asset_check_partition_info(
            [check_key], partition_keys=[partition] if partition else None)
        if any(info.latest_check_event_storage_id == record.storage_id for info in infos):
            return f"latest verdict of {check_key.to_user_string()}{f'[{partition}]' if partition else ''}"
    return None


def prune(instance: dg.DagsterInstance, days: float, dry_run: bool = False) -> dict:
    cutoff = time.time() - days * 86400
    old = instance.get_run_records(filters=dg.RunsFilter(statuses=[
        dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED]))
    deleted, kept = [], {}
    for record in old:
        end = record.end_time or record.update_timestamp.timestamp()
        if end > cutoff:
            continue
        run_id = record.dagster_run.run_id
        reason = holds_current_state(instance, run_id)
        if reason:
            kept[run_id] = reason
            continue
        if not dry_run:
            instance.delete_run(run_id)  # the run and every event it logged
        deleted.append(run_id)
    return {"cutoff_days": days, "deleted": deleted, "kept": kept, "dry_run": dry_run}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=float, default=90, help="keep runs that finished within this many days")
    parser.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")
    args = parser.parse_args(argv)
    with dg.DagsterInstance.get() as instance:
        result = prune(instance, args.days, args.dry_run)
    print(json.dumps({"event": "run retention", "deleted": len(result["deleted"]), "kept": len(result["kept"]),
                      **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
