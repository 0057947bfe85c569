"""Training checkpoints: sharded with torch.distributed.checkpoint, committed atomically, checked before use.

A checkpoint is ``checkpoints/step-NNNNNNNN/``:

- ``.metadata`` and ``__R_N.distcp``: model and optimizer state as torch.distributed.checkpoint (DCP) writes it,
  every rank its own shards (under FSDP no rank ever holds the whole). DCP reshards on load, so a checkpoint of
  N ranks resumes on M ranks, and one strategy's checkpoint resumes under another (none, ddp, fsdp).
- ``trainer_state.json``: step, reader position, the loss's state, ``distill_config.json``: the configuration
  that wrote it (compared on ``--resume``), ``rng-rankR.pt``: each rank's random generators.
- ``COMPLETE``, written last: JSON with the step, the world size, every other file's size in bytes and its
  CRC-32 (zlib's; bit rot is the threat, not an adversary, and it costs about half of sha256: bench/RESULTS.md).

It is written under ``.step-N.tmp``, fsynced, marked COMPLETE there, then renamed to ``step-N``. A re-save of a
step (a requeued run saving the step it resumed from) removes the old ``step-N`` only once the new one is complete:
a crash between the removal and the rename leaves a complete ``.step-N.tmp``, which a resume takes for ``step-N``
(:func:`resumable_dirs`) and the next save commits. So a
crash at any point leaves the previous checkpoints untouched and at most one new complete one. On resume the
newest complete checkpoint whose files all have their recorded sizes and checksums is used; one with a missing,
truncated or damaged file, or that fails to load, is skipped with a warning naming the file, for the one before
it. A checkpoint written before checksums existed is checked by sizes only, with a note. A checkpoint folder with
content but no complete checkpoint is an error, never a silent restart from step 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sys
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kd_pipeline.cache.format.files import fsync_dir, write_failure
from kd_pipeline.errors import BadCheckpoint, TrainingError

CHECKPOINT_DIR = "checkpoints"
COMPLETE_MARKER = "COMPLETE"  # written last: a checkpoint without it is ignored
CHECKSUMS = "crc32"  # the COMPLETE record's key: {file name: zlib CRC-32 as 8 hex digits}
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "distill_config.json"


def checkpoint_dirs(out: Path) -> list[Path]:
    """Committed checkpoints of a run (``step-N`` marked COMPLETE), oldest first."""
    root = Path(out) / CHECKPOINT_DIR
    if not root.exists():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / COMPLETE_MARKER).exists()]
    return sorted(done, key=lambda p: _step_of(p.name) or 0)


def resumable_dirs(out: Path) -> list[Path]:
    """What a resume may use, oldest first: the committed checkpoints, and for a step without one a complete
    ``.step-N.tmp`` (a re-save stopped between removing the old ``step-N`` and renaming the new one)."""
    found = {_step_of(p.name): p for p in checkpoint_dirs(out)}
    root = Path(out) / CHECKPOINT_DIR
    for p in root.glob(".step-*.tmp") if root.exists() else []:
        step = _step_of(p.name)
        if step is not None and step not in found and p.is_dir() and (p / COMPLETE_MARKER).exists():
            found[step] = p
    return [found[step] for step in sorted(found)]


def _step_of(name: str) -> int | None:
    """N for ``step-N`` and ``.step-N.tmp``, else None."""
    core = name.removeprefix(".").removesuffix(".tmp") if name.startswith(".") and name.endswith(".tmp") else name
    digits = core.removeprefix("step-")
    return int(digits) if core.startswith("step-") and digits.isdigit() else None


def file_crc32(path: Path, chunk: int = 1 << 22) -> str:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


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
    try:
        if procs.main:
            for done in resumable_dirs(out):  # a complete .tmp a resume may have used (up to this step) commits now
                if done.name.startswith(".") and _step_of(done.name) <= step:
                    os.replace(done, root / f"step-{_step_of(done.name):08d}")
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
            sizes, sums = {}, {}
            for f in sorted(tmp.iterdir()):
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
                sizes[f.name] = f.stat().st_size
                sums[f.name] = file_crc32(f)
            marker = {"step": step, "world_size": procs.world_size, "files": sizes, CHECKSUMS: sums}
            with open(tmp / COMPLETE_MARKER, "w") as fh:
                fh.write(json.dumps(marker, indent=1))
                fh.flush()
                os.fsync(fh.fileno())
            fsync_dir(tmp)
            # Only now may a re-save's old step-N go: until the rename below, the complete tmp stands for it.
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            fsync_dir(root)
            for old in checkpoint_dirs(out)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException as error:
        reason = write_failure(tmp, error) if isinstance(error, Exception) or _is_dcp_failure(error) else None
        if reason is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # gives back the space the partial checkpoint took
        kept = [p.name for p in checkpoint_dirs(out)]
        raise TrainingError(
            f"{tmp}: cannot write the step-{step} checkpoint ({reason}); "
            + (f"the checkpoints before it are intact ({', '.join(kept)}), " if kept else "no checkpoint is kept, ")
            + "free space (or fix the folder) and rerun with --resume"
        ) from error
    procs.barrier()
    return final


def _is_dcp_failure(error: BaseException) -> bool:
    """torch.distributed.checkpoint raises its CheckpointException as a BaseException (not an Exception)."""
    return type(error).__name__ == "CheckpointException"


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
    """The COMPLETE marker's record, after checking that every file it lists has its recorded size and, where the
    record has them (checkpoints written since checksums exist), its recorded CRC-32."""
    try:
        marker = json.loads((ckpt / COMPLETE_MARKER).read_text())
        files = marker["files"]
        sums = marker.get(CHECKSUMS)
        if sums is not None and set(sums) != set(files):
            raise ValueError("its checksums and sizes list different files")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise BadCheckpoint(
            f"{ckpt / COMPLETE_MARKER}: not a checkpoint record of this version ({e}); it cannot be resumed"
        ) from e
    for name, size in files.items():
        path = ckpt / name
        if not path.exists():
            raise BadCheckpoint(f"{path}: missing")
        if path.stat().st_size != size:
            raise BadCheckpoint(f"{path}: {path.stat().st_size} bytes, the checkpoint recorded {size} (truncated?)")
    for name, expected in (sums or {}).items():
        got = file_crc32(ckpt / name)
        if got != expected:
            raise BadCheckpoint(
                f"{ckpt / name}: CRC-32 {got}, the checkpoint recorded {expected} (damaged since it was written)"
            )
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

    None if the run has no checkpoint folder or an empty one. A checkpoint with a missing, truncated, damaged or
    unreadable file is skipped with a warning naming it; if none is left (or the folder holds only incomplete
    ones), BadCheckpoint.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    candidates = resumable_dirs(out)
    if not candidates:
        root = Path(out) / CHECKPOINT_DIR
        left = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
        if left:  # a restart from step 0 would silently throw away whatever these were
            raise BadCheckpoint(
                f"--resume: {root} holds no complete checkpoint, only {', '.join(left[:5])}"
                f"{', ...' if len(left) > 5 else ''} (written when a run stopped mid-save, or damaged). Restore the "
                "files, or remove that folder to train this run from step 0, or use another --out."
            )
        return None
    problems = []
    for ckpt in reversed(candidates):
        try:
            marker = check_files(ckpt)
            if CHECKSUMS not in marker and strategy.procs.main:
                print(
                    f"note: {ckpt} was written before checkpoints had checksums: its files are checked by size only",
                    file=sys.stderr,
                    flush=True,
                )
            state = strategy.state_dict(model, optimizer)
            with _single_process_quiet():
                dcp.load(state, checkpoint_id=str(ckpt), no_dist=_single(strategy.procs))
            strategy.load_state_dict(model, optimizer, state)
            trainer_state = json.loads((ckpt / STATE_FILE).read_text())
            config = read_config(ckpt)
            rng = ckpt / f"rng-rank{strategy.procs.rank}.pt"
            if rng.exists():  # absent when this rank did not exist in the run that wrote it (more ranks now)
                try:  # inside the loop: a damaged one means the checkpoint before
                    set_rng_state(torch.load(rng, weights_only=False))
                except Exception as e:  # noqa: BLE001 - unpickling raises many kinds; name the file
                    raise BadCheckpoint(f"{rng}: unreadable ({type(e).__name__}: {e})") from e
        # DCP's CheckpointException derives from BaseException, not Exception: name it, or a damaged .metadata in
        # a checkpoint without checksums would end the run instead of falling back.
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - any failure to read it: try the one before
            problem = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            problems.append(f"{ckpt.name}: {problem}")
            if strategy.procs.main:
                print(f"warning: skipping checkpoint {ckpt}: {problem}", file=sys.stderr, flush=True)
            continue
        return Restored(ckpt, int(marker["step"]), int(marker["world_size"]), trainer_state, config)
    raise BadCheckpoint(
        f"no usable checkpoint left in {Path(out) / CHECKPOINT_DIR}: "
        + "; ".join(problems)
        + ". Start a new run (another --out) or restore the files."
    )
