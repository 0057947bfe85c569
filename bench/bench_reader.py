"""Reader benchmark: how fast ``train.reader.CacheReader`` turns a cache into training tensors on one core,
and how much memory it holds while doing so.

    python -m bench.bench_reader [--cache DIR] [--sequences 2048] [--seq-len 1024] [--k 64] [--profile]

The cache is written once through the project's writer path (``kd_pipeline.cache.format.files.write_shard``, one
``ShardEntry`` per shard, ``Manifest.save``), with build.py's default layout: 1M-token shards, 64k-token
row groups. Teacher values are synthetic (the reader's speed depends on the bytes, not on where they came
from): uniform random top-k ids (the incompressible case: real ids compress a little better) and sorted
log-probs of a peaked distribution holding 0.9 of the mass. Without ``--cache`` it goes into a temporary
directory and is deleted at the end; with ``--cache DIR`` it is kept and reused by later runs.

Each pass runs in a fresh process pinned to one CPU (``sched_setaffinity``; torch, and pyarrow's CPU and I/O
pools, set to one thread), so that its peak RSS is its own and "per core" is literal: the reader's prefetch
thread and the consumer share that core. A pass iterates one epoch in batches of ``--batch`` sequences with
shuffling on, as ``pipeline distill`` does, and reports tokens (sequences x seq_len) per wall second and per
CPU second (the latter is what the pass would get on an otherwise idle core).

Passes:

1. ``verify_checksums=True`` on a cold page cache (``posix_fadvise(DONTNEED)`` on the shards): a first
   epoch, which hashes each shard once before reading it;
2. ``verify_checksums=False``, warm: every later epoch;
3. as 2 with ``shuffle_rows`` = one row group: shows what the shuffle window costs in memory and time;
4. the decode floor: only the reader's ``_read_chunk`` (Parquet decode into numpy, no shuffle, no batches)
   over every row group: no reader on this format can beat it.

``--profile`` adds a cProfile of pass 2 (prefetch off, so all the work is on the profiled thread).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.common import cpu_model
from kd_pipeline.cache.format.encodings import encoding_for
from kd_pipeline.cache.format.files import sha256_file, write_shard
from kd_pipeline.cache.format.layout import shard_name
from kd_pipeline.cache.format.manifest import Manifest, ShardEntry, load_cache
from kd_pipeline.cache.format.rows import CacheRows, tokens_sha256

GOAL_TOKENS_PER_S = 1_000_000
VOCAB = 49152  # SmolLM2's
SHARD_TOKENS = 1 << 20  # build.CacheConfig defaults: shard and row-group sizes in tokens
ROW_GROUP_TOKENS = 1 << 16
TEACHER_TOP_K_MASS = 0.9


# ---------------------------------------------------------------------------------------------------
# The cache


def synthetic_rows(first_seq: int, rows: int, seq_len: int, k: int, rng: np.random.Generator) -> CacheRows:
    """``rows`` packed sequences with synthetic teacher data in the cache's in-memory form."""
    positions = seq_len - 1
    # A peaked teacher: sorted Gaussian logits (std 2) over the support, renormalized to TEACHER_TOP_K_MASS.
    logits = -np.sort(-rng.standard_normal((rows, positions, k), dtype=np.float32) * 2.0, axis=-1)
    shift = logits[..., :1] + np.log(np.exp(logits - logits[..., :1]).sum(-1, keepdims=True))
    topk_logprobs = logits - shift + np.float32(np.log(TEACHER_TOP_K_MASS))
    loss_mask = np.ones((rows, seq_len), dtype=np.bool_)
    loss_mask[:, 0] = False  # nothing predicts the first token
    return CacheRows(
        seq_ids=np.arange(first_seq, first_seq + rows, dtype=np.int64),
        input_ids=rng.integers(0, VOCAB, (rows, seq_len), dtype=np.int32),
        loss_mask=loss_mask,
        topk_ids=rng.integers(0, VOCAB, (rows, positions, k), dtype=np.int32),
        topk_logprobs=topk_logprobs,
        # The true token's log-prob: the top-1's or below it.
        target_logprob=topk_logprobs[..., 0] - rng.exponential(1.5, (rows, positions)).astype(np.float32),
    )


def build_cache(root: Path, sequences: int, seq_len: int, k: int, seed: int = 0) -> None:
    """Write a complete cache as cache.build.cache_teacher would (same writer, same manifest commits)."""
    rows_per_shard = max(1, SHARD_TOKENS // seq_len)
    manifest = Manifest(
        teacher={"name": "synthetic", "dtype": "float32"},
        backend={"name": "synthetic"},
        tokenizer={"sha256": "synthetic", "vocab_size": VOCAB},
        k=k,
        seq_len=seq_len,
        data={"source": "bench.bench_reader synthetic", "seed": seed},
        rows_per_shard=rows_per_shard,
        row_group_rows=max(1, min(rows_per_shard, ROW_GROUP_TOKENS // seq_len)),
    )
    (root / "shards").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for block, first in enumerate(range(0, sequences, rows_per_shard)):
        rows = synthetic_rows(first, min(rows_per_shard, sequences - first), seq_len, k, rng)
        path = root / shard_name(block)
        write_shard(rows, path, manifest.row_group_rows, encoding_for(manifest))
        manifest.shards.append(
            ShardEntry(
                name=shard_name(block),
                block=block,
                rows=rows.num_rows,
                tokens=int(rows.input_ids.size),
                bytes=path.stat().st_size,
                sha256=sha256_file(path),
                first_seq_id=int(rows.seq_ids[0]),
                last_seq_id=int(rows.seq_ids[-1]),
                tokens_sha256=tokens_sha256(rows.input_ids),
            )
        )
        manifest.save(root)
    manifest.stream = {"num_sequences": sequences, "sha256": "synthetic"}
    manifest.complete = True
    manifest.save(root)


# ---------------------------------------------------------------------------------------------------
# One pass, in its own process


@dataclass
class PassResult:
    tokens: int
    wall_s: float
    user_s: float
    sys_s: float  # the kernel's share: mostly page faults on freshly allocated memory
    rss_base_mb: float
    rss_peak_mb: float
    arrow_peak_mb: float

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s


def _rss_mb(field: str = "VmRSS") -> float:
    """Current (VmRSS) or peak (VmHWM) resident memory of this process. Not getrusage's ru_maxrss: Linux carries
    that across exec, so a spawned child would report its parent's peak (here: building the cache)."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field + ":")).split()[1]) / 1024


def _single_core() -> None:
    import pyarrow as pa
    import torch

    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    torch.set_num_threads(1)
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)


def run_pass(
    cache: str,
    batch: int,
    verify: bool,
    shuffle_rows: int,
    cold: bool,
    profile: bool = False,
    decode_only: bool = False,
) -> PassResult:
    """One epoch of CacheReader batches (the body of a child process). ``decode_only``: just the reader's own
    ``_read_chunk`` (Parquet decode into numpy) over every row group in file order: the floor of any reader."""
    import pyarrow as pa

    from kd_pipeline.train.reader import CacheReader

    _single_core()
    # Warm up on one row group: lazy imports and first-use initialization are not the reader's steady state.
    warm = CacheReader(cache, batch, shuffle=False, shuffle_rows=1, verify_checksums=False, prefetch=0)
    next(iter(warm.iter_epoch(0)))
    reader = CacheReader(
        cache,
        batch,
        seed=0,
        shuffle=True,
        shuffle_rows=shuffle_rows,
        verify_checksums=verify,
        prefetch=0 if profile else 4,
    )
    if cold:  # drop our shards (only ours) from the page cache, so the pass reads the disk
        for shard in reader.info.shards:
            fd = os.open(reader.info.root / shard.name, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
    rss_base = _rss_mb()
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    tokens = 0
    wall, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    if decode_only:
        for chunk in reader.chunks:
            tokens += reader._read_chunk(chunk).input_ids.size
    else:
        for b in reader.iter_epoch(0):
            tokens += b["input_ids"].numel()
    wall, after = time.perf_counter() - wall, resource.getrusage(resource.RUSAGE_SELF)
    if profiler is not None:
        import pstats

        profiler.disable()
        print("```")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(14)
        print("```", flush=True)
    return PassResult(
        tokens,
        wall,
        after.ru_utime - before.ru_utime,
        after.ru_stime - before.ru_stime,
        rss_base,
        _rss_mb("VmHWM"),
        pa.default_memory_pool().max_memory() / 2**20,
    )


def in_child(fn, *args, **kwargs):
    """Run ``fn`` in a fresh spawned process (its own peak RSS, its own CPU affinity)."""
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args, kwargs)


# ---------------------------------------------------------------------------------------------------


def machine() -> str:
    cpu = cpu_model()
    import pyarrow

    load = " ".join(open("/proc/loadavg").read().split()[:3])
    return f"{os.cpu_count()} cores ({cpu}), pyarrow {pyarrow.__version__}; load average {load}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, help="where to build (or reuse) the cache; default: a temp dir")
    ap.add_argument("--sequences", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--shuffle-rows", type=int, default=1024, help="the reader's (and distill's) default")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()

    tmp = None
    root = args.cache
    if root is None:
        tmp = tempfile.mkdtemp(prefix="bench-reader-")
        root = Path(tmp) / "cache"
    try:
        built = ""
        if not (root / "manifest.json").exists():
            start = time.perf_counter()
            build_cache(root, args.sequences, args.seq_len, args.k)
            built = f", built in {time.perf_counter() - start:.0f} s"
        info = load_cache(root)
        m = info.manifest
        row_bytes = m.seq_len * (4 + 1) + (m.seq_len - 1) * (m.k * (4 + 2) + 2) + 8  # decoded, as stored
        print(machine())
        print(
            f"cache: {info.num_sequences} sequences x {m.seq_len} = {info.num_tokens:,} tokens, k = {m.k}, "
            f"{len(info.shards)} shards of {m.rows_per_shard} rows, row groups of {m.row_group_rows} rows; "
            f"{info.num_bytes / 2**20:.0f} MiB on disk ({info.num_bytes / info.num_tokens:.0f} B/token){built}\n"
        )

        one_group, warm = m.row_group_rows, dict(verify=False, cold=False)
        passes = [
            ("1: verify on, cold", dict(verify=True, cold=True, shuffle_rows=args.shuffle_rows)),
            ("2: verify off, warm", dict(warm, shuffle_rows=args.shuffle_rows)),
            (f"3: as 2, shuffle_rows = {one_group}", dict(warm, shuffle_rows=one_group)),
            ("decode floor: _read_chunk only", dict(warm, shuffle_rows=one_group, decode_only=True)),
        ]
        print(f"### CacheReader, one core, batch {args.batch}, shuffle on\n")
        print(
            "| pass | shuffle_rows | tokens/s (wall) | tokens/s per CPU-second | goal >= 1M | CPU user + sys (s) | "
            "peak RSS growth (MiB) | arrow pool peak (MiB) | shuffle window, decoded (MiB) |"
        )
        print("|---|---:|---:|---:|---|---:|---:|---:|---:|")
        for label, options in passes:
            r = in_child(run_pass, str(root), args.batch, **options)
            rate_cpu = r.tokens / r.cpu_s
            # The reader's window: whole row groups until shuffle_rows is reached (train/reader.py, _windows).
            window_rows = min(-(-options["shuffle_rows"] // m.row_group_rows) * m.row_group_rows, info.num_sequences)
            shuffle, window = (
                ("-", "-")
                if options.get("decode_only")
                else (str(options["shuffle_rows"]), f"{window_rows * row_bytes / 2**20:,.0f}")
            )
            print(
                f"| {label} | {shuffle} | {r.tokens / r.wall_s:,.0f} | {rate_cpu:,.0f} | "
                f"{'ok' if rate_cpu >= GOAL_TOKENS_PER_S else 'BELOW'} | {r.user_s:.2f} + {r.sys_s:.2f} | "
                f"{r.rss_peak_mb - r.rss_base_mb:,.0f} | {r.arrow_peak_mb:,.0f} | {window} |"
            )
        print(
            f"\nA shard holds {m.rows_per_shard * row_bytes / 2**20:,.0f} MiB decoded, a row group "
            f"{m.row_group_rows * row_bytes / 2**20:,.0f} MiB."
        )
        if args.profile:
            print("\n### cProfile of pass 2 (prefetch off), top functions by own time\n")
            in_child(
                run_pass, str(root), args.batch, verify=False, shuffle_rows=args.shuffle_rows, cold=False, profile=True
            )
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
