"""A hostile inbox is survived: each entry judged on its own, caps on what a file may cost, a raw copy that is
whole and of the key's content, lost batches dropped again, and `submit` that never overwrites."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignment_pipelines.assets.ingestion import SUMMARY_FILE
from alignment_pipelines.cli import main
from alignment_pipelines.data.ingest import inbox as inbox_module
from alignment_pipelines.data.ingest import jsonl_fast
from alignment_pipelines.data.validate import engine as validation
from alignment_pipelines.data.demo import demo_feedback_path
from alignment_pipelines.data.ingest.formats import FeedbackFileError
from alignment_pipelines.data.ingest.inbox import batch_key, scan_inbox
from alignment_pipelines.data.validate.engine import validate_file_to_parquet
from alignment_pipelines.data.validate.rules import ValidationRules
from alignment_pipelines.definitions import build_resources
from alignment_pipelines.runs import ingest_batch, sense_inbox

ROWS = demo_feedback_path().read_text().splitlines()
NO_TOKENS = {"ops": {"validate_feedback_batch": {"config": {"measure_tokens": False}}}}
GIB = 1 << 30


def _settled(path: Path) -> Path:
    stamp = time.time() - 60
    os.utime(path, (stamp, stamp), follow_symlinks=False)
    return path


def _drop(inbox: Path, name: str, rows: list[str]) -> Path:
    path = inbox / name
    path.write_text("\n".join(rows) + "\n")
    return _settled(path)


def _summary(layout, key: str) -> dict:
    return json.loads((layout.batch_dir(key) / SUMMARY_FILE).read_text())


# --------------------------------------------------------------------------- entries judged one by one


def test_links_fifos_and_directories_are_passed_over_and_the_good_file_ingested(tmp_path):
    resources = build_resources(data_root=tmp_path / "root", base_model="tiny-random")
    layout = resources["storage"].layout
    secret = tmp_path / "environ"
    secret.write_text('{"prompt": "SECRET_TOKEN=hunter2", "chosen": "a", "rejected": "b"}\n')
    _drop(layout.inbox, "good.jsonl", ROWS[:5])
    (layout.inbox / "secret.jsonl").symlink_to(secret)  # x.jsonl -> /proc/1/environ, in the review
    (layout.inbox / "dangling.jsonl").symlink_to(tmp_path / "gone")
    os.mkfifo(layout.inbox / "pipe.jsonl")  # opening it for reading would block the tick
    (layout.inbox / "folder.jsonl").mkdir()
    with dg.instance_for_test() as instance:
        result = sense_inbox(instance, resources)
        [key] = [r.partition_key for r in result.run_requests]
        assert key.startswith("good.jsonl-")
        skipped = json.loads(result.cursor)["skipped"]
        assert sorted(skipped) == ["dangling.jsonl: a symbolic link (refused: only regular files are ingested)",
                                   "folder.jsonl: a directory", "pipe.jsonl: a FIFO",
                                   "secret.jsonl: a symbolic link (refused: only regular files are ingested)"]
        assert ingest_batch(instance, resources, key, run_config=NO_TOKENS).success
        assert _summary(layout, key)["accepted"] == 5
        later = sense_inbox(instance, resources, cursor=result.cursor)
        message = later.skip_reason.skip_message
        assert not later.run_requests and "4 passed over" in message and "pipe.jsonl: a FIFO" in message
    copied = b"".join(p.read_bytes() for p in (tmp_path / "root").rglob("*") if p.is_file() and not p.is_symlink())
    assert b"hunter2" not in copied  # the link's target reached no batch, quarantine or cursor


_SENSOR_AS_ANOTHER_USER = textwrap.dedent("""
    import json, sys
    import dagster as dg
    from alignment_pipelines.definitions import build_resources
    from alignment_pipelines.runs import sense_inbox
    resources = build_resources(data_root=sys.argv[1], base_model="tiny-random")
    with dg.DagsterInstance.local_temp(sys.argv[2]) as instance:
        result = sense_inbox(instance, resources)
    print(json.dumps({"keys": [r.partition_key for r in result.run_requests],
                      "skipped": json.loads(result.cursor)["skipped"]}))
""")


def test_an_unreadable_file_is_passed_over_and_the_good_file_ingested(tmp_path):
    """The review's 0600 file of another uid: this process (root in CI) reads anything, so the sensor's tick
    runs in a child without the capabilities that let root read other users' files (`setpriv`), as the
    daemon of a deployment that is not root would; the batch it registers is then ingested here."""
    root, home = tmp_path / "root", tmp_path / "dagster_home"
    home.mkdir()
    resources = build_resources(data_root=root, base_model="tiny-random")
    inbox = resources["storage"].layout.inbox
    _drop(inbox, "good.jsonl", ROWS[:5])
    locked = _drop(inbox, "locked.jsonl", ROWS[5:10])
    os.chmod(locked, 0o600)
    command = [sys.executable, "-c", _SENSOR_AS_ANOTHER_USER, str(root), str(home)]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: no way to make a file unreadable to the sensor")
        os.chown(locked, 65534, 65534)
        command = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", *command]
    else:
        os.chmod(locked, 0)
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    tick = json.loads(done.stdout.strip().splitlines()[-1])
    [key] = tick["keys"]
    assert key.startswith("good.jsonl-")
    assert tick["skipped"] == ["locked.jsonl: unreadable (Permission denied)"]
    with dg.DagsterInstance.local_temp(str(home)) as instance:
        assert instance.get_dynamic_partitions("feedback_batches") == [key]
        assert ingest_batch(instance, resources, key, run_config=NO_TOKENS).success
    assert _summary(resources["storage"].layout, key)["accepted"] == 5


def test_a_large_drop_is_hashed_over_several_scans(tmp_path, monkeypatch):
    """Hashing is bounded per scan: with no time to spare each scan hashes one piece, remembered in the cursor."""
    monkeypatch.setattr(inbox_module, "PIECE_BYTES", 1024)
    big = tmp_path / "big.jsonl"
    big.write_bytes(b"x" * 3500)
    _settled(big)
    small = tmp_path / "small.jsonl"
    small.write_text("{}\n")
    os.utime(small, (time.time() - 30, time.time() - 30))  # newer than big: hashed after it
    seen, progress = None, []
    for _ in range(4):
        scan = scan_inbox(tmp_path, previous=seen, budget_seconds=0)
        seen = json.loads(json.dumps(scan.seen))  # through the cursor's JSON
        progress.append(([f.path.name for f in scan.ready], scan.hashing, len(seen["big.jsonl"][3])))
    assert progress == [([], ["big.jsonl", "small.jsonl"], 1), ([], ["big.jsonl", "small.jsonl"], 2),
                        ([], ["big.jsonl", "small.jsonl"], 3), (["big.jsonl"], ["small.jsonl"], 0)]
    assert scan.ready[0].key == batch_key(big)  # the same key as hashing it in one go
    [small_file] = scan_inbox(tmp_path, previous=seen, budget_seconds=0).ready[1:]
    assert small_file.key == batch_key(small)


# --------------------------------------------------------------------------- the raw copy


def test_a_copy_cut_short_is_replaced_and_the_batch_keeps_every_row(tmp_path):
    """A kill mid-copy left a truncated copy (the old copy's name) and a partial temporary one: the retry
    checks what is there against the key, copies again and ingests every row."""
    resources = build_resources(data_root=tmp_path, base_model="tiny-random")
    layout = resources["storage"].layout
    source = _drop(layout.inbox, "feedback.jsonl", ROWS[:40])
    with dg.instance_for_test() as instance:
        [request] = sense_inbox(instance, resources).run_requests
        key = request.partition_key
        batch_dir = layout.batch_dir(key)
        batch_dir.mkdir(parents=True)
        half = source.read_bytes()[: source.stat().st_size // 2]
        (batch_dir / "raw.jsonl").write_bytes(half)
        (batch_dir / ".raw.jsonl.partial").write_bytes(half[:100])
        assert ingest_batch(instance, resources, key, run_config=NO_TOKENS).success
        assert (batch_dir / "raw.jsonl").read_bytes() == source.read_bytes()
        assert not (batch_dir / ".raw.jsonl.partial").exists()
        summary = _summary(layout, key)
        assert summary["rows"] == 40 and summary["accepted"] + summary["quarantined"] == 40


def test_a_file_rewritten_after_it_was_hashed_is_not_copied_under_its_key(tmp_path):
    resources = build_resources(data_root=tmp_path, base_model="tiny-random")
    layout = resources["storage"].layout
    source = _drop(layout.inbox, "feedback.jsonl", ROWS[:10])
    with dg.instance_for_test() as instance:
        [request] = sense_inbox(instance, resources).run_requests
        source.write_text("\n".join(ROWS[10:20]) + "\n")
        result = ingest_batch(instance, resources, request.partition_key, raise_on_error=False)
        assert not result.success
        [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
        assert "no file named 'feedback.jsonl' with content hash" in failure.event_specific_data.error.to_string()
        assert not list(layout.batch_dir(request.partition_key).iterdir())  # no copy, not even a partial one


def test_a_batch_whose_source_vanished_can_be_dropped_again(tmp_path):
    resources = build_resources(data_root=tmp_path, base_model="tiny-random")
    layout = resources["storage"].layout
    source = _drop(layout.inbox, "feedback.jsonl", ROWS[:10])
    kept = source.read_bytes()
    with dg.instance_for_test() as instance:
        result = sense_inbox(instance, resources)
        [key] = [r.partition_key for r in result.run_requests]
        source.unlink()  # gone before its run
        assert not ingest_batch(instance, resources, key, run_config=NO_TOKENS, raise_on_error=False).success
        source.write_bytes(kept)
        _settled(source)
        again = sense_inbox(instance, resources, cursor=result.cursor)
        [retry] = again.run_requests
        assert retry.partition_key == key and retry.run_key != key  # a new run of the same batch
        assert instance.get_dynamic_partitions("feedback_batches") == [key]
        assert ingest_batch(instance, resources, key, run_config=NO_TOKENS).success
        assert _summary(layout, key)["accepted"] == 10
        assert not sense_inbox(instance, resources, cursor=again.cursor).run_requests  # copied now: known


def test_submit_refuses_to_overwrite(tmp_path, capsys):
    inbox = tmp_path / "inbox"
    first = tmp_path / "a" / "feedback.jsonl"
    second = tmp_path / "b" / "feedback.jsonl"
    for path, rows in ((first, ROWS[:3]), (second, ROWS[3:6])):
        path.parent.mkdir()
        path.write_text("\n".join(rows) + "\n")
    assert main(["submit", str(first), "--inbox", str(inbox)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["batch_key"] == batch_key(inbox / "feedback.jsonl")
    assert main(["submit", str(second), "--inbox", str(inbox)]) == 1  # one line, no traceback
    assert "already exists; a batch is immutable" in capsys.readouterr().err
    assert (inbox / "feedback.jsonl").read_bytes() == first.read_bytes()
    assert sorted(p.name for p in inbox.iterdir()) == ["feedback.jsonl"]  # no temporary file left


# --------------------------------------------------------------------------- caps


def _gzip_bomb(path: Path, head: bytes, filler: bytes, inflated: int) -> Path:
    """`head` and then `filler` repeated up to `inflated` bytes, gzipped as one member of 1 MiB repeated: a
    thousandth of `inflated` on disk for a run of one byte (deflate's ratio tops out near 1,000:1)."""
    block = (filler * ((1 << 20) // len(filler) + 1))[: 1 << 20]
    member = gzip.compress(block, compresslevel=9)
    with open(path, "wb") as out:
        out.write(gzip.compress(head))
        for _ in range(inflated // len(block)):
            out.write(member)
    return path


_VALIDATE_AND_MEASURE = textwrap.dedent("""
    import json, sys
    from alignment_pipelines.data.validate.engine import validate_file_to_parquet
    try:
        summary = validate_file_to_parquet(sys.argv[1], sys.argv[2] + "/a.parquet", sys.argv[2] + "/q.parquet")
        outcome = {"rows": summary["rows"], "accepted": summary["accepted"], "by_reason": summary["by_reason"]}
    except Exception as exc:
        outcome = {"error": f"{type(exc).__name__}: {exc}"}
    # VmHWM: this process image's own peak. ru_maxrss is not: Linux carries the peak of the memory an exec
    # replaced into it, and a vforked child's was the parent's (a test process grown past 1 GB by earlier tests).
    status = open("/proc/self/status").read()
    outcome["peak_rss_bytes"] = int(status.split("VmHWM:")[1].split()[0]) * 1024
    print(json.dumps(outcome))
""")


def _validate_in_child(path: Path, out: Path, **caps: int) -> dict:
    """`validate_file_to_parquet` in a fresh process, which reports its own peak RSS (VmHWM)."""
    out.mkdir(exist_ok=True)
    env = {**os.environ, **{f"ALIGNMENT_PIPELINES_MAX_{k.upper()}_BYTES": str(v) for k, v in caps.items()}}
    done = subprocess.run([sys.executable, "-c", _VALIDATE_AND_MEASURE, str(path), str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_gzip_bombs_end_in_a_clear_outcome_within_bounded_memory(tmp_path):
    """Each inflates to 1 GiB from 1 to 3 MB; each ends in a quarantined row or a batch error naming the cap,
    and no run's peak RSS reaches 1 GB (the review measured 7 bytes of RSS per inflated byte)."""
    one_line = _gzip_bomb(tmp_path / "one_line.jsonl.gz", b'{"prompt": "', b"a", GIB)
    document = _gzip_bomb(tmp_path / "document.json.gz", b'[{"prompt": "', b"a", GIB)
    many_lines = _gzip_bomb(tmp_path / "many_lines.jsonl.gz", b"",
                            json.dumps({"prompt": "q" * 1000, "chosen": "a", "rejected": "b"}).encode() + b"\n", GIB)
    parquet = _gzip_bomb(tmp_path / "table.parquet.gz", b"PAR1", b"\0", GIB)
    assert max(p.stat().st_size for p in (one_line, document, many_lines, parquet)) < 3_000_000

    outcome = _validate_in_child(one_line, tmp_path / "o1")  # default caps: the line is one quarantined row
    assert (outcome["rows"], outcome["accepted"], outcome["by_reason"]) == (1, 0, {"too_long": 1})
    outcome2 = _validate_in_child(document, tmp_path / "o2")  # default caps: read whole only up to the cap
    assert outcome2["error"] == (f"FeedbackFileError: {document}: a JSON document read whole (send JSON Lines "
                                 "instead) exceeds 134,217,728 bytes (cap ALIGNMENT_PIPELINES_MAX_DOCUMENT_BYTES)")
    # streamed lines and a Parquet file inflated to disk cost no memory as they grow: the inflated cap ends them
    outcome3 = _validate_in_child(many_lines, tmp_path / "o3", inflated=64 << 20)
    assert outcome3["error"] == (f"FeedbackFileError: {many_lines}: inflated size exceeds 67,108,864 bytes "
                                 "(cap ALIGNMENT_PIPELINES_MAX_INFLATED_BYTES)")
    outcome4 = _validate_in_child(parquet, tmp_path / "o4", inflated=64 << 20)
    assert outcome4["error"].endswith("inflated size exceeds 67,108,864 bytes (cap ALIGNMENT_PIPELINES_MAX_INFLATED_BYTES)")
    for result in (outcome, outcome2, outcome3, outcome4):
        assert result["peak_rss_bytes"] < 1_000_000_000, result


def test_a_parquet_row_group_over_the_document_cap_is_a_batch_error(tmp_path, monkeypatch):
    path = tmp_path / "big.parquet.gz"
    table = pa.table({"prompt": [f"{i} " + "p" * 300_000 for i in range(4)], "chosen": ["a"] * 4, "rejected": ["b"] * 4})
    pq.write_table(table, tmp_path / "big.parquet", compression="zstd")
    path.write_bytes(gzip.compress((tmp_path / "big.parquet").read_bytes()))
    monkeypatch.setenv("ALIGNMENT_PIPELINES_MAX_DOCUMENT_BYTES", str(1 << 20))
    with pytest.raises(FeedbackFileError, match=r"Parquet row group 0 \(uncompressed\) exceeds 1,048,576 bytes "
                                                r"\(cap ALIGNMENT_PIPELINES_MAX_DOCUMENT_BYTES\)"):
        validate_file_to_parquet(path, tmp_path / "a.parquet", tmp_path / "q.parquet")
    assert not (tmp_path / "a.parquet").exists()


@pytest.mark.parametrize("reader", ["fast", "workers", "importer", "gzip", "fast, small blocks", "workers, small blocks"])
def test_a_line_over_the_cap_is_that_rows_quarantine_reason(tmp_path, monkeypatch, reader):
    """Read whole within a block and found over the cap, or (small blocks) read past without being held."""
    monkeypatch.setenv("ALIGNMENT_PIPELINES_MAX_LINE_BYTES", "4096")
    if reader.endswith("small blocks"):
        monkeypatch.setattr(jsonl_fast, "BLOCK_BYTES", 8192)
    long_row = json.dumps({"prompt": "q" * 100_000, "chosen": "a", "rejected": "b"})
    lines = ROWS[:3] + [long_row] + ROWS[3:6]
    path = tmp_path / "feedback.jsonl"
    path.write_text("\n".join(lines) + "\n")
    rules, workers = ValidationRules(), 1
    if reader.startswith("workers"):
        monkeypatch.setattr(validation, "PARALLEL_MIN_BYTES", 0)
        workers = 2
    elif reader == "importer":
        rules = ValidationRules(pii="redact")  # screening goes through the row-by-row importer
    elif reader == "gzip":
        path = tmp_path / "feedback.jsonl.gz"
        path.write_bytes(gzip.compress("\n".join(lines).encode()))  # no final newline: the last line ends the file
    summary = validate_file_to_parquet(path, tmp_path / "a.parquet", tmp_path / "q.parquet", rules, workers=workers,
                                       chunk_rows=2)
    assert (summary["rows"], summary["accepted"], summary["by_reason"]) == (7, 6, {"too_long": 1})
    [quarantined] = pq.read_table(tmp_path / "q.parquet").to_pylist()
    assert quarantined["row"] == 4
    assert quarantined["detail"] == (f"line is {len(long_row) + 1:,} bytes, over the cap of 4,096 "
                                     "(ALIGNMENT_PIPELINES_MAX_LINE_BYTES)")
    assert quarantined["raw"].startswith('{"prompt": "qqq')
    accepted = pq.read_table(tmp_path / "a.parquet").column("row").to_pylist()
    assert accepted == [1, 2, 3, 5, 6, 7]


def test_a_csv_line_over_the_cap_is_a_batch_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNMENT_PIPELINES_MAX_LINE_BYTES", "4096")
    path = tmp_path / "feedback.csv"
    path.write_text("prompt,chosen,rejected\nq,a,b\n" + "q" * 10_000 + ",a,b\n")
    with pytest.raises(FeedbackFileError, match=r"line 3 exceeds 4,096 bytes \(cap ALIGNMENT_PIPELINES_MAX_LINE_BYTES\)"):
        validate_file_to_parquet(path, tmp_path / "a.parquet", tmp_path / "q.parquet")


def test_validate_reports_a_file_over_a_cap_without_a_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ALIGNMENT_PIPELINES_MAX_DOCUMENT_BYTES", "1000")
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([json.loads(r) for r in ROWS[:20]]))
    assert main(["validate", str(path)]) == 1  # the file fails; usage errors are 2
    err = capsys.readouterr().err
    assert err.startswith(f"alignment-pipelines validate: {path}: a JSON document read whole") and "Traceback" not in err
