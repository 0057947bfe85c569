"""Durable files: write under a temporary name in the same directory, fsync, rename, fsync the directory.

A crash at any point leaves either the old file or the complete new one, never a short one
(docs/reliability.md).
"""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pyarrow.parquet as pq

from kd_pipeline.cache.format.rows import CacheRows


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path_for(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def commit_file(tmp: Path, final: Path) -> None:
    """Make ``tmp`` durable and atomically move it to ``final``."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fsync_dir(final.parent)


def atomic_write_bytes(final: Path, data: bytes) -> None:
    tmp = temp_path_for(final)
    with open(tmp, "wb") as f:
        f.write(data)
    commit_file(tmp, final)


def write_shard(rows: CacheRows, final: Path, row_group_rows: int, encoding) -> None:
    """Write one shard durably in ``encoding`` (a :class:`~kd_pipeline.cache.format.encodings.Encoding`). A crash leaves either
    no ``final`` or a complete one, never a short one."""
    tmp = temp_path_for(final)
    table = encoding.encode(rows)
    pq.write_table(table, tmp, row_group_size=row_group_rows, **encoding.write_options)
    commit_file(tmp, final)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_failure(path: Path, error: BaseException) -> str | None:
    """Why writing under ``path`` failed, in the system's words ("No space left on device"), or None if ``error`` is
    not a failed write. Writers that wrap the OS error report it in their own words: torch.save's zip writer as
    "unexpected pos" RuntimeErrors, torch.distributed.checkpoint as a CheckpointException holding each rank's
    error; the OS error is looked for in the chain, else a full file system is asked of the file system itself."""
    seen, todo = [], [error]
    while todo:
        e = todo.pop()
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        if isinstance(e, OSError) and e.errno is not None:
            return os.strerror(e.errno)
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)  # torch.distributed.checkpoint's CheckpointException
        if isinstance(failures, dict):
            todo += [pair[0] if isinstance(pair, tuple) else pair for pair in failures.values()]
    if isinstance(error, RuntimeError) or type(error).__name__ == "CheckpointException":
        directory = path if path.is_dir() else path.parent
        while not directory.exists() and directory != directory.parent:
            directory = directory.parent
        try:
            stat = os.statvfs(directory)
        except OSError:
            return None
        if stat.f_bavail * stat.f_frsize < 1 << 20:  # what remains of a full disk after the failed write's cleanup
            return os.strerror(errno.ENOSPC)
    return None
