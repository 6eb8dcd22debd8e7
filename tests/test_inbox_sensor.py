"""The inbox sensor, evaluated as Dagster evaluates it: idempotent, patient with partial files, burst-proof."""

from __future__ import annotations

import json
import os
import time

import dagster as dg

from alignment_pipelines.data.demo import demo_feedback_path
from alignment_pipelines.definitions import build_resources
from alignment_pipelines.runs import sense_inbox
from alignment_pipelines.assets.ingestion import feedback_batches

ROWS = demo_feedback_path().read_text().splitlines()


def _drop(inbox, name, rows, age_seconds=60.0):
    path = inbox / name
    path.write_text("\n".join(rows) + "\n")
    stamp = time.time() - age_seconds
    os.utime(path, (stamp, stamp))
    return path


class Inbox:
    """Runs the sensor tick after tick with its cursor, as the daemon does."""

    def __init__(self, instance, root):
        self.instance, self.cursor = instance, None
        self.resources = build_resources(data_root=root, base_model="tiny-random")
        self.path = self.resources["storage"].layout.inbox

    def tick(self):
        result = sense_inbox(self.instance, self.resources, cursor=self.cursor)
        self.cursor = result.cursor
        return [r.partition_key for r in result.run_requests or []]


def test_same_content_twice_is_one_batch(tmp_path):
    with dg.instance_for_test() as instance:
        inbox = Inbox(instance, tmp_path)
        _drop(inbox.path, "a.jsonl", ROWS[:5])
        [key] = inbox.tick()
        assert key.startswith("a.jsonl-")
        assert inbox.tick() == []  # the same file on the next tick
        _drop(inbox.path, "a (copy).jsonl", ROWS[:5])
        assert inbox.tick() == []  # the same content under another name
        assert instance.get_dynamic_partitions(feedback_batches.name) == [key]
        inbox.cursor = None  # even with the cursor lost, the instance's partitions keep it idempotent
        assert inbox.tick() == []


def test_files_still_being_written_wait(tmp_path):
    with dg.instance_for_test() as instance:
        inbox = Inbox(instance, tmp_path)
        _drop(inbox.path, "big.jsonl.part", ROWS[:3])
        growing = _drop(inbox.path, "growing.jsonl", ROWS[:3], age_seconds=0)
        assert inbox.tick() == []  # .part is skipped; a fresh file waits one tick
        with open(growing, "a") as handle:
            handle.write(ROWS[3] + "\n")
        assert inbox.tick() == []  # it changed since the last tick: still being written
        [key] = inbox.tick()  # unchanged across two ticks: complete
        assert key.startswith("growing.jsonl-")
        os.rename(inbox.path / "big.jsonl.part", inbox.path / "big.jsonl")
        stamp = time.time() - 60
        os.utime(inbox.path / "big.jsonl", (stamp, stamp))
        [renamed] = inbox.tick()
        assert renamed.startswith("big.jsonl-")
        assert json.loads(inbox.cursor)["seen"]["growing.jsonl"][2] == key  # remembered, not re-hashed


def test_a_burst_of_files_is_one_tick(tmp_path):
    with dg.instance_for_test() as instance:
        inbox = Inbox(instance, tmp_path)
        for i in range(25):
            _drop(inbox.path, f"burst-{i:02d}.jsonl", ROWS[i * 2:i * 2 + 2])
        keys = inbox.tick()
        assert len(keys) == len(set(keys)) == 25
        assert sorted(instance.get_dynamic_partitions(feedback_batches.name)) == sorted(keys)
        assert inbox.tick() == []
