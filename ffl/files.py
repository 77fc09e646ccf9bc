"""Writing files so that a reader never sees half of one: every file or folder the library writes
(zoo shards and manifests, downloaded datasets, decoded-image caches, result tables, executed
chapters) is assembled under a temporary name next to its destination and renamed into place
when complete, so a killed process leaves the previous version or nothing, never a torn file.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging path (same name, inside a temporary folder next to ``path``); write a file
    or build a folder there. When the block ends normally the staged file is flushed to disk and
    renamed onto ``path`` (an existing folder at ``path`` is swapped out and deleted); when it
    raises, everything staged is deleted and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}{_TMP_TAG}{_owner()}-", dir=path.parent) as tmp:
        staged = Path(tmp) / path.name
        yield staged
        if staged.is_file():
            with open(staged, "rb+") as f:
                os.fsync(f.fileno())
        elif path.is_dir():  # os.replace cannot overwrite a non-empty folder: move it aside first
            os.replace(path, Path(tmp) / ".replaced")
        os.replace(staged, path)


_TMP_TAG = ".tmp-"
#: temporary folders of another host (or of the old naming) are removed once they are this old
STALE_SECONDS = 24 * 3600


def _owner() -> str:
    """``<pid>@<host>`` of this process, part of each staging folder's name, so that a later run
    can tell a folder left by a killed process from one that is being written."""
    return f"{os.getpid()}@{socket.gethostname().replace('-', '_')}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def clean_stale_temp(folder: str | os.PathLike) -> list[Path]:
    """Delete the staging folders of :func:`atomic_path` in ``folder`` that a killed process left
    behind (SIGKILL, power loss): those of a process of this host that no longer runs, and those
    of other hosts older than :data:`STALE_SECONDS`. Returns what was removed. Called when a zoo,
    a results table or a loader cache is about to be written."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    host = socket.gethostname().replace("-", "_")
    for entry in folder.iterdir():
        if not (entry.name.startswith(".") and _TMP_TAG in entry.name):
            continue
        owner = entry.name.rsplit(_TMP_TAG, 1)[1].split("-", 1)[0]
        pid, _, where = owner.partition("@")
        try:
            age = time.time() - entry.lstat().st_mtime
        except FileNotFoundError:
            continue
        if where == host and pid.isdigit():
            stale = not _alive(int(pid))
        else:
            stale = age > STALE_SECONDS
        if stale:
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`); a failed write (full disk,
    read-only folder) raises ``OSError`` naming ``path`` and the free space of its disk."""
    try:
        with atomic_path(path) as staged:
            staged.write_bytes(data)
    except OSError as e:
        raise OSError(e.errno, f"{e.strerror or e}: cannot write {path} ({len(data):,} bytes; "
                               f"{free_bytes(Path(path)):,} bytes free on its disk)") from e


def free_bytes(path: Path) -> int:
    """Free bytes on the disk of ``path`` (or of its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (resolved path) for this block, against other processes
    of this host: a lock file in the temporary directory, so nothing is written in or beside
    ``folder``."""
    key = hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"ffl-lock-{key}", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """``obj`` as indented, key-sorted JSON, written atomically."""
    write_bytes_atomic(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 16 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()
