"""Feedback in: inbox file → raw batch → validated rows + quarantine, gated by a GX suite."""


import json
import shutil

import dagster as dg

from alignment_pipelines.data.inbox import content_hash_of, find_batch_file, scan_inbox
from alignment_pipelines.data.splits import read_records, write_records
from alignment_pipelines.data.validation import ValidationRules, run_expectation_suite, validate_file
from resources.storage import StorageResource

feedback_batches = dg.DynamicPartitionsDefinition(name="feedback_batches")

RAW_FILE = "raw"  # the batch's immutable copy of the inbox file keeps its suffixes after this stem
ACCEPTED_FILE = "accepted.parquet"
QUARANTINE_FILE = "quarantine.parquet"
SUMMARY_FILE = "summary.json"


def raw_batch_file(batch_dir):
    matches = sorted(batch_dir.glob(f"{RAW_FILE}.*"))
    if not matches:
        raise FileNotFoundError(f"{batch_dir}: no raw copy; materialize raw_feedback for this batch first")
    return matches[0]


@dg.asset(partitions_def=feedback_batches, group_name="ingestion", kinds={"jsonl"})
def raw_feedback(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
    """An immutable copy of one inbox file; the partition key is file name + content hash."""
    layout = storage.layout
    key = context.partition_key
    source = find_batch_file(layout.inbox, key)
    batch_dir = layout.batch_dir(key)
    batch_dir.mkdir(parents=True, exist_ok=True)
    suffix = "".join(source.suffixes[-2:]) if source.name.endswith(".gz") else source.suffix
    target = batch_dir / f"{RAW_FILE}{suffix}"
    if not target.exists():
        shutil.copyfile(source, target)
    return dg.MaterializeResult(metadata={
        "source": dg.MetadataValue.path(str(source)),
        "batch_file": dg.MetadataValue.path(str(target)),
        "bytes": target.stat().st_size,
    })


@dg.multi_asset(
    specs=[
        dg.AssetSpec("validated_feedback", deps=[raw_feedback], group_name="ingestion", kinds={"parquet"},
                     description="The batch's rows that passed every validation rule."),
        dg.AssetSpec("quarantine", deps=[raw_feedback], group_name="ingestion", kinds={"parquet"},
                     description="The batch's rows that failed a rule, each with its line number and reason."),
    ],
    partitions_def=feedback_batches,
)
def validate_feedback_batch(context: dg.AssetExecutionContext, storage: StorageResource):
    """Route every row of a batch to accepted or quarantine; accepted + quarantined = input."""
    batch_dir = storage.layout.batch_dir(context.partition_key)
    rules = ValidationRules()
    result = validate_file(raw_batch_file(batch_dir), rules)
    write_records(result.accepted, batch_dir / ACCEPTED_FILE)
    result.quarantined.to_parquet(batch_dir / QUARANTINE_FILE, index=False)
    suite = run_expectation_suite(result.accepted, rules, quarantined_count=len(result.quarantined))
    summary = result.summary() | {"suite_success": suite.success}
    (batch_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    if len(result.accepted) + len(result.quarantined) != result.rows:  # the contract, checked every time
        raise dg.Failure(f"{context.partition_key}: rows lost in validation: {summary}")

    by_reason = result.counts_by_reason()
    reasons_md = "| reason | rows |\n|---|---|\n" + "".join(f"| {r} | {n} |\n" for r, n in sorted(by_reason.items()))
    yield dg.MaterializeResult(asset_key="validated_feedback", metadata={
        "dagster/row_count": len(result.accepted),
        "input_rows": result.rows,
        "quarantined_rows": len(result.quarantined),
        "path": dg.MetadataValue.path(str(batch_dir / ACCEPTED_FILE)),
    })
    yield dg.MaterializeResult(asset_key="quarantine", metadata={
        "dagster/row_count": len(result.quarantined),
        "by_reason": dg.MetadataValue.md(reasons_md),
        "counts_by_reason": dg.MetadataValue.json(by_reason),
        "sample": dg.MetadataValue.md(_sample_markdown(result.quarantined)),
        "path": dg.MetadataValue.path(str(batch_dir / QUARANTINE_FILE)),
    })


@dg.asset_check(asset="validated_feedback", blocking=True, partitions_def=feedback_batches,
                description="The Great Expectations suite on the accepted rows, plus the batch's quarantine rate.")
def validated_feedback_expectations(context: dg.AssetCheckExecutionContext,
                                    storage: StorageResource) -> dg.AssetCheckResult:
    batch_dir = storage.layout.batch_dir(context.partition_key)
    summary = json.loads((batch_dir / SUMMARY_FILE).read_text())
    report = run_expectation_suite(read_records(batch_dir / ACCEPTED_FILE), ValidationRules(),
                                   quarantined_count=summary["quarantined"])
    return dg.AssetCheckResult(passed=report.success, metadata={
        "expectations": dg.MetadataValue.md(report.markdown()),
        "failed": [r["expectation"] for r in report.results if not r["success"]],
    })


def _sample_markdown(quarantined, limit: int = 5) -> str:
    if quarantined.empty:
        return "No rows quarantined."
    lines = ["| row | reason | detail |", "|---|---|---|"]
    for record in quarantined.head(limit).itertuples():
        detail = str(record.detail).replace("|", "\\|").replace("\n", " ")[:120]
        lines.append(f"| {record.row} | {record.reason} | {detail} |")
    return "\n".join(lines)


@dg.sensor(
    target=[raw_feedback, validate_feedback_batch],
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Registers each new, complete inbox file as a feedback batch and ingests it.",
)
def feedback_inbox_sensor(context: dg.SensorEvaluationContext, storage: StorageResource) -> dg.SensorResult:
    """Idempotent: content already ingested (under any file name) is never a second batch.

    Files still being written (a `.part` suffix, or changed since the last tick) wait; the cursor
    remembers sizes and hashes so unchanged files are not re-hashed every tick.
    """
    previous = json.loads(context.cursor)["seen"] if context.cursor else {}
    scan = scan_inbox(storage.layout.inbox, previous=previous)
    known_hashes = {content_hash_of(k) for k in context.instance.get_dynamic_partitions(feedback_batches.name)}
    new_keys, duplicates = [], []
    for inbox_file in scan.ready:
        digest = content_hash_of(inbox_file.key)
        if digest in known_hashes:
            duplicates.append(inbox_file.path.name)
            continue
        known_hashes.add(digest)
        new_keys.append(inbox_file.key)
    cursor = json.dumps({"seen": scan.seen})
    if not new_keys:
        return dg.SensorResult(cursor=cursor, skip_reason=(
            f"no new feedback: {len(scan.ready)} file(s) already ingested, "
            f"{len(scan.still_writing)} still being written"))
    if duplicates:
        context.log.info(f"skipped files whose content is already a batch: {duplicates}")
    return dg.SensorResult(
        cursor=cursor,
        run_requests=[dg.RunRequest(partition_key=key, run_key=key) for key in new_keys],
        dynamic_partitions_requests=[feedback_batches.build_add_request(new_keys)],
    )
