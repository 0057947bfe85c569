"""Durable files: write under a temporary name in the same directory, fsync, rename, fsync the directory.

A crash at any point leaves either the old file or the complete new one, never a short one
(docs/reliability.md).
"""

from __future__ import annotations

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
