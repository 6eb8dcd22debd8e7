"""Feedback in: inbox file → raw batch → validated rows + quarantine, gated by a GX suite.

The gate is one asset check, `validated_feedback_expectations` (blocking): it stops downstream
steps in its own run, and its verdict, recorded in the Dagster instance per batch, is what
`gate_verdicts` reads for the later runs that build the training datasets.
"""

import json
from dataclasses import asdict

import dagster as dg
# per-batch check verdicts come from the event log storage (partitioned asset checks are a preview feature)
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus

from alignment_pipelines.data.ingest.inbox import content_hash_of, copy_batch_file, scan_inbox
from alignment_pipelines.data.datasets.key_index import KEYS_FILE, KeyIndex, ensure_keys
from alignment_pipelines.data.validate.engine import validate_file_to_parquet
from alignment_pipelines.data.validate.gate import run_expectation_suite_on_file
from alignment_pipelines.data.validate.rules import ValidationRules, defect_count
from alignment_pipelines.resources.models import BaseModelResource
from alignment_pipelines.resources.storage import StorageResource

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
    """An immutable copy of one inbox file; the partition key is file name + content hash. The copy is
    hashed as it is written, under a temporary name, and renamed only when it matches the key; a retry
    checks a copy already there again (`copy_batch_file`)."""
    layout = storage.layout
    key = context.partition_key
    batch_dir = layout.batch_dir(key)
    batch_dir.mkdir(parents=True, exist_ok=True)
    target, source = copy_batch_file(layout.inbox, key, batch_dir, RAW_FILE)
    return dg.MaterializeResult(metadata={
        "source": dg.MetadataValue.path(str(source)) if source else "(copied before, checked again)",
        "batch_file": dg.MetadataValue.path(str(target)),
        "bytes": target.stat().st_size,
    })


class ValidationConfig(dg.Config):
    """The batch's validation rules; recorded in its summary so the blocking check applies the same."""

    layout: str | None = None  # force a row layout (e.g. "hh-rlhf", "chat-log") instead of detecting it
    pii: str = "off"  # "off", "redact" or "quarantine" e-mail addresses, phone and card numbers
    measure_tokens: bool = True  # token lengths with the base model's own tokenizer
    max_prompt_tokens: int = 1024
    max_completion_tokens: int = 1024
    quarantine_over_length: bool = False  # False: accepted and counted in the truncation statistics
    max_quarantine_fraction: float = 0.5  # the batch gate: more junk than this blocks the batch


@dg.multi_asset(
    specs=[
        dg.AssetSpec("validated_feedback", deps=[raw_feedback], group_name="ingestion", kinds={"parquet"},
                     description="The batch's rows that passed every validation rule."),
        dg.AssetSpec("quarantine", deps=[raw_feedback], group_name="ingestion", kinds={"parquet"},
                     description="The batch's rows that failed a rule, each with its line number and reason."),
    ],
    partitions_def=feedback_batches,
)
def validate_feedback_batch(context: dg.AssetExecutionContext, config: ValidationConfig,
                            storage: StorageResource, base_model: BaseModelResource):
    """Route every row of a batch to accepted or quarantine (accepted + quarantined = input), chunk by
    chunk; rows already accepted in an earlier batch are duplicates."""
    layout = storage.layout
    key = context.partition_key
    batch_dir = layout.batch_dir(key)
    rules = ValidationRules(
        tokenizer=base_model.resolve() if config.measure_tokens else None, pii=config.pii,
        max_prompt_tokens=config.max_prompt_tokens, max_completion_tokens=config.max_completion_tokens,
        quarantine_over_length=config.quarantine_over_length,
        max_quarantine_fraction=config.max_quarantine_fraction)
    earlier = earlier_key_index(context.instance, layout, key)
    try:
        summary = validate_file_to_parquet(raw_batch_file(batch_dir), batch_dir / ACCEPTED_FILE,
                                           batch_dir / QUARANTINE_FILE, rules, layout=config.layout,
                                           known_index=earlier, keys_path=batch_dir / KEYS_FILE)
    finally:
        earlier.close()
    summary["rules"] = asdict(rules)
    (batch_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str))
    if summary["accepted"] + summary["quarantined"] != summary["rows"]:  # the contract, checked every time
        raise dg.Failure(f"{key}: rows lost in validation: {summary}")

    by_reason = summary["by_reason"]
    reasons_md = "| reason | rows |\n|---|---|\n" + "".join(f"| {r} | {n} |\n" for r, n in sorted(by_reason.items()))
    yield dg.MaterializeResult(asset_key="validated_feedback", metadata={
        "dagster/row_count": summary["accepted"],
        "input_rows": summary["rows"],
        "quarantined_rows": summary["quarantined"],
        "kind": summary["kind"],
        "layout": summary["layout"],
        "truncation": dg.MetadataValue.json(summary.get("truncation") or {}),
        "pii": dg.MetadataValue.json(summary.get("pii") or {"mode": "off"}),
        "path": dg.MetadataValue.path(str(batch_dir / ACCEPTED_FILE)),
    })
    yield dg.MaterializeResult(asset_key="quarantine", metadata={
        "dagster/row_count": summary["quarantined"],
        "by_reason": dg.MetadataValue.md(reasons_md),
        "counts_by_reason": dg.MetadataValue.json(by_reason),
        "sample": dg.MetadataValue.md(_sample_markdown(summary.get("samples") or [])),
        "path": dg.MetadataValue.path(str(batch_dir / QUARANTINE_FILE)),
    })


def earlier_key_index(instance: dg.DagsterInstance, layout, key: str) -> KeyIndex:
    """The key index of every batch registered before `key` whose gate passed: a row seen there is a
    cross-batch duplicate. A rejected batch's rows never reach a trainer, so a later batch may bring
    them. Only the batches' key files are read (8 bytes a row, by the lookup query), never their rows."""
    earlier = instance.get_dynamic_partitions(feedback_batches.name)
    earlier = earlier[:earlier.index(key)] if key in earlier else earlier
    files = [ensure_keys(layout.batch_dir(batch), ACCEPTED_FILE)
             for batch, passed in gate_verdicts(instance, earlier).items()
             if passed and (layout.batch_dir(batch) / ACCEPTED_FILE).exists()]
    return KeyIndex(files)


@dg.asset_check(asset="validated_feedback", blocking=True, partitions_def=feedback_batches,
                description="The Great Expectations suite on the accepted rows, plus the batch's quarantine rate.")
def validated_feedback_expectations(context: dg.AssetCheckExecutionContext,
                                    storage: StorageResource) -> dg.AssetCheckResult:
    """The batch gate: the GX suite on the accepted rows (`run_expectation_suite_on_file`: streamed in large
    chunks, reading only the columns the suite checks; uniqueness over the whole batch from its key file),
    with the rules and quarantine counts the validation recorded in the batch's summary. Its recorded verdict is what admits the batch to
    the training datasets (`gate_verdicts`); the summary's own `suite_success` is not consulted."""
    batch_dir = storage.layout.batch_dir(context.partition_key)
    summary = json.loads((batch_dir / SUMMARY_FILE).read_text())
    keys = batch_dir / KEYS_FILE
    report = run_expectation_suite_on_file(batch_dir / ACCEPTED_FILE, ValidationRules(**summary["rules"]),
                                           quarantined_count=defect_count(summary["by_reason"]),
                                           keys_path=keys if keys.exists() else None)
    return dg.AssetCheckResult(passed=report.success, metadata={
        "expectations": dg.MetadataValue.md(report.markdown()),
        "failed": [r["expectation"] for r in report.results if not r["success"]],
        "kind": summary["kind"],
    })


_VERDICTS = {AssetCheckExecutionRecordStatus.SUCCEEDED: True, AssetCheckExecutionRecordStatus.FAILED: False}


def gate_verdicts(instance: dg.DagsterInstance, keys: list[str] | None = None) -> dict[str, bool | None]:
    """The blocking check's verdict on each batch (all registered batches by default, in registration
    order), as recorded in the instance: True passed, False failed, None no verdict on the batch's
    current rows (not validated yet, the check still running or not run, or the batch validated
    again since). One query for all batches."""
    keys = instance.get_dynamic_partitions(feedback_batches.name) if keys is None else list(keys)
    if not keys:
        return {}
    infos = instance.event_log_storage.get_asset_check_partition_info(
        [validated_feedback_expectations.check_key], partition_keys=keys)
    latest = {info.partition_key: info for info in infos}
    verdicts: dict[str, bool | None] = {}
    for key in keys:
        info = latest.get(key)
        if info is None or not info.is_current or info.latest_execution_status not in _VERDICTS:
            verdicts[key] = None
        else:
            verdicts[key] = _VERDICTS[info.latest_execution_status]
    return verdicts


def _sample_markdown(samples: list[dict]) -> str:
    if not samples:
        return "No rows quarantined."
    lines = ["| row | reason | detail |", "|---|---|---|"]
    for record in samples:
        detail = str(record.get("detail", "")).replace("|", "\\|").replace("\n", " ")[:120]
        lines.append(f"| {record.get('row')} | {record.get('reason')} | {detail} |")
    return "\n".join(lines)


@dg.sensor(
    target=[raw_feedback, validate_feedback_batch],
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Registers each new, complete inbox file as a feedback batch and ingests it.",
)
def feedback_inbox_sensor(context: dg.SensorEvaluationContext, storage: StorageResource) -> dg.SensorResult:
    """Idempotent: content already ingested (under any file name) is never a second batch, unless that
    batch lost its source (its run failed before the raw copy was made): then a file with that content
    dropped again is ingested again.

    Files still being written (a `.part` suffix, or changed since the last tick) wait; the cursor
    remembers sizes and hashes so unchanged files are not re-hashed every tick, and how far a large file's
    hashing got (a tick hashes for a bounded time). Entries that are not regular files (links, FIFOs,
    directories) or cannot be read are passed over: logged, and listed in the cursor as `skipped`.
    """
    previous = json.loads(context.cursor)["seen"] if context.cursor else {}
    layout = storage.layout
    scan = scan_inbox(layout.inbox, previous=previous)
    if scan.skipped:
        context.log.warning(f"inbox entries passed over: {scan.skipped}")
    registered = context.instance.get_dynamic_partitions(feedback_batches.name)
    known_hashes = {content_hash_of(k): k for k in registered}
    registered = set(registered)
    new_keys, requests, duplicates = [], [], []
    for inbox_file in scan.ready:
        key, digest = inbox_file.key, content_hash_of(inbox_file.key)
        earlier = known_hashes.get(digest)
        retry = earlier is not None and _lost_source_run(context.instance, layout, earlier)
        if earlier is not None and not retry:
            duplicates.append(inbox_file.path.name)
            continue
        known_hashes[digest] = key
        if key not in registered:
            new_keys.append(key)
        requests.append(dg.RunRequest(partition_key=key, run_key=f"{key}:after:{retry}" if retry else key))
    cursor = json.dumps({"seen": scan.seen, "skipped": scan.skipped})
    if not requests:
        return dg.SensorResult(cursor=cursor, skip_reason=(
            f"no new feedback: {len(scan.ready)} file(s) already ingested, "
            f"{len(scan.still_writing)} still being written, {len(scan.hashing)} still being hashed, "
            f"{len(scan.skipped)} passed over" + (f" ({'; '.join(scan.skipped)})" if scan.skipped else "")))
    if duplicates:
        context.log.info(f"skipped files whose content is already a batch: {duplicates}")
    return dg.SensorResult(
        cursor=cursor,
        run_requests=requests,
        dynamic_partitions_requests=[feedback_batches.build_add_request(new_keys)] if new_keys else [],
    )


def _lost_source_run(instance: dg.DagsterInstance, layout, key: str) -> str | None:
    """The id of the failed run of batch `key` that left no raw copy (its inbox file was gone or changed when
    the run came), if that is the batch's last run: its content, dropped again, is to be ingested again."""
    if any(layout.batch_dir(key).glob(f"{RAW_FILE}.*")):
        return None
    runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/partition": key}), limit=1)
    if runs and runs[0].status in (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED):
        return runs[0].run_id
    return None
