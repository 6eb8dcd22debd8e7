"""The feedback inbox: files dropped in a folder become immutable, content-addressed batches.

The inbox is untrusted: every entry is looked at on its own, with `lstat` (a symbolic link is refused, never
followed; a directory, FIFO or device is not a file), opened without following links and without blocking,
and an entry that cannot be read or vanishes is reported and passed over: it never fails the scan. Hashing is
done under a time budget per scan, a piece at a time, so a large drop is hashed over several sensor ticks
instead of timing one out.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

FEEDBACK_SUFFIXES = tuple(f"{ext}{gz}" for ext in (".jsonl", ".json", ".csv", ".parquet") for gz in ("", ".gz"))
# Files still being written carry one of these suffixes and are skipped until renamed.
IN_PROGRESS_SUFFIXES = (".part", ".tmp", ".partial", ".crdownload")
SETTLE_SECONDS = 5.0  # a file unchanged this long (or across two scans) is complete
HASH_BUDGET_SECONDS = 15.0  # hashing per scan: well inside the sensor's 60 s evaluation limit
PIECE_BYTES = 64 << 20  # a large file is hashed piece by piece: a scan that runs out of time resumes there
_READ_BYTES = 1 << 20


class ContentHash:
    """The content hash of a batch: sha256 of the bytes when they fit one piece, else sha256 of the pieces'
    sha256 digests (a piece is PIECE_BYTES), so that hashing a large file can stop after any piece and resume."""

    def __init__(self, pieces: list[str] | None = None):
        self.pieces = list(pieces or [])  # hex digests of the whole pieces before the current one
        self.current = hashlib.sha256()
        self.filled = 0  # bytes in the current piece

    def update(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while len(view):
            if self.filled == PIECE_BYTES:  # full, and more follows: close it
                self.pieces.append(self.current.hexdigest())
                self.current, self.filled = hashlib.sha256(), 0
            take = min(len(view), PIECE_BYTES - self.filled)
            self.current.update(view[:take])
            self.filled += take
            view = view[take:]

    def hexdigest(self) -> str:
        if not self.pieces:
            return self.current.hexdigest()
        return hashlib.sha256(b"".join(bytes.fromhex(p) for p in [*self.pieces, self.current.hexdigest()])).hexdigest()


def open_regular(path: Path) -> tuple[int, os.stat_result]:
    """A file descriptor for reading `path`, which must be a regular file itself: a symbolic link is refused
    (O_NOFOLLOW), a FIFO does not block the open (O_NONBLOCK) and is refused with the other special files."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"{path}: not a regular file")
        os.set_blocking(fd, True)
        return fd, info
    except BaseException:
        os.close(fd)
        raise


def _chunks(fd: int, limit: int | None = None) -> Iterator[bytes]:
    """The bytes of an open file from its current position (at most `limit`), 1 MiB at a time."""
    left = limit
    while left is None or left > 0:
        data = os.read(fd, _READ_BYTES if left is None else min(_READ_BYTES, left))
        if not data:
            return
        if left is not None:
            left -= len(data)
        yield data


def file_digest(path: Path) -> str:
    """The content hash of a regular file (`ContentHash`), read without following a link."""
    fd, _ = open_regular(path)
    try:
        digest = ContentHash()
        for data in _chunks(fd):
            digest.update(data)
        return digest.hexdigest()
    finally:
        os.close(fd)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def batch_key(path: Path, digest: str | None = None) -> str:
    """`<file name>-<first 12 hex of the content hash>`: the partition key of the batch."""
    return f"{_safe_name(path.name)}-{(digest or file_digest(path))[:12]}"


def content_hash_of(key: str) -> str:
    return key.rpartition("-")[2]


def _kind_of(mode: int) -> str | None:
    """Why an entry is not ingested (None: a regular file)."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISLNK(mode):
        return "a symbolic link (refused: only regular files are ingested)"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


@dataclass(frozen=True)
class InboxFile:
    path: Path
    key: str


@dataclass
class InboxScan:
    ready: list[InboxFile]  # complete files, oldest first
    still_writing: list[str]  # names skipped this time: in-progress suffix, or changed since the last scan
    seen: dict[str, list]  # name -> [size, mtime_ns, key or None, pieces hashed]: the next scan's memory (sensor cursor)
    skipped: list[str] = field(default_factory=list)  # "name: why" for entries passed over (links, special, unreadable)
    hashing: list[str] = field(default_factory=list)  # complete files whose hashing goes on at the next scan


class _Budget:
    """A scan's time for hashing: spent once its deadline passes, but never before one piece was hashed
    (so that every scan makes progress)."""

    def __init__(self, seconds: float):
        self.deadline, self.used = time.monotonic() + seconds, False

    def left(self) -> bool:
        return not self.used or time.monotonic() <= self.deadline


def _hash_within(path: Path, info: os.stat_result, pieces: list[str], budget: _Budget) -> tuple[list[str], str | None]:
    """Hash `path` from the piece after `pieces` (the digests of those done) while the budget lasts:
    (pieces done, the content hash, or None when time ran out first). The file must still be the one
    `info` describes."""
    fd, now = open_regular(path)
    try:
        if (now.st_ino, now.st_size, now.st_mtime_ns) != (info.st_ino, info.st_size, info.st_mtime_ns):
            raise OSError(f"{path}: changed while being scanned")
        total = max(1, -(-info.st_size // PIECE_BYTES))
        pieces = pieces[: total - 1]
        os.lseek(fd, len(pieces) * PIECE_BYTES, os.SEEK_SET)
        while budget.left():
            budget.used = True
            if len(pieces) == total - 1:  # the last piece
                digest = ContentHash(pieces)
                for data in _chunks(fd):
                    digest.update(data)
                return pieces, digest.hexdigest()
            piece = hashlib.sha256()
            for data in _chunks(fd, PIECE_BYTES):
                piece.update(data)
            pieces.append(piece.hexdigest())
        return pieces, None
    finally:
        os.close(fd)


def scan_inbox(inbox: Path, previous: dict[str, list] | None = None, now: float | None = None,
               settle_seconds: float = SETTLE_SECONDS, budget_seconds: float = HASH_BUDGET_SECONDS) -> InboxScan:
    """Feedback files that are complete: not `.part`, and not changed since the previous scan
    (or not touched for `settle_seconds`). Keys of unchanged files are reused, not re-hashed; new files are
    hashed oldest first for at most `budget_seconds` (the rest go on at the next scan, from the piece reached).
    An entry that is not a regular file, or that cannot be read, is in `skipped` and never fails the scan."""
    previous = previous or {}
    now = time.time() if now is None else now
    scan = InboxScan([], [], {})
    if not inbox.is_dir():
        return scan
    candidates = []
    for entry in sorted(os.scandir(inbox), key=lambda e: e.name):
        name = entry.name
        lowered = name.lower()
        if name.startswith(".") or not lowered.endswith(FEEDBACK_SUFFIXES + IN_PROGRESS_SUFFIXES):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError as exc:
            scan.skipped.append(f"{name}: vanished ({exc.strerror})")
            continue
        why = _kind_of(info.st_mode)
        if why:
            scan.skipped.append(f"{name}: {why}")
        elif lowered.endswith(IN_PROGRESS_SUFFIXES):
            scan.still_writing.append(name)
        else:
            candidates.append((info, Path(entry.path)))
    budget = _Budget(budget_seconds)
    for info, path in sorted(candidates, key=lambda c: (c[0].st_mtime_ns, c[1].name)):
        before = previous.get(path.name) or []
        unchanged = before[:2] == [info.st_size, info.st_mtime_ns]
        if not unchanged and now - info.st_mtime < settle_seconds:
            scan.seen[path.name] = [info.st_size, info.st_mtime_ns, None, []]
            scan.still_writing.append(path.name)
            continue
        key = before[2] if unchanged and len(before) > 2 else None
        if key is None:
            done = list(before[3]) if unchanged and len(before) > 3 else []
            try:
                pieces, digest = _hash_within(path, info, done, budget)
            except OSError as exc:
                scan.skipped.append(f"{path.name}: unreadable ({exc.strerror or exc})")
                continue
            if digest is None:
                scan.seen[path.name] = [info.st_size, info.st_mtime_ns, None, pieces]
                scan.hashing.append(path.name)
                continue
            key = batch_key(path, digest)
        scan.seen[path.name] = [info.st_size, info.st_mtime_ns, key, []]
        scan.ready.append(InboxFile(path=path, key=key))
    return scan


def batch_files(inbox: Path, key: str) -> Iterator[Path]:
    """The regular files of the inbox that may hold batch `key`: those with its file name (not yet hashed)."""
    name = key.rpartition("-")[0]
    if not inbox.is_dir():
        return
    for entry in sorted(os.scandir(inbox), key=lambda e: e.name):
        try:
            regular = entry.is_file(follow_symlinks=False)
        except OSError:
            continue
        if regular and _safe_name(entry.name) == name:
            yield Path(entry.path)


def copy_batch_file(inbox: Path, key: str, target_dir: Path, stem: str) -> tuple[Path, Path | None]:
    """The batch's immutable copy in `target_dir` (`<stem><the file's suffixes>`), and the inbox file it came
    from (None when the copy was already there): written under a temporary name while it is hashed, checked against the key, then renamed, so the
    copy is never partial and never of other content than the key's. A copy already there is checked again
    (a stale or truncated one is replaced). A clear FileNotFoundError if no inbox file has the key's content."""
    name, _, short_hash = key.rpartition("-")
    for existing in sorted(target_dir.glob(f"{stem}.*")):
        try:
            if file_digest(existing)[:12] == short_hash:
                return existing, None
        except OSError:
            pass
        existing.unlink()
    for source in batch_files(inbox, key):
        suffix = "".join(source.suffixes[-2:]) if source.name.endswith(".gz") else source.suffix
        target = target_dir / f"{stem}{suffix}"
        partial = target_dir / f".{stem}{suffix}.partial"
        try:
            fd, _ = open_regular(source)
        except OSError:
            continue
        digest = ContentHash()
        try:
            with open(partial, "wb") as out:
                for data in _chunks(fd):
                    digest.update(data)
                    out.write(data)
                out.flush()
                os.fsync(out.fileno())
        finally:
            os.close(fd)
        if digest.hexdigest()[:12] == short_hash:
            os.replace(partial, target)
            return target, source
        partial.unlink()
    raise FileNotFoundError(
        f"batch {key!r}: no file named {name!r} with content hash {short_hash} in {inbox}; "
        "a batch is immutable, so a file that changed after it was registered is a new batch"
    )
