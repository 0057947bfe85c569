"""A training run under SIGTERM / SIGINT: stop at a step boundary, every rank at the same one, checkpoint, exit.

:class:`TrainingStop` wraps the run loop. A signal only records itself (kd_pipeline/signals.py); once per
optimizer step the loop asks :meth:`TrainingStop.requested`, which all-reduces the flag (one scalar MAX), so every
rank agrees on the step after which to stop, whichever of them got the signal. The loop then writes a checkpoint
(all ranks together, as a periodic one) and :meth:`TrainingStop.stopped` raises
:class:`~kd_pipeline.signals.Interrupted` with what was saved and the command that resumes; the CLI exits 143
(SIGTERM) or 130 (SIGINT).

The whole of it is bounded by ``--save-on-signal-timeout``: a watchdog started when a rank learns of the stop
exits that rank (same code) with a line saying the checkpoint did not finish and which one --resume would use.
A second signal exits at once the same way.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from kd_pipeline.signals import Interrupted, SignalCatcher, exit_code, signal_name, write_now


class TrainingStop:
    """Signals for one training loop (:meth:`start` ... :meth:`close`): :meth:`requested` once per step on every
    rank, then :meth:`stopped` after the checkpoint.

    ``d``: the run's processes (train.parallel.Dist); ``device``: where the flag is reduced (NCCL wants CUDA);
    ``kept()``: one phrase naming the checkpoint a --resume would use now (for the exits that write none).
    """

    def __init__(self, d, device: torch.device, timeout_s: float, kept: Callable[[], str]):
        self.d, self.device, self.timeout_s, self.kept = d, device, timeout_s, kept
        self.signum: int | None = None  # agreed by all ranks
        self.since = 0.0
        self._watchdog: threading.Timer | None = None
        self._catcher = SignalCatcher(on_first=self._received, on_exit_now=lambda signum: self.kept())

    def start(self) -> TrainingStop:
        """Take the signals (until :meth:`close`)."""
        self._catcher.__enter__()
        return self

    def close(self) -> None:
        self._catcher.__exit__(None, None, None)
        if self._watchdog is not None:
            self._watchdog.cancel()

    # ------------------------------------------------------------------------------------------ signals
    def _received(self, signum: int) -> None:
        """In the signal handler: start the clock, say what happens next (a raw write, see signals.write_now)."""
        self._arm(signum)
        if self.d.main:
            name = signal_name(signum)
            write_now(
                f"{name}: stopping at the next step boundary to write a checkpoint (within --save-on-signal-timeout "
                f"{self.timeout_s:g} s); {name} again exits at once without it"
            )

    def _arm(self, signum: int) -> None:
        if self._watchdog is not None:
            return
        self.since = time.monotonic()
        self._watchdog = threading.Timer(self.timeout_s, self._timed_out, args=(signum,))
        self._watchdog.daemon = True
        self._watchdog.start()

    def _timed_out(self, signum: int) -> None:
        rank = f"rank {self.d.rank}: " if self.d.world_size > 1 else ""
        write_now(
            f"{rank}{signal_name(signum)}: the checkpoint did not finish within --save-on-signal-timeout "
            f"{self.timeout_s:g} s; exiting without it; {self.kept()}"
        )
        os._exit(exit_code(signum))

    # ------------------------------------------------------------------------------------- the loop's side
    def requested(self) -> int | None:
        """The signal to stop for, the same on every rank (one collective: call it on every rank, once per step)."""
        local = self._catcher.signum or 0
        if self.d.world_size > 1:
            flag = torch.tensor([local], dtype=torch.int32, device=self.device)
            self.d.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            local = int(flag.item())
        if local and self.signum is None:
            self.signum = local
            self._arm(local)  # a rank that learns of the stop from another starts its clock now
        return self.signum

    def stopped(self, saved: Path, step: int, total_steps: int, resume_command: str) -> Interrupted:
        """The exception that ends the run once ``saved`` is complete (every rank raises it; rank 0's says so)."""
        if self._watchdog is not None:
            self._watchdog.cancel()
        name = signal_name(self.signum)
        if not self.d.main:
            return Interrupted(self.signum)
        return Interrupted(
            self.signum,
            f"{name}: saved {saved} (step {step} of {total_steps}) {time.monotonic() - self.since:.1f} s after the "
            f"signal.\nResume with: {resume_command}",
        )
