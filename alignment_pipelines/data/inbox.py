"""The feedback inbox: files dropped in a folder become immutable, content-addressed batches."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

FEEDBACK_SUFFIXES = (".jsonl", ".jsonl.gz")
# Files still being written carry one of these suffixes and are skipped until renamed.
IN_PROGRESS_SUFFIXES = (".part", ".tmp", ".partial")


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def batch_key(path: Path) -> str:
    """`<file name>-<first 12 hex of sha256>`: the same content dropped twice is one batch."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", path.name)
    return f"{name}-{file_digest(path)[:12]}"


@dataclass(frozen=True)
class InboxFile:
    path: Path
    key: str


def scan_inbox(inbox: Path) -> list[InboxFile]:
    """Feedback files ready to ingest, oldest first (name breaks ties, so order is stable)."""
    if not inbox.is_dir():
        return []
    ready = [
        path for path in inbox.iterdir()
        if path.is_file()
        and not path.name.startswith(".")
        and not path.name.endswith(IN_PROGRESS_SUFFIXES)
        and path.name.endswith(FEEDBACK_SUFFIXES)
    ]
    ready.sort(key=lambda p: (p.stat().st_mtime, p.name))
    return [InboxFile(path=path, key=batch_key(path)) for path in ready]


def find_batch_file(inbox: Path, key: str) -> Path:
    """The inbox file whose content matches `key`; a clear error if it was changed or removed."""
    name, _, short_hash = key.rpartition("-")
    for candidate in inbox.glob("*"):
        if candidate.is_file() and re.sub(r"[^A-Za-z0-9_.-]", "_", candidate.name) == name:
            if file_digest(candidate)[:12] == short_hash:
                return candidate
    raise FileNotFoundError(
        f"batch {key!r}: no file named {name!r} with content hash {short_hash} in {inbox}; "
        "a batch is immutable, so a file that changed after it was registered is a new batch"
    )
