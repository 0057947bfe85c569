"""One writer per output: an exclusive OS lock (``flock``) on a small file inside the output directory.

The kernel drops the lock when its holder's file descriptor closes, so a process killed by -9 (or a
machine reboot) never leaves a stale lock behind; the file may stay, it is only the lock's name. The
holder writes its pid, host and start time into the file, so a refused second writer can say who holds it.

flock locks belong to an open file description, not to a process: a second :func:`hold_lock` on the same
file from the same process is refused too. Locks taken on a network file system are only as good as its
flock support (NFSv4 and Lustre honour it).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from kd_pipeline.errors import LockHeld, OutputError


def _holder() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _describe(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {holder['pid']} on host {holder['host']}, since {holder['since']}"
    except (ValueError, KeyError, TypeError, OSError):  # the holder has not written its name yet
        return "a process that has not written its pid yet"


@contextlib.contextmanager
def hold_lock(path: Path, what: str) -> Iterator[None]:
    """Hold the exclusive lock ``path`` for the duration of the block; refuse at once if another holds it.

    ``what`` names the thing protected in the refusal, e.g. "cache /data/c (worker 0)".
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:  # the first write of every writer: a read-only or full file system shows here
        raise OutputError(
            f"{path}: cannot take the lock of {what} ({e.strerror or e}); a writer needs a writable folder there. "
            "Choose another --out, or fix the folder's file system or permissions."
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockHeld(
                f"{what} is being written by another run ({_describe(fd)}; lock {path}). Wait for it to finish "
                "or stop it, or use another --out."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder()).encode() + b"\n", 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file is not removed (unlinking races with a waiting opener)
