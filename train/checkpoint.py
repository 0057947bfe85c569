"""Training checkpoints: sharded with torch.distributed.checkpoint, committed atomically, checked before use.

A checkpoint is ``checkpoints/step-NNNNNNNN/``:

- ``.metadata`` and ``__R_N.distcp``: model and optimizer state as torch.distributed.checkpoint (DCP) writes it,
  every rank its own shards (under FSDP no rank ever holds the whole). DCP reshards on load, so a checkpoint of
  N ranks resumes on M ranks, and one strategy's checkpoint resumes under another (none, ddp, fsdp).
- ``trainer_state.json``: step, reader position, the loss's state, ``distill_config.json``: the configuration
  that wrote it (compared on ``--resume``), ``rng-rankR.pt``: each rank's random generators.
- ``COMPLETE``, written last: JSON with the step, the world size and every other file's size in bytes.

It is written under ``.step-N.tmp``, fsynced, renamed, then marked COMPLETE: a crash at any point leaves either
the previous checkpoints untouched or a new complete one. On resume the newest complete checkpoint whose files
all have their recorded sizes is used; one with a missing or truncated file, or that fails to load, is skipped
with a warning naming the file, for the one before it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kd_pipeline.cache.format.files import fsync_dir
from kd_pipeline.errors import BadCheckpoint

CHECKPOINT_DIR = "checkpoints"
COMPLETE_MARKER = "COMPLETE"  # written last: a checkpoint without it is ignored
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "distill_config.json"


def checkpoint_dirs(out: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(out) / CHECKPOINT_DIR
    if not root.exists():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / COMPLETE_MARKER).exists()]
    return sorted(done, key=lambda p: int(p.name.removeprefix("step-")))


def latest_checkpoint(out: Path) -> Path | None:
    dirs = checkpoint_dirs(out)
    return dirs[-1] if dirs else None


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(out: Path, step: int, strategy, model, optimizer, trainer_state: dict, config: dict, keep: int) -> Path:
    """Write step-N (every rank takes part); returns its path."""
    import torch.distributed.checkpoint as dcp

    procs = strategy.procs
    root = Path(out) / CHECKPOINT_DIR
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp"
    if procs.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    procs.barrier()
    with _single_process_quiet():
        dcp.save(strategy.state_dict(model, optimizer), checkpoint_id=str(tmp), no_dist=_single(procs))
    torch.save(rng_state(), tmp / f"rng-rank{procs.rank}.pt")
    if procs.main:
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=1))
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1, default=str))
    procs.barrier()
    if procs.main:
        sizes = {}
        for f in sorted(tmp.iterdir()):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            sizes[f.name] = f.stat().st_size
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        marker = {"step": step, "world_size": procs.world_size, "files": sizes}
        (final / COMPLETE_MARKER).write_text(json.dumps(marker, indent=1))
        fsync_dir(final)
        fsync_dir(root)
        for old in checkpoint_dirs(out)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    procs.barrier()
    return final


def _single(procs) -> bool:
    """No process group: DCP then reads and writes in this process alone (and says so in a warning unless told)."""
    import torch.distributed as dist

    return procs.world_size == 1 and not dist.is_initialized()


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns on every save and load without a process group, though that is what we mean there."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def check_files(ckpt: Path) -> dict:
    """The COMPLETE marker's record, after checking that every file it lists has its recorded size."""
    try:
        marker = json.loads((ckpt / COMPLETE_MARKER).read_text())
        files = marker["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise BadCheckpoint(
            f"{ckpt / COMPLETE_MARKER}: not a checkpoint record of this version ({e}); it cannot be resumed"
        ) from e
    for name, size in files.items():
        path = ckpt / name
        if not path.exists():
            raise BadCheckpoint(f"{path}: missing")
        if path.stat().st_size != size:
            raise BadCheckpoint(f"{path}: {path.stat().st_size} bytes, the checkpoint recorded {size} (truncated?)")
    return marker


@dataclass
class Restored:
    path: Path
    step: int
    world_size: int
    trainer_state: dict
    config: dict


def read_config(ckpt: Path) -> dict:
    return json.loads((ckpt / CONFIG_FILE).read_text())


def load_latest(out: Path, strategy, model, optimizer) -> Restored | None:
    """Load the newest usable checkpoint into ``model`` and ``optimizer`` (and this rank's random generators).

    None if the run has no complete checkpoint. A checkpoint with a missing, truncated or unreadable file is
    skipped with a warning naming it; if none is left, BadCheckpoint.
    """
    import torch.distributed.checkpoint as dcp

    candidates = checkpoint_dirs(out)
    if not candidates:
        return None
    problems = []
    for ckpt in reversed(candidates):
        try:
            marker = check_files(ckpt)
            state = strategy.state_dict(model, optimizer)
            with _single_process_quiet():
                dcp.load(state, checkpoint_id=str(ckpt), no_dist=_single(strategy.procs))
            strategy.load_state_dict(model, optimizer, state)
            trainer_state = json.loads((ckpt / STATE_FILE).read_text())
            config = read_config(ckpt)
        except Exception as e:  # noqa: BLE001 - any failure to read a checkpoint means: try the one before
            problem = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            problems.append(f"{ckpt.name}: {problem}")
            if strategy.procs.main:
                print(f"warning: skipping checkpoint {ckpt}: {problem}", file=sys.stderr, flush=True)
            continue
        rng = ckpt / f"rng-rank{strategy.procs.rank}.pt"
        if rng.exists():  # absent when this rank did not exist in the run that wrote it (more ranks now)
            set_rng_state(torch.load(rng, weights_only=False))
        return Restored(ckpt, int(marker["step"]), int(marker["world_size"]), trainer_state, config)
    raise BadCheckpoint(
        f"no usable checkpoint left in {Path(out) / CHECKPOINT_DIR}: "
        + "; ".join(problems)
        + ". Start a new run (another --out) or restore the files."
    )
