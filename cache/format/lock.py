"""One writer per output: an exclusive OS lock (``flock``) on a small file inside the output directory, or on
an object store a lease (:func:`hold_lease`).

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
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
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


# A lease not renewed for this long is taken to be abandoned. Renewed every quarter of it, so a writer must be
# unable to reach the store for that long (or a clock be that far off) before another may take over.
LEASE_SECONDS = 120.0


class Lease:
    """One writer on a store without ``flock`` (cache/format/storage.py ``FsspecStore``): a folder of numbered
    objects ``NAME/00000000``, ``NAME/00000001``, ... whose newest is the lease. Taking, renewing and taking
    over all create the next number with the store's conditional create (S3 ``If-None-Match: *``, GCS
    ``ifGenerationMatch=0``), so of two writers racing for a number exactly one gets it, and a holder whose
    lease was taken over learns so at its next renewal.

    The newest object is stale when its server-side modification time is ``ttl`` seconds old, or at once when
    it names a process on this host that is no longer running (a rerun after kill -9 need not wait).
    """

    def __init__(self, store, name: str, what: str, ttl: float = LEASE_SECONDS):
        self.store, self.name, self.what, self.ttl = store, name, what, ttl
        self.number: int | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._body = json.dumps({**_holder(), "ttl": ttl}).encode()

    def _object(self, number: int) -> str:
        return f"{self.name}/{number:08d}"

    def _numbers(self) -> list[int]:
        return sorted(int(n) for n in self.store.list(self.name) if n.isdigit())

    def _create(self, number: int) -> bool:
        try:
            self.store.fs.pipe_file(self.store.path(self._object(number)), self._body, mode="create")
            return True
        except FileExistsError:
            return False

    def _stale(self, number: int) -> tuple[bool, str]:
        """(whether the lease ``number`` may be taken over, who holds it in words)."""
        try:
            holder = json.loads(self.store.read_bytes(self._object(number)))
            modified = _modified(self.store.fs.info(self.store.path(self._object(number))))
        except FileNotFoundError:  # released or renewed meanwhile: let the create decide
            return True, "a writer that just let go"
        if modified.tzinfo is None:
            modified = modified.replace(tzinfo=UTC)
        age = (datetime.now(UTC) - modified).total_seconds()
        who = f"pid {holder.get('pid')} on host {holder.get('host')}, since {holder.get('since')}"
        dead_here = holder.get("host") == socket.gethostname() and not _running(holder.get("pid"))
        return (
            (age > self.ttl or dead_here),
            f"{who}; lease {self.store.member(self._object(number))} renewed {age:.0f} s ago, expires {self.ttl:.0f} s after its last renewal",
        )

    def acquire(self) -> None:
        numbers = self._numbers()
        number = 0
        if numbers:
            stale, who = self._stale(numbers[-1])
            if not stale:
                raise LockHeld(
                    f"{self.what} is being written by another run ({who}). Wait for it to finish or stop it, "
                    "or use another --out."
                )
            number = numbers[-1] + 1
        if not self._create(number):
            raise LockHeld(
                f"{self.what}: another run took the lease at the same moment ({self.store.member(self.name)})"
            )
        self.number = number
        for old in numbers:  # the stale ones (ours now): best effort, a leftover number only costs a listing
            with contextlib.suppress(OSError):
                self.store.delete(self._object(old))
        self._thread = threading.Thread(target=self._renew_loop, daemon=True, name="cache-lease")
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                created = self._create(self.number + 1)
                # Superseded numbers are deleted, so number + 1 may be free again after a takeover: a number
                # above ours is the successor's.
                if not created or self._numbers()[-1] != self.number + 1:
                    if created:
                        self.store.delete(self._object(self.number + 1))
                    self.lost = f"another run took over the lease {self.store.member(self.name)} after it expired"
                    return
            except Exception:  # noqa: BLE001 - a failed renewal is retried; the lease only expires after ttl
                continue
            with contextlib.suppress(Exception):
                self.store.delete(self._object(self.number))
            self.number += 1

    def check(self) -> None:
        """Raise if another writer took the lease over: called before each commit, so a writer that could not
        renew for ``ttl`` never commits over its successor."""
        if self.lost:
            raise LockHeld(f"{self.what}: {self.lost}; stopping without committing")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.number is not None and not self.lost:
            with contextlib.suppress(Exception):
                self.store.delete(self._object(self.number))


def _modified(info: dict) -> datetime:
    """An object's last modification, in the store's clock, from its fsspec ``info`` (s3fs: ``LastModified``,
    gcsfs: ``updated``)."""
    for key in ("LastModified", "updated", "mtime", "last_modified"):
        value = info.get(key)
        if isinstance(value, datetime):
            return value
        if isinstance(value, str):
            return datetime.fromisoformat(value.replace("Z", "+00:00"))
        if isinstance(value, int | float):
            return datetime.fromtimestamp(value, UTC)
    raise OSError(f"{info.get('name')}: the store gives no modification time, so a lease's age cannot be known")


def _running(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):  # another user's live process, or no pid: assume alive
        return True
    return True


@contextlib.contextmanager
def hold_lease(store, name: str, what: str, ttl: float = LEASE_SECONDS) -> Iterator[Lease]:
    """Hold the lease ``name`` of ``store`` for the block (see :class:`Lease`); refuse at once if it is held."""
    from kd_pipeline.cache.format.storage import naming_storage_errors

    lease = Lease(store, name, what, ttl)
    with naming_storage_errors(store.member(name), "cannot take the writer lease"):
        lease.acquire()
    try:
        yield lease
    finally:
        lease.release()
