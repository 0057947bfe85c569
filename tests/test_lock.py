"""One writer per output: a second writer is refused at once, naming the holder; a killed holder leaves no lock."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kd_pipeline.cache.format.lock import hold_lock
from kd_pipeline.errors import LockHeld

HOLD = "import sys, time; from kd_pipeline.cache.format.lock import hold_lock\nwith hold_lock(sys.argv[1], 'x'):\n print('held', flush=True); time.sleep(60)"


def _holder(path: Path) -> subprocess.Popen:
    """Another process holding the lock at ``path`` (kill it to end the hold)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _release(proc: subprocess.Popen) -> None:
    """End a holder as a crash would: kill -9."""
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()


def test_second_holder_is_refused_naming_the_first_and_kill_9_frees_the_lock(tmp_path):
    lock = tmp_path / "out" / ".writer000.lock"
    proc = _holder(lock)
    try:
        started = time.perf_counter()
        with pytest.raises(LockHeld) as refused:
            with hold_lock(lock, "cache out"):
                pass
        assert time.perf_counter() - started < 1.0  # refused at once, not after a wait
        assert f"pid {proc.pid} on host {socket.gethostname()}" in str(refused.value)
        assert "cache out is being written by another run" in str(refused.value)
    finally:
        _release(proc)
    with hold_lock(lock, "cache out"):  # no stale lock after kill -9
        assert f'"pid": {os.getpid()}' in lock.read_text()


def test_a_lock_is_exclusive_within_one_process_too(tmp_path):
    with hold_lock(tmp_path / "l", "it"):
        with pytest.raises(LockHeld):
            with hold_lock(tmp_path / "l", "it"):
                pass
    with hold_lock(tmp_path / "l", "it"):  # released when the block ends
        pass
