"""The feedback inbox: files dropped in a folder become immutable, content-addressed batches."""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from pathlib import Path

FEEDBACK_SUFFIXES = tuple(f"{ext}{gz}" for ext in (".jsonl", ".json", ".csv", ".parquet") for gz in ("", ".gz"))
# Files still being written carry one of these suffixes and are skipped until renamed.
IN_PROGRESS_SUFFIXES = (".part", ".tmp", ".partial", ".crdownload")
SETTLE_SECONDS = 5.0  # a file unchanged this long (or across two scans) is complete


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def batch_key(path: Path, digest: str | None = None) -> str:
    """`<file name>-<first 12 hex of sha256>`: the partition key of the batch."""
    return f"{_safe_name(path.name)}-{(digest or file_digest(path))[:12]}"


def content_hash_of(key: str) -> str:
    return key.rpartition("-")[2]


@dataclass(frozen=True)
class InboxFile:
    path: Path
    key: str


@dataclass
class InboxScan:
    ready: list[InboxFile]  # complete files, oldest first
    still_writing: list[str]  # names skipped this time: in-progress suffix, or changed since the last scan
    seen: dict[str, list]  # name -> [size, mtime_ns, key or None]: the next scan's memory (sensor cursor)


def scan_inbox(inbox: Path, previous: dict[str, list] | None = None, now: float | None = None,
               settle_seconds: float = SETTLE_SECONDS) -> InboxScan:
    """Feedback files that are complete: not `.part`, and not changed since the previous scan
    (or not touched for `settle_seconds`). Keys of unchanged files are reused, not re-hashed."""
    previous = previous or {}
    now = time.time() if now is None else now
    ready, writing, seen = [], [], {}
    if not inbox.is_dir():
        return InboxScan(ready, writing, seen)
    candidates = []
    for path in inbox.iterdir():
        if not path.is_file() or path.name.startswith("."):
            continue
        if path.name.endswith(IN_PROGRESS_SUFFIXES):
            writing.append(path.name)
            continue
        if path.name.lower().endswith(FEEDBACK_SUFFIXES):
            candidates.append(path)
    for path in sorted(candidates, key=lambda p: (p.stat().st_mtime_ns, p.name)):
        stat = path.stat()
        before = previous.get(path.name)
        unchanged = before is not None and before[:2] == [stat.st_size, stat.st_mtime_ns]
        if not unchanged and now - stat.st_mtime < settle_seconds:
            seen[path.name] = [stat.st_size, stat.st_mtime_ns, None]
            writing.append(path.name)
            continue
        key = before[2] if unchanged and before[2] else batch_key(path)
        seen[path.name] = [stat.st_size, stat.st_mtime_ns, key]
        ready.append(InboxFile(path=path, key=key))
    return InboxScan(ready, writing, seen)


def find_batch_file(inbox: Path, key: str) -> Path:
    """The inbox file whose content matches `key`; a clear error if it was changed or removed."""
    name, _, short_hash = key.rpartition("-")
    for candidate in inbox.glob("*"):
        if candidate.is_file() and _safe_name(candidate.name) == name:
            if file_digest(candidate)[:12] == short_hash:
                return candidate
    raise FileNotFoundError(
        f"batch {key!r}: no file named {name!r} with content hash {short_hash} in {inbox}; "
        "a batch is immutable, so a file that changed after it was registered is a new batch"
    )
