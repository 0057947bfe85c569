"""Parallelism strategies on CPU: step time of one process, DDP and FSDP2 over 2 ranks, and what each rank holds.

    python -m bench.bench_parallel [--steps 8] [--batch-size 2] [--seq-len 128] [--sequences 96] [--out DIR]

Everything is the real ``pipeline distill`` launched the README's way (``torchrun --no-python ... pipeline
distill``, gloo): the bench only prepares a cache and reads back what the runs wrote.

- Material (bench/material.py): the SmolLM2-135M teacher scores ``--sequences`` sequences of Moby Dick (top-16)
  into a cache once; the student is the 6-layer cut (49.6M parameters, tied embeddings).
- Runs: ``--parallel none`` (one process), ``ddp`` and ``fsdp`` (2 processes each), ``--batch-size`` sequences
  per process per step, fp32, one intra-op thread per process (OMP_NUM_THREADS=1), so that 2 ranks use the
  machine's 2 cores as one process with 2 threads would not: the rows compare strategies, not thread counts.
- Step time: the median of the per-step times the trainer logs (``--log-every 1``; the first step, which
  includes warm-up, is dropped). Tokens/s counts the trained tokens of all ranks.
- Memory: parameter and optimizer-state bytes per rank, as each rank counts its own tensors (the local shards
  of FSDP's DTensors), from the run's memory.json.

Prints a Markdown table for bench/RESULTS.md. Ratios are within one run of this script (shared cores).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import material
from bench.common import cpu_model

BIN = Path(sys.executable).parent


def build_cache(out: Path, sequences: int, seq_len: int) -> Path:
    from kd_pipeline.cache.build import CacheConfig, cache_teacher

    cache = out / "cache"
    if not (cache / "manifest.json").exists():
        cache_teacher(
            CacheConfig(
                teacher=str(material.teacher_dir()),
                data=str(material.corpus("moby-dick")),
                out=cache,
                top_k=16,
                seq_len=seq_len + 1,
                batch_size=8,
                max_sequences=sequences,
                progress=False,
            )
        )
    return cache


def run(strategy: str, nproc: int, cache: Path, student: Path, out: Path, args, port: int) -> dict:
    run_dir = out / strategy
    shutil.rmtree(run_dir, ignore_errors=True)
    distill = [
        str(BIN / "pipeline"),
        "distill",
        "--student",
        str(student),
        "--cache",
        str(cache),
        "--out",
        str(run_dir),
        "--batch-size",
        str(args.batch_size),
        "--max-steps",
        str(args.steps),
        "--save-every",
        str(args.steps),
        "--eval-sequences",
        "0",
        "--log-every",
        "1",
        "--no-progress",
        "--device",
        "cpu",
        "--parallel",
        strategy,
    ]
    if nproc > 1:
        distill = [
            str(BIN / "torchrun"),
            "--nproc-per-node",
            str(nproc),
            "--master-port",
            str(port),
            "--no-python",
            *distill,
        ]
    started = time.perf_counter()
    result = subprocess.run(distill, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{strategy} failed:\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "tokens_per_s" in r][1:]  # the first step holds the warm-up
    step_s = statistics.median(r["seconds_per_step"] for r in steps)
    memory = json.loads((run_dir / "memory.json").read_text())
    return {
        "strategy": strategy,
        "processes": nproc,
        "step_seconds": step_s,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps),
        "parameter_bytes": max(r["parameter_bytes"] for r in memory["ranks"]),
        "optimizer_bytes": max(r["optimizer_bytes"] for r in memory["ranks"]),
        "run_seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=2, help="sequences per process per step")
    parser.add_argument("--seq-len", type=int, default=128, help="trained positions per sequence")
    parser.add_argument("--sequences", type=int, default=96, help="sequences in the cache")
    parser.add_argument("--out", type=Path, default=material.material_root() / "bench_parallel")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    cache = build_cache(args.out, args.sequences, args.seq_len)
    student = material.student_dir()
    rows = [
        run("none", 1, cache, student, args.out, args, 29710),
        run("ddp", 2, cache, student, args.out, args, 29711),
        run("fsdp", 2, cache, student, args.out, args, 29712),
    ]
    base = rows[0]
    print(
        f"\n{time.strftime('%Y-%m-%d')}, {os.cpu_count()} x {cpu_model()}; student {student.name}, "
        f"{args.batch_size} x {args.seq_len} tokens per process per step, fp32, OMP_NUM_THREADS=1\n"
    )
    print(
        "| strategy | processes | s/step | tokens/s (all ranks) | tokens/s vs one process | parameters per rank | "
        "optimizer state per rank | (params + optimizer) vs one process |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        held = r["parameter_bytes"] + r["optimizer_bytes"]
        print(
            f"| {r['strategy']} | {r['processes']} | {r['step_seconds']:.2f} | {r['tokens_per_s']:.0f} | "
            f"{r['tokens_per_s'] / base['tokens_per_s']:.2f} | {r['parameter_bytes'] / 2**20:.1f} MiB | "
            f"{r['optimizer_bytes'] / 2**20:.1f} MiB | {held / (base['parameter_bytes'] + base['optimizer_bytes']):.2f} |"
        )
    (args.out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
