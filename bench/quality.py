"""Issue 4: end-to-end distillation benchmark on real material (quality, speed, storage), rerunnable by anyone.

One command caches a teacher, trains the same student with every loss and support from the caches, scores
each student against the live teacher on held-out text over the FULL vocabulary, and compares the cached
runs with an online dense-KD run (teacher in the loop)::

    python -m bench.quality                 # SmolLM2-135M -> its 6-layer cut on Moby Dick (29 min on 2 idle CPU cores)
    python -m bench.quality --quick         # CI-sized smoke run; exits 1 unless KD beats CE-only on KL
    python -m bench.quality --teacher ID_OR_DIR --student ID_OR_DIR --data TRAIN --eval-data HELDOUT

Defaults come from :mod:`bench.material` (offline: package registries only): the teacher, the student cut
from it, Moby Dick without every tenth chapter for training and those chapters as held-out text (never
cached for training). Everything lands in ``--out``: the caches, one directory per run (the trainer's
``metrics.jsonl``), ``eval_curves.png``, ``results.json`` and ``report.md``.

What is compared, all with the same student initialization, optimizer, schedule, seed and batch order
(every training cache holds the same token stream, so the reader yields the same batches):

- from the top-64 cache: CE only (no teacher), forward KL, reverse KL, skew KL, TAID, ATKD;
- forward KL from the top-8 and top-16 caches, which are *derived* from the top-64 one (see
  :func:`derive_topk_cache`), and from an RS-KD sampled cache (16 ids stored, 64 draws);
- forward KL against the live teacher's full distribution (``dense-online``), the reference the caches
  approximate, and the cost the cache avoids.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from transformers import AutoTokenizer

from kd_pipeline import read_cache
from kd_pipeline.cache.build import CacheConfig, cache_teacher
from kd_pipeline.cache.format.encodings import encoding_for
from kd_pipeline.cache.format.files import sha256_file, write_shard
from kd_pipeline.cache.format.layout import SHARD_DIR, TOKENIZER_DIR
from kd_pipeline.cache.format.manifest import CacheInfo, load_cache
from kd_pipeline.cache.format.rows import tail_mass
from kd_pipeline.models import resolve_device, resolve_dtype
from kd_pipeline.train import losses, trainer
from kd_pipeline.train.cross_tokenizer import TokenPieces, bits_per_byte
from kd_pipeline.train.metrics import METRICS_FILE, read_metrics
from kd_pipeline.train.plot import plot_runs
from kd_pipeline.train.reader import CacheReader
from kd_pipeline.train.trainer import CHECKPOINT_DIR, FINAL_DIR, DistillConfig, distill

ECE_BINS = 15
# Written last, so their presence means "finished": what --resume keeps after an interruption.
BUILD_RECORD = "build.json"  # in the caches folder: what they were built for and what each cost
SCORES_FILE = "scores.json"  # in a run's folder: its timings and held-out scores
DENSE = "dense"  # the loss name of the online reference run (not a trainer loss: see LiveDenseTeacher)


# ---------------------------------------------------------------------------------------------------
# Settings, material, runs


@dataclass(frozen=True)
class Settings:
    seq_len: int = 128
    batch_size: int = 4
    steps: int = 48
    eval_sequences: int = 16
    eval_every: int = 12
    lr: float = 5e-4
    warmup_steps: int = 5
    top_k: int = 64
    small_ks: tuple[int, ...] = (8, 16)
    sampled_k: int = 16
    num_samples: int = 16  # = sampled_k, so the draws always fit (see below)
    teacher_batch_size: int = 8
    seed: int = 0
    # Each extra seed reruns fkl and taid on the top-k cache with that trainer seed (another data order, same
    # caches): the spread between seeds is the noise the other differences are judged against.
    noise_seeds: int = 0
    device: str = "auto"
    # Cache encoding of every cache (cache/format/encodings/). The recorded tables used "exact" (fp16, format v2's
    # content); `--encoding compact` reruns them on the default encoding.
    encoding: str = "exact"
    # The compact encoding's support cut (--min-logprob of cache-teacher) on the training top-k cache and the
    # caches sliced from it; the held-out cache keeps its full top-k, so every run is scored on the same bins.
    min_logprob: float | None = None

    @property
    def train_sequences(self) -> int:
        # Exactly one epoch: every cached sequence is trained on once and no teacher time is wasted.
        return self.steps * self.batch_size


# RS-KD stores the distinct ids of N draws. If they outnumber the stored width k, the lightest become tail
# mass and the estimate is no longer unbiased. SmolLM2-135M on Moby Dick is high-entropy (3.6 nats, its
# top-64 holds 83% of the mass): 64 draws give 27 distinct ids on average and 72% of positions would drop
# ~20% of their mass at k=16, while 16 draws give 9.5 distinct ids and never overflow. So the sampled cache
# stores k=16 from 16 draws: the top-16 cache's width, exactly unbiased.

# Measured 28.6 minutes on 2 idle CPU cores: 10 runs x 48 steps of ~2.2 s (4 x 128 tokens, the dense run ~5.3 s)
# plus two teacher passes over 24.6k tokens at ~270 tokens/s (88 and 96 s).
FULL = Settings()
# CI-sized: seconds per run on the tiny test models, a few minutes on the real material.
QUICK = Settings(seq_len=64, batch_size=4, steps=16, eval_sequences=4, eval_every=8, warmup_steps=2)


@dataclass(frozen=True)
class Material:
    teacher: str
    student: str
    data: str
    eval_data: str


def default_material() -> Material:
    from bench import material

    return Material(
        teacher=str(material.teacher_dir()),
        student=str(material.student_dir()),
        data=str(material.corpus("moby-dick-train")),
        eval_data=str(material.corpus("moby-dick-heldout")),
    )


@dataclass(frozen=True)
class Run:
    name: str  # also the run's directory and its label in the plot
    cache: str  # key into the training caches
    loss: str  # a trainer loss, or DENSE
    seed_offset: int = 0  # added to Settings.seed for this run's trainer (data order)


def runs_for(settings: Settings, only: Sequence[str] | None = None) -> list[Run]:
    """Every run of the benchmark in its order, or those named in ``only`` in the order given (on a budget the
    runs that matter most go first: an interrupted benchmark keeps them, see --resume)."""
    top = f"top{settings.top_k}"
    runs = [Run(f"{loss}-{top}", top, loss) for loss in ("ce", "fkl", "rkl", "sfkl", "taid", "atkd")]
    runs += [Run(f"fkl-top{k}", f"top{k}", "fkl") for k in settings.small_ks]
    runs += [Run(f"fkl-sampled{settings.sampled_k}", f"sampled{settings.sampled_k}", "fkl")]
    runs += [Run("dense-online", top, DENSE)]  # reads only input_ids from the cache: the same batches
    for offset in range(1, settings.noise_seeds + 1):
        runs += [Run(f"{loss}-{top}-seed{settings.seed + offset}", top, loss, offset) for loss in ("fkl", "taid")]
    if only is None:
        return runs
    unknown = sorted(set(only) - {run.name for run in runs})
    if unknown:
        raise ValueError(f"unknown runs {unknown}; choose from {[run.name for run in runs]}")
    by_name = {run.name: run for run in runs}
    return [by_name[name] for name in dict.fromkeys(only)]


def _log(message: str) -> None:
    print(f"[quality] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------
# Caches


def derive_topk_cache(source: Path, out: Path, k: int) -> CacheInfo:
    """Write the top-``k`` cache of ``source`` (a top-K cache, K >= k) without running the teacher.

    The stored support is sorted by descending log-probability and the log-probabilities are normalized
    over the full vocabulary (not over the support), so the first k columns ARE the teacher's top-k: the
    same ids and the same fp16 values a ``--top-k k`` run would store, and the tail mass the reader
    derives from them is the top-k one. Shards keep their names, rows and row groups (so the reader plans
    the same chunks and batch order); their bytes and checksums are recomputed. With the ``exact`` encoding
    the shards are byte for byte those of a ``--top-k k`` run; ``compact`` re-encodes decoded values (each
    within the encoding's error bound of the teacher's, so within twice that).
    """
    info = load_cache(source)
    m = info.manifest
    if m.support != "topk" or not 1 <= k <= m.k:
        raise ValueError(f"can only slice a top-k cache to a smaller k; {source} is {m.support} with k={m.k}")
    shutil.rmtree(out, ignore_errors=True)
    (out / SHARD_DIR).mkdir(parents=True)
    shutil.copytree(Path(source) / TOKENIZER_DIR, out / TOKENIZER_DIR)
    shards = []
    sliced = dataclasses.replace(m, k=k)
    source_encoding, encoding = encoding_for(m), encoding_for(sliced)
    for entry in info.shards:
        rows = source_encoding.decode(pq.read_table(Path(source) / entry.name))
        rows = dataclasses.replace(rows, topk_ids=rows.topk_ids[..., :k], topk_logprobs=rows.topk_logprobs[..., :k])
        path = out / entry.name
        write_shard(rows, path, m.row_group_rows, encoding)
        shards.append(dataclasses.replace(entry, bytes=path.stat().st_size, sha256=sha256_file(path)))
    derived = dataclasses.replace(
        m,
        k=k,
        shards=shards,
        worker_index=0,
        num_workers=1,  # all shards now sit under one manifest
        backend={**m.backend, "derived_from": f"first {k} of the top-{m.k} columns of {source}"},
    )
    derived.save(out)
    return load_cache(out)


@dataclass
class Caches:
    train: dict[str, CacheInfo]  # those the runs read, of "top64", "top8", "top16", "sampled16"
    heldout: CacheInfo
    build_seconds: dict[str, float]
    reused: list[str] = dataclasses.field(default_factory=list)  # by --resume, from an earlier session


def caches_for(runs: Sequence[Run], s: Settings) -> list[str]:
    """The training caches ``runs`` read, in build order (a derived top-k cache needs the top-K one)."""
    top, small = f"top{s.top_k}", [f"top{k}" for k in s.small_ks]
    wanted = {run.cache for run in runs}
    if wanted & set(small):
        wanted.add(top)
    return [name for name in (top, *small, f"sampled{s.sampled_k}") if name in wanted]


def build_caches(material: Material, s: Settings, root: Path, names: Sequence[str], resume: bool = False) -> Caches:
    """The training caches ``names`` and the held-out one under ``root``. Each cache finished is recorded
    (with its build time) in BUILD_RECORD at once: ``resume`` keeps those of an interrupted benchmark with
    the same material and settings and builds only the missing ones."""
    top = f"top{s.top_k}"
    # The student plays no part in the caches: other students can reuse them (see --runs in the README).
    data = {key: value for key, value in dataclasses.asdict(material).items() if key != "student"}
    identity = json.loads(json.dumps({"material": data, "settings": dataclasses.asdict(s)}))
    record = root / BUILD_RECORD
    seconds: dict[str, float] = {}
    if resume and record.exists():
        saved = json.loads(record.read_text())
        if saved["identity"] != identity:
            raise RuntimeError(f"{root} was built for other material or settings; rerun without --resume")
        seconds = saved["build_seconds"]
        _log(f"--resume: reusing the caches {', '.join(seconds)} in {root} (build times from their first run)")
    else:
        record.unlink(missing_ok=True)
    reused = [name for name in [*names, "heldout"] if name in seconds]

    def teacher_pass(name: str, data: str, sequences: int, **options) -> None:
        cache_teacher(
            CacheConfig(
                teacher=material.teacher,
                data=data,
                out=root / name,
                seq_len=s.seq_len,
                max_sequences=sequences,
                batch_size=s.teacher_batch_size,
                device=s.device,
                overwrite=True,
                progress=False,
                encoding=s.encoding,
                **options,
            )
        )

    builders = {
        top: lambda: teacher_pass(top, material.data, s.train_sequences, top_k=s.top_k, min_logprob=s.min_logprob),
        **{
            f"top{k}": (lambda k=k: derive_topk_cache(root / top, root / f"top{k}", k))  # no teacher time
            for k in s.small_ks
        },
        # Sampling needs the teacher's full softmax, so it is a second teacher pass (it cannot be sliced).
        f"sampled{s.sampled_k}": lambda: teacher_pass(
            f"sampled{s.sampled_k}",
            material.data,
            s.train_sequences,
            top_k=s.sampled_k,
            support="sampled",
            num_samples=s.num_samples,
            sample_seed=s.seed,
        ),
        "heldout": lambda: teacher_pass("heldout", material.eval_data, s.eval_sequences, top_k=s.top_k),
    }
    for name in [*names, "heldout"]:
        if name in seconds:
            continue
        # Overwrite every time: the cache's one-time cost is one of the results, so it is always measured.
        started = time.perf_counter()
        builders[name]()
        seconds[name] = time.perf_counter() - started
        record.write_text(json.dumps({"identity": identity, "build_seconds": seconds}, indent=1) + "\n")

    train = {name: load_cache(root / name) for name in names}
    # The comparison is only fair if every run sees the same tokens in the same order.
    streams = {name: info.manifest.stream["sha256"] for name, info in train.items()}
    if len(set(streams.values())) > 1:
        raise RuntimeError(f"the training caches hold different token streams: {streams}")
    return Caches(train, load_cache(root / "heldout"), {name: seconds[name] for name in [*names, "heldout"]}, reused)


def sampled_support_stats(info: CacheInfo) -> dict:
    """How full the sampled support is: distinct ids per position, and how often the draws overflowed k
    (the lightest distinct ids then became tail mass, a small bias the top-k slots were sized to avoid)."""
    m = info.manifest
    distinct, tails = [], []
    for rows in read_cache(info):
        lp = rows.topk_logprobs[rows.loss_mask[:, 1:]]
        distinct.append(np.isfinite(lp).sum(-1))
        tails.append(tail_mass(lp))
    distinct, tail = np.concatenate(distinct), np.concatenate(tails)
    # fp16 rounding alone leaves tail masses of order 1e-3; a dropped draw weighs >= 1/num_samples.
    overflow = tail > 0.5 / m.sampling["num_samples"]
    return {
        "mean_distinct_ids": float(distinct.mean()),
        "positions_at_k": float((distinct == m.k).mean()),
        "overflow_fraction": float(overflow.mean()),
        "mean_tail_mass": float(tail.mean()),
    }


# ---------------------------------------------------------------------------------------------------
# Held-out evaluation against the live teacher, over the full vocabulary


class Scores:
    """Token-weighted sums over held-out positions: CE, KL(teacher‖student), top-1 agreement, and the
    reliability-diagram bins of the student's top-1 probability against the true next token (ECE)."""

    def __init__(self) -> None:
        self.tokens = 0
        self.ce = self.kl = self.agree = self.bytes = 0.0
        self.bin_confidence = np.zeros(ECE_BINS)
        self.bin_correct = np.zeros(ECE_BINS)

    def add(self, log_q: torch.Tensor, log_p: torch.Tensor, targets: torch.Tensor, target_bytes: float) -> None:
        """``log_q``, ``log_p`` [M, V] student and teacher log-probs at M positions; ``targets`` [M];
        ``target_bytes``: the bytes of text those M targets stand for (for bits per byte)."""
        # With the whole vocabulary as the support there is no rest bin: the project's forward KL is dense.
        self.kl += float(losses.forward_kl(log_p, log_q).sum())
        self.ce += float(losses.cross_entropy(log_q.gather(-1, targets[:, None]).squeeze(-1)).sum())
        confidence, top1 = log_q.max(-1)
        self.agree += float((top1 == log_p.argmax(-1)).sum())
        confidence = confidence.exp().double().cpu().numpy()
        correct = (top1 == targets).double().cpu().numpy()
        bins = np.minimum((confidence * ECE_BINS).astype(int), ECE_BINS - 1)
        self.bin_confidence += np.bincount(bins, confidence, minlength=ECE_BINS)
        self.bin_correct += np.bincount(bins, correct, minlength=ECE_BINS)
        self.tokens += int(targets.numel())
        self.bytes += target_bytes

    def result(self) -> dict:
        n = max(self.tokens, 1)
        # ECE = Σ_b (n_b / n)·|accuracy_b - confidence_b| = Σ_b |Σ_{i in b} (correct_i - confidence_i)| / n.
        ece = float(np.abs(self.bin_correct - self.bin_confidence).sum() / n)
        return {
            "ce": self.ce / n,
            "kl": self.kl / n,
            "top1": self.agree / n,
            "ece": ece,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "bpb": bits_per_byte(self.ce, self.bytes),  # the figure a student of another tokenizer is compared on
        }


class HeldOut:
    """The held-out sequences (those of the held-out cache, so the trainer's curves and this table score the
    same tokens) and the teacher's full-vocabulary log-probs there, computed once and reused for every
    student. They stay in host memory: eval tokens x vocab x 4 bytes (~0.4 GB at 16 x 127 x 49,152)."""

    def __init__(self, info: CacheInfo, teacher, batch_size: int, device: torch.device):
        self.device = device
        reader = CacheReader(info, batch_size, shuffle=False, drop_remainder=False, prefetch=0)
        self.batches = [(b["input_ids"], b["target_mask"]) for b in reader.iter_epoch(0)]
        pieces = TokenPieces.of(AutoTokenizer.from_pretrained(info.root / TOKENIZER_DIR))
        self.target_bytes = [float(pieces.text_bytes(ids[:, 1:][mask].numpy()).sum()) for ids, mask in self.batches]
        self.teacher_logprobs = [self.logprobs(teacher, ids, mask).cpu() for ids, mask in self.batches]

    @torch.no_grad()
    def logprobs(self, model, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """fp32 log-softmax over the vocabulary at the trained positions [M, V] (same slicing as the trainer)."""
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        logits = model(input_ids=input_ids[:, :-1], use_cache=False).logits[mask]
        return torch.log_softmax(logits.float(), dim=-1)

    def score(self, model) -> dict:
        model.eval()
        scores = Scores()
        for (ids, mask), log_p, n_bytes in zip(self.batches, self.teacher_logprobs, self.target_bytes):
            log_q = self.logprobs(model, ids, mask)
            scores.add(log_q, log_p.to(self.device), ids[:, 1:][mask].to(self.device), n_bytes)
        return scores.result()


def load_model(spec: str, device: torch.device, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(spec, dtype=dtype).to(device).eval()


# ---------------------------------------------------------------------------------------------------
# Online dense KD: the trainer's loop with the teacher's full distribution computed live


class LiveDenseTeacher(trainer.TeacherSignal):
    """The teacher signal of the online dense KD run: the live teacher's full-vocabulary distribution.

    Plugged into :func:`train.trainer.distill`, it shares everything else with the cached runs by construction:
    student loading, optimizer, schedule, batch order (the cache's input_ids; its teacher columns are ignored),
    the student forward, evaluation, metrics and timing. The run's loss (fkl) is applied to the full vocabulary
    instead of the k+1 bins; its kl and soft_ce are the full-vocabulary ones.
    """

    takes_fused_bins = False  # the full distribution needs the student's logits

    def __init__(self, teacher):
        self.teacher = teacher

    def loss(self, loss: losses.DistillLoss, student: trainer.StudentView) -> losses.KDLossOutput:
        with torch.no_grad(), student.autocast:
            teacher_logits = self.teacher(input_ids=student.input_ids[:, :-1], use_cache=False).logits
        log_p = torch.log_softmax(teacher_logits[student.mask].float(), dim=-1)
        log_q = torch.log_softmax(student.logits, dim=-1)
        bins = losses.Bins(log_p, log_q)  # every token its own bin
        batch = student.cached.flat()  # positions are already the trained ones
        kd = loss.divergence(bins, batch)
        ce = losses.masked_mean(
            losses.cross_entropy(log_q.gather(-1, batch.target_ids[:, None]).squeeze(-1)), batch.mask
        )
        with torch.no_grad():
            kl = losses.masked_mean(losses.forward_kl(log_p, log_q), batch.mask)
            soft_ce = losses.masked_mean(losses.soft_cross_entropy(log_p, log_q), batch.mask)
        return losses.KDLossOutput(loss.combine(kd, ce), kd, ce, kl, soft_ce)


# ---------------------------------------------------------------------------------------------------
# Training runs


def step_seconds(run_dir: Path, tokens_per_step: int) -> float:
    """Median wall time of one optimizer step, from the trainer's per-step ``tokens_per_s`` (log_every=1).

    The median, because the trainer's timing window after an eval or a checkpoint also holds that eval or
    save; those few steps would otherwise count evaluation as training time.
    """
    rates = [r["tokens_per_s"] for r in read_metrics(run_dir / METRICS_FILE) if "tokens_per_s" in r]
    return tokens_per_step / statistics.median(rates)


def train_run(run: Run, material: Material, caches: Caches, s: Settings, root: Path, teacher) -> dict:
    out = root / run.name
    shutil.rmtree(out, ignore_errors=True)  # distill refuses to overwrite a finished run
    cfg = DistillConfig(
        student=material.student,
        cache=caches.train[run.cache].root,
        out=out,
        loss="fkl" if run.loss == DENSE else run.loss,
        batch_size=s.batch_size,
        lr=s.lr,
        warmup_steps=s.warmup_steps,
        max_steps=s.steps,
        seed=s.seed + run.seed_offset,
        eval_cache=caches.heldout.root,
        eval_every=s.eval_every,
        eval_at_start=True,
        save_every=s.steps,
        keep_checkpoints=1,
        log_every=1,
        device=s.device,
        progress=False,
    )
    started = time.perf_counter()
    last = distill(cfg, teacher=LiveDenseTeacher(teacher) if run.loss == DENSE else None)
    seconds = time.perf_counter() - started
    shutil.rmtree(out / CHECKPOINT_DIR)  # ~0.6 GB of optimizer state per real run; only final/ is scored
    return {
        "run_seconds": seconds,
        "step_seconds": step_seconds(out, s.batch_size * (s.seq_len - 1)),
        "trainer_eval_kl": last.get("eval_kl"),  # KL on the held-out cache's k+1 bins (the curves)
    }


# ---------------------------------------------------------------------------------------------------
# The benchmark


def run_benchmark(
    material: Material,
    s: Settings,
    out: Path,
    keep_students: bool = False,
    resume: bool = False,
    only: Sequence[str] | None = None,
) -> dict:
    """Build the caches, train and score every run, plot; returns (and writes) results.json's content.

    ``resume``: keep the caches and the finished runs of an interrupted benchmark with the same material and
    settings (their timings then come from another session: the report lists the runs kept); the caches
    are kept for another student too. ``only``: the names of the runs to train (default: all).
    """
    runs = runs_for(s, only)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(s.device)
    started = time.perf_counter()
    # Timings on a shared machine depend on what else runs: keep the 1-minute load average around the runs.
    load = {"start": os.getloadavg()[0]}
    _log(f"settings: {json.dumps(dataclasses.asdict(s))}")
    caches = build_caches(material, s, out / "caches", caches_for(runs, s), resume)

    # The teacher the caches were built with (same device and dtype rule as the HF backend).
    teacher = load_model(material.teacher, device, resolve_dtype("auto", device))
    heldout = HeldOut(caches.heldout, teacher, s.batch_size, device)
    student = trainer.load_student(material.student, caches.heldout, s.seed).to(device)
    reference = {"teacher": heldout.score(teacher), "student-untrained": heldout.score(student)}
    # The online/cached step-time ratio is bounded by the teacher's size relative to the student's.
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in (("teacher", teacher), ("student", student))}
    del student

    results, kept = {}, []
    for run in runs:
        done = out / "runs" / run.name / SCORES_FILE
        if resume and done.exists():
            results[run.name] = json.loads(done.read_text())
            kept.append(run.name)
            _log(f"run {run.name}: finished before, kept (--resume)")
            continue
        _log(f"run {run.name}: loss {run.loss}, cache {run.cache}")
        timing = train_run(run, material, caches, s, out / "runs", teacher)
        final = out / "runs" / run.name / FINAL_DIR
        results[run.name] = {**dataclasses.asdict(run), **timing, **heldout.score(load_model(str(final), device))}
        if not keep_students:
            shutil.rmtree(final)
        done.write_text(json.dumps(results[run.name], indent=1) + "\n")
        _log(f"  {json.dumps(results[run.name])}")

    plot = plot_runs(
        [out / "runs" / r.name for r in runs], out / "eval_curves.png", ("eval_ce", "eval_kl", "eval_top1")
    )
    report = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(device),
        "material": dataclasses.asdict(material),
        "settings": dataclasses.asdict(s),
        "caches": {
            name: {
                "k": info.manifest.k,
                "support": info.manifest.support,
                "tokens": info.num_tokens,
                "bytes": info.num_bytes,
                "bytes_per_token": info.num_bytes / info.num_tokens,
                "build_seconds": caches.build_seconds[name],
                "sampling": info.manifest.sampling,
            }
            for name, info in {**caches.train, "heldout": caches.heldout}.items()
        },
        "sampled_support": (
            sampled_support_stats(caches.train[sampled])
            if (sampled := f"sampled{s.sampled_k}") in caches.train
            else None
        ),
        "reference": reference,
        "runs": results,
        "speed": speed(results, caches, s),
        "params": params,
        "plot": str(plot),
        "total_seconds": time.perf_counter() - started,
        "load_average": {**load, "end": os.getloadavg()[0]},
        "resumed": {"caches": caches.reused, "runs": kept},
    }
    (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def speed(results: dict, caches: Caches, s: Settings) -> dict | None:
    """Cached vs online step time and the cache's break-even; None unless both FKL runs were trained."""
    if f"fkl-top{s.top_k}" not in results or "dense-online" not in results:
        return None
    cached = results[f"fkl-top{s.top_k}"]["step_seconds"]
    online = results["dense-online"]["step_seconds"]
    cache_seconds = caches.build_seconds[f"top{s.top_k}"]
    saved_per_run = (online - cached) * s.steps
    return {
        "cached_step_seconds": cached,
        "online_step_seconds": online,
        "online_over_cached": online / cached,
        "cache_build_seconds": cache_seconds,
        "cache_teacher_tokens_per_s": caches.train[f"top{s.top_k}"].num_tokens / cache_seconds,
        # Student runs (of this length) after which building the cache has cost less than running the
        # teacher inside every run; None if the online run is not slower (results.json stays strict JSON).
        "break_even_runs": cache_seconds / saved_per_run if saved_per_run > 0 else None,
    }


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} x {cpu} (torch threads {torch.get_num_threads()}), torch {torch.__version__}, CPU only"


# ---------------------------------------------------------------------------------------------------
# Report


def quick_failures(report: dict) -> list[str]:
    """What --quick asserts: every run produced finite scores and KD beat CE-only on full-vocab KL."""
    s = report["settings"]
    runs = report["runs"]
    failures = [
        f"{name}: non-finite scores {r}"
        for name, r in runs.items()
        if not all(math.isfinite(r[key]) for key in ("ce", "kl", "top1", "ece"))
    ]
    fkl, ce = runs[f"fkl-top{s['top_k']}"]["kl"], runs[f"ce-top{s['top_k']}"]["kl"]
    if not fkl < ce:
        failures.append(f"the FKL student is not closer to the teacher than the CE-only one (KL {fkl:.4f} >= {ce:.4f})")
    return failures


def resumed_note(resumed: dict) -> str:
    if not resumed["caches"] and not resumed["runs"]:
        return "."
    caches = f"the caches {', '.join(resumed['caches'])}" if resumed["caches"] else "no cache"
    runs = f"the runs {', '.join(resumed['runs'])}" if resumed["runs"] else "no run"
    return f" (--resume: {caches} and {runs} come from an earlier session, under another load)."


def format_report(r: dict) -> str:
    s, sp, params = r["settings"], r["speed"], r["params"]
    lines = [
        f"Date: {r['date']}. Machine: {r['machine']}; 1-minute load average {r['load_average']['start']:.1f} at the "
        f"start, {r['load_average']['end']:.1f} at the end. Total wall time {r['total_seconds'] / 60:.1f} min"
        + resumed_note(r["resumed"]),
        "",
        f"Teacher `{Path(r['material']['teacher']).name}`, student `{Path(r['material']['student']).name}`; "
        f"train `{Path(r['material']['data']).name}`, held-out `{Path(r['material']['eval_data']).name}`.",
        f"Every run: {s['steps']} steps x {s['batch_size']} x {s['seq_len']} tokens (one epoch of "
        f"{s['steps'] * s['batch_size']} cached sequences, same order), AdamW lr {s['lr']:g}, {s['warmup_steps']} "
        f"warmup steps then cosine, seed {s['seed']}; held-out: {s['eval_sequences']} x {s['seq_len']} tokens.",
        "",
        "| run | teacher signal | eval CE | bits/byte | KL(T‖S) full vocab | top-1 agree | ECE | KL k+1 bins (trainer) "
        "| dense KD's KL gain recovered | CE vs dense KD | s/step | run s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, ref in r["reference"].items():
        lines.append(
            f"| {name} | - | {ref['ce']:.3f} | {ref.get('bpb', math.nan):.4f} | {ref['kl']:.4f} | {ref['top1']:.3f} "
            f"| {ref['ece']:.3f} | | | | | |"
        )
    ce_run, dense = r["runs"].get(f"ce-top{s['top_k']}"), r["runs"].get("dense-online")
    for name, run in r["runs"].items():
        signal = (
            "live, full vocab"
            if run["loss"] == DENSE
            else ("none (true tokens)" if run["loss"] == "ce" else run["cache"])
        )
        # The fraction of online dense KD's improvement over CE-only (in full-vocabulary KL) this run achieves.
        recovered = (
            (ce_run["kl"] - run["kl"]) / (ce_run["kl"] - dense["kl"])
            if ce_run and dense and ce_run["kl"] != dense["kl"]
            else None
        )
        versus = run["ce"] / dense["ce"] - 1 if dense else None
        lines.append(
            f"| {name} | {signal} | {run['ce']:.3f} | {run.get('bpb', math.nan):.4f} | {run['kl']:.4f} | {run['top1']:.3f} "
            f"| {run['ece']:.3f} | {run['trainer_eval_kl']:.4f} | {'' if recovered is None else f'{recovered:.0%}'} "
            f"| {'' if versus is None else f'{versus:+.2%}'} | {run['step_seconds']:.2f} | {run['run_seconds']:.0f} |"
        )
    lines += [
        "",
        f"Full-vocab scores on {r['reference']['teacher']['tokens']:,} held-out tokens against the teacher's own "
        f"forward pass; ECE: {ECE_BINS} equal-width bins of the top-1 probability vs the true next token. "
        f"The trainer's KL is on the held-out cache's top-{s['top_k']} + rest bins (a lower bound of the full KL). "
        "s/step: median optimizer-step wall time; run s: the whole run with its evaluations and saves.",
    ]
    if sp is not None:
        lines += ["", speed_paragraph(sp, params, s)]
    lines += [
        "",
        "| cache | support | k | tokens | bytes | B/token | build s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, c in r["caches"].items():
        support = c["support"] + (
            f" ({c['sampling']['num_samples']} draws, T={c['sampling']['temperature']:g})" if c["sampling"] else ""
        )
        lines.append(
            f"| {name} | {support} | {c['k']} | {c['tokens']:,} | {c['bytes']:,} | {c['bytes_per_token']:.1f} | "
            f"{c['build_seconds']:.1f} |"
        )
    ss, derived = r["sampled_support"], [name for name in r["caches"] if name in {f"top{k}" for k in s["small_ks"]}]
    if ss is not None:
        lines += [
            "",
            f"Sampled support: {ss['mean_distinct_ids']:.1f} distinct ids per position on average, "
            f"{100 * ss['positions_at_k']:.1f}% of positions fill all {s['sampled_k']} slots, "
            f"{100 * ss['overflow_fraction']:.2f}% drew more distinct ids than fit (mean tail mass "
            f"{ss['mean_tail_mass']:.2e}).",
        ]
    if derived:
        lines += [
            "",
            f"Derived caches ({', '.join(derived)}) are the first k columns of the top-{s['top_k']} cache: no teacher time.",
        ]
    return "\n".join(lines) + "\n"


def speed_paragraph(sp: dict, params: dict, s: dict) -> str:
    ratio = params["teacher"] / params["student"]
    return (
        f"Speed: cached FKL step {sp['cached_step_seconds']:.2f} s, online dense-KD step "
        f"{sp['online_step_seconds']:.2f} s: online/cached = {sp['online_over_cached']:.2f}x, with a teacher of "
        f"{params['teacher'] / 1e6:.1f}M parameters and a student of {params['student'] / 1e6:.1f}M "
        f"({ratio:.1f}x). On compute alone the ratio is about 1 + {ratio:.1f}/3 = {1 + ratio / 3:.2f}x (a training "
        "step costs ~3 student forwards, the online one adds a teacher forward; for these decoders the "
        "parameter count is the per-token work). "
        f"The top-{s['top_k']} cache cost {sp['cache_build_seconds']:.0f} s once "
        f"({sp['cache_teacher_tokens_per_s']:,.0f} teacher tokens/s, model load included); "
        + (
            f"it pays for itself after {sp['break_even_runs']:.2f} student runs of {s['steps']} steps."
            if sp["break_even_runs"] is not None
            else "the online run was not slower here, so it never pays for itself in time."
        )
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized smoke run; exit 1 unless KD beats CE-only")
    parser.add_argument(
        "--teacher", help="teacher HF dir or hub id (default: SmolLM2-135M-Instruct from bench.material)"
    )
    parser.add_argument(
        "--student", help="student HF dir or hub id, same tokenizer (default: the teacher's 6-layer cut)"
    )
    parser.add_argument(
        "--data", help="training data, any format cache-teacher reads (default: Moby Dick minus held-out)"
    )
    parser.add_argument("--eval-data", help="held-out data, never cached for training (default: every 10th chapter)")
    parser.add_argument("--out", type=Path, help="output directory (default: runs/quality or runs/quality-quick)")
    for field in dataclasses.fields(Settings):
        if field.name != "small_ks":
            kind = float if field.default is None else type(field.default)  # the optional settings are floats
            parser.add_argument(
                f"--{field.name.replace('_', '-')}",
                type=kind,
                help=f"(default: {field.default}; quick: {getattr(QUICK, field.name)})",
            )
    parser.add_argument("--keep-students", action="store_true", help="keep each run's final/ student")
    parser.add_argument("--resume", action="store_true", help="keep the caches and finished runs of an interrupted run")
    parser.add_argument(
        "--runs",
        help="comma-separated run names to train, in this order (default: all): e.g. fkl-top64,dense-online for the speed "
        "comparison alone; with --resume and a copy of caches/ in --out, another student reuses the caches",
    )
    args = parser.parse_args(argv)

    given = [args.teacher, args.student, args.data, args.eval_data]
    if any(given) and not all(given):
        parser.error("give all of --teacher, --student, --data and --eval-data, or none (the offline material)")
    material = Material(*given) if all(given) else default_material()
    base = QUICK if args.quick else FULL
    overrides = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(Settings) if getattr(args, f.name, None) is not None
    }
    settings = dataclasses.replace(base, **overrides)
    out = args.out or Path("runs") / ("quality-quick" if args.quick else "quality")
    only = args.runs.split(",") if args.runs else None
    try:
        runs_for(settings, only)
    except ValueError as error:
        parser.error(str(error))
    if args.quick and only is not None and not {f"ce-top{settings.top_k}", f"fkl-top{settings.top_k}"} <= set(only):
        parser.error(f"--quick compares ce-top{settings.top_k} with fkl-top{settings.top_k}: keep both in --runs")

    report = run_benchmark(material, settings, out, keep_students=args.keep_students, resume=args.resume, only=only)
    text = format_report(report)
    (out / "report.md").write_text(text)
    print(text)
    if args.quick:
        failures = quick_failures(report)
        for failure in failures:
            print(f"FAIL: {failure}", file=sys.stderr)
        return 1 if failures else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
