"""Stopping on SIGTERM / SIGINT: what both stages share (docs/preemption.md).

A scheduler preempts a job with SIGTERM and kills it with SIGKILL a grace period later (SLURM's KillWait,
Kubernetes' terminationGracePeriodSeconds); Ctrl-C is SIGINT. :class:`SignalCatcher` takes both for a block of
work. The first signal either only records itself (``distill``: the loop stops at its next step boundary and writes
a checkpoint, train/preemption.py) or raises :class:`Interrupted` where the main thread is (``cache-teacher``: the
block in flight is discarded, what the manifest committed stays). A later one exits at once with the same code.

A repeat within :data:`REPEAT_WINDOW_S` of the first counts as the same request: ``scancel`` signals every process
of a job step, so a torchrun worker gets SIGTERM from SLURM and, a moment later, the one its agent forwards.

The process then exits 128 + the signal's number (143 for SIGTERM, 130 for SIGINT), as a shell reports a process
the signal ended, with one message that says what was kept and the command that continues.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

HANDLED = (signal.SIGTERM, signal.SIGINT)
REPEAT_WINDOW_S = 1.0


def exit_code(signum: int) -> int:
    return 128 + signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class Interrupted(BaseException):
    """A run stopped by a signal. ``message`` says what was kept and how to continue; the CLI prints it and exits
    :func:`exit_code`. A BaseException, as KeyboardInterrupt: ``except Exception`` on the way up must not take it
    for a failure of the work it interrupted."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message or f"stopped by {signal_name(signum)}")
        self.signum = signum
        self.message = message  # empty: nothing to print (another rank of the run prints it)

    @property
    def exit_code(self) -> int:
        return exit_code(self.signum)


def write_now(message: str) -> None:
    """One line to stderr from a signal handler: a raw write, since the handler may run while the main thread is
    inside a buffered print (Python then raises 'reentrant call')."""
    os.write(2, (message.rstrip("\n") + "\n").encode())


class SignalCatcher:
    """SIGTERM and SIGINT for the duration of a ``with`` block (the previous handlers come back after it).

    ``raise_first``: the first signal raises :class:`Interrupted` in the main thread; otherwise it only sets
    :attr:`signum` (and calls ``on_first(signum)``) for the work to poll. A signal more than
    :data:`REPEAT_WINDOW_S` after the first exits at once: ``on_exit_now(signum)`` says what is left, then
    ``os._exit`` (no cleanup runs; what is committed on disk is all that stays). Outside the main thread
    (signals go only there) the block runs without handlers.
    """

    def __init__(
        self,
        *,
        raise_first: bool = False,
        on_first: Callable[[int], None] | None = None,
        on_exit_now: Callable[[int], str] | None = None,
    ):
        self.raise_first = raise_first
        self.on_first = on_first
        self.on_exit_now = on_exit_now
        self.signum: int | None = None
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> SignalCatcher:
        if threading.current_thread() is threading.main_thread():
            for sig in HANDLED:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum, self._first_at = signum, time.monotonic()
            if self.on_first is not None:
                self.on_first(signum)
            if self.raise_first:
                raise Interrupted(signum)
            return
        if time.monotonic() - self._first_at < REPEAT_WINDOW_S:
            return  # the same request delivered twice (a launcher forwarding what its worker also received)
        left = self.on_exit_now(signum) if self.on_exit_now is not None else ""
        write_now(f"{signal_name(signum)} again: exiting now" + (f"; {left}" if left else ""))
        os._exit(exit_code(signum))


def command_line(command: str, config, **changes) -> str:
    """``pipeline COMMAND`` with the options that reproduce ``config`` (with ``changes``): every CLI field whose
    value differs from its default, spelled as the CLI takes it. Built from the config rather than sys.argv, so it
    is right however the run was started (the CLI, a config file, a Python call)."""
    from kd_pipeline.config import cli_fields, flag_of

    config = dataclasses.replace(config, **changes) if changes else config
    words = ["pipeline", command]
    for f in cli_fields(type(config)):
        value = getattr(config, f.name)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        if value == default or value is None:
            continue
        flag = flag_of(f)
        if isinstance(value, bool):
            # typer's --x/--no-x pair, unless the field names its own flag
            words.append(flag if value else "--no-" + flag.removeprefix("--"))
        elif isinstance(value, list | tuple):
            for item in value:
                words += [flag, str(item)]
        else:
            words += [flag, str(value)]
    return shlex.join(words)


def launcher_prefix() -> str:
    """How this process was launched, as the start of a command line: torchrun for a multi-process run."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return ""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    nodes = f"--nnodes {world // local} (and your rendezvous options) " if world > local else ""
    return f"torchrun {nodes}--nproc-per-node {local} --no-python "


@contextlib.contextmanager
def stopping_cache(config, given=None) -> Iterator[None]:
    """``cache-teacher`` under SIGTERM / SIGINT: the first raises where the work is (the block being scored is
    discarded; the manifest is the commit log, so what it lists stays), then :class:`Interrupted` says what was
    committed and how to resume. ``config``: the resolved one (this worker's manifest); ``given``: as the user
    gave it, for the resume command (a launcher fills the worker index again)."""
    with SignalCatcher(raise_first=True):
        try:
            yield
        except Interrupted as stop:
            raise Interrupted(stop.signum, cache_report(config, stop.signum, given)) from None


def cache_report(config, signum: int, given=None) -> str:
    """What ``cache-teacher`` kept when ``signum`` stopped it: the shards this worker's manifest committed; the
    block being scored was discarded, and the same command continues after the last committed one."""
    from kd_pipeline.cache.format.layout import manifest_name
    from kd_pipeline.cache.format.manifest import read_manifest

    path = Path(config.out) / manifest_name(config.worker_index, config.num_workers)
    name = signal_name(signum)
    try:
        manifest = read_manifest(path) if path.exists() else None
    except Exception as e:  # noqa: BLE001 - the report must not hide the stop; say what could not be read
        return f"{name}: stopped; {path} could not be read ({e}); run `pipeline verify {config.out}`"
    if manifest is not None and manifest.complete:
        return f"{name}: stopped after the cache was complete ({len(manifest.shards)} shards); nothing to resume"
    shards = manifest.shards if manifest is not None else []
    if shards:
        last = max(shards, key=lambda s: s.block)
        kept = f"{len(shards)} shard(s) committed ({sum(s.tokens for s in shards):,} tokens, the last {last.name})"
    else:
        kept = "no shard committed yet"
    # --overwrite would delete what was just kept: the resume command never carries it.
    command = command_line("cache-teacher", given if given is not None else config, overwrite=False)
    launcher = " (every worker, under the same launcher)" if config.num_workers > 1 else ""
    return (
        f"{name}: stopped; {kept}; the block in flight was discarded (a shard written but not yet in the manifest "
        f"is removed when the run resumes).\nResume with{launcher}: {command}"
    )
