"""What preemption safety and the trackers cost.

    python -m bench.bench_preempt            # about a minute of CPU

1. The stop flag: train/preemption.py all-reduces one int32 (MAX) per optimizer step so every rank stops at the
   same step. Timed here as 2000 such reductions between 2 gloo processes on this machine (the floor of what a
   step pays; NCCL on GPUs is of the same order), against one process (no collective).
2. The trackers: the cost of one metrics record (the 17 numbers of a training record) written through
   train/tracking.MetricsLog to metrics.jsonl alone and with each tracker, 300 records, after opening.

Prints a Markdown table (bench/RESULTS.md).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.common import cpu_model

REDUCTIONS = 2000
RECORDS = 300


def _reducer(rank: int, world: int, port: int, result: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from kd_pipeline.train.parallel import Dist
    from kd_pipeline.train.preemption import TrainingStop

    stop = TrainingStop(Dist(rank, world, rank), torch.device("cpu"), 60.0, lambda: "")
    for _ in range(100):  # warm-up
        stop.requested()
    dist.barrier()
    started = time.perf_counter()
    for _ in range(REDUCTIONS):
        stop.requested()
    elapsed = time.perf_counter() - started
    if rank == 0:
        result["us"] = elapsed / REDUCTIONS * 1e6
    dist.destroy_process_group()


def stop_flag_cost() -> dict[str, float]:
    from kd_pipeline.train.parallel import Dist
    from kd_pipeline.train.preemption import TrainingStop

    one = TrainingStop(Dist(), torch.device("cpu"), 60.0, lambda: "")
    started = time.perf_counter()
    for _ in range(REDUCTIONS):
        one.requested()
    single = (time.perf_counter() - started) / REDUCTIONS * 1e6
    with mp.Manager() as manager:
        result = manager.dict()
        mp.spawn(_reducer, args=(2, 29680, result), nprocs=2, join=True)
        two = result["us"]
    return {"1 process (no collective)": single, "2 gloo processes": two}


def tracker_cost() -> dict[str, tuple[float, float]]:
    """Per tracker: (seconds to open, microseconds per record)."""
    from kd_pipeline.train import tracking

    record = {
        "step": 0,
        **{k: 0.123456789 for k in ("loss", "kd", "ce", "kl", "soft_ce", "lr", "grad_norm", "tokens_per_s")},
        **{k: 1234 for k in ("epoch", "tokens", "tokens_seen")},
        "seconds_per_step": 0.05,
    }
    config = {"loss": "fkl", "lr": 1e-4, "batch_size": 8, "adam_betas": [0.9, 0.95], "eval_cache": None}
    os.environ.setdefault("WANDB_SILENT", "true")
    out = {}
    for names in ([], ["tensorboard"], ["wandb"], ["mlflow"]):
        root = Path(tempfile.mkdtemp(prefix="bench_preempt_"))
        try:
            opened = time.perf_counter()
            log = tracking.MetricsLog(root / "metrics.jsonl", names, "bench", config, root, resume_step=None)
            opened = time.perf_counter() - opened
            times = []
            for step in range(1, RECORDS + 1):
                started = time.perf_counter()
                log.write({**record, "step": step})
                times.append(time.perf_counter() - started)
            log.close()
            out["+".join(names) or "metrics.jsonl only"] = (opened, statistics.median(times) * 1e6)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return out


def main() -> None:
    flag = stop_flag_cost()
    trackers = tracker_cost()
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}\n")
    print("| stop flag, once per step | µs per step |\n| --- | ---: |")
    for name, us in flag.items():
        print(f"| {name} | {us:.1f} |")
    print("\n| metrics record to | open (s) | µs per record (median) |\n| --- | ---: | ---: |")
    for name, (opened, us) in trackers.items():
        print(f"| {name} | {opened:.2f} | {us:.0f} |")
    print("\n" + json.dumps({"stop_flag_us": flag, "trackers": trackers}))


if __name__ == "__main__":
    main()
