"""Training-step benchmark: what a sparse-KD step costs over a CE-only step, same student, same batch.

    python -m bench.bench_step [--batch 4] [--seq-len 256] [--k 64] [--layers 6] [--repeats 5]
                               [--threads N] [--loss-only] [--profile]

Everything goes through the project's own code path, ``train.trainer.batch_losses`` with a
``DistillConfig`` (student forward, the loss from ``losses.build_loss``), followed by what ``trainer.distill`` does
per optimizer step: backward, gradient clipping, AdamW step, zero_grad. Only the loss name changes
between the rows, so the ratio KD/CE is the whole price of distilling instead of pre-training.

- Student: SmolLM2-135M's architecture (vocab 49,152, hidden 576, 9 heads / 3 kv heads, tied
  embeddings) cut to ``--layers`` decoder layers, random init (timing does not depend on the weights).
- Batch: the reader's batch format (``train.reader.CacheReader``): ``--batch`` sequences of
  ``--seq-len + 1`` tokens, every target trained, k teacher ids/log-probs per position stored as fp16.
  The teacher is ``log_softmax`` of Gaussian logits with standard deviation ``TEACHER_LOGIT_STD``
  (top-1 ~0.4, top-64 mass ~0.9, like a small real LM), and each next token is drawn from it, so the
  target log-probs and ATKD's easy/hard split look like real data.
- fp32 on CPU with torch's default thread count (as ``pipeline distill`` runs there), or ``--threads``.
  On a machine shared with other jobs, ``--threads 1`` times the loss alone more faithfully: a
  multi-threaded op then waits at its barrier for a thread that another process has descheduled, which
  adds milliseconds to each of the loss's many small [N, k] ops.

Sections printed (Markdown tables for bench/RESULTS.md):

1. Step time per loss: median (and min) over ``--repeats`` steps, the loss rows interleaved
   round-robin so that load from other processes hits every row alike; KD/CE is the median over rounds
   of the ratio to the ``ce`` step of the same round.
2. The loss alone: forward + backward of the loss (``losses.build_loss(name)``) on fixed [N, V] logits, and of its
   student side (``losses.student_bins``, the only part that touches all V columns), which is
   where any KD overhead over CE must come from.

``--profile`` adds torch.profiler's top operators for one forward+backward of each KD loss alone.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.common import cpu_model
from kd_pipeline.train import losses
from kd_pipeline.train.trainer import DistillConfig, batch_losses

KD_LOSSES = ("fkl", "taid", "atkd")
BASELINE = "ce"
GOAL_RATIO = 1.15
# Gaussian logits with this standard deviation over 49,152 ids give a teacher whose top-1 probability
# averages ~0.39 and whose top-64 mass averages ~0.92 (min ~0.76): peaked, with a real tail.
TEACHER_LOGIT_STD = 5.0
# SmolLM2-135M (HuggingFaceTB/SmolLM2-135M config.json), only the depth is cut.
SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
)


def build_student(layers: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, **SMOLLM2_135M))
    return model.train()


def synthetic_batch(batch: int, seq_len: int, k: int, vocab: int, seed: int = 0) -> tuple[dict, dict]:
    """One batch in CacheReader's format, and a few statistics of its teacher."""
    gen = torch.Generator().manual_seed(seed)
    n = batch * seq_len
    teacher = torch.log_softmax(torch.randn(n, vocab, generator=gen) * TEACHER_LOGIT_STD, dim=-1)
    topk = teacher.topk(k, dim=-1)  # sorted descending, as cached
    next_tokens = torch.multinomial(teacher.exp(), 1, generator=gen).squeeze(-1)  # text the teacher would write
    first = torch.randint(0, vocab, (batch, 1), generator=gen)
    stats = {
        "top1_mass": topk.values[:, 0].exp().mean().item(),
        "topk_mass": topk.values.exp().sum(-1).mean().item(),
        "target_in_topk": (topk.indices == next_tokens[:, None]).any(-1).float().mean().item(),
    }
    reader_batch = {
        "input_ids": torch.cat([first, next_tokens.view(batch, seq_len)], dim=1),
        "target_mask": torch.ones(batch, seq_len, dtype=torch.bool),
        "topk_ids": topk.indices.view(batch, seq_len, k).to(torch.int32),  # as the reader hands them over
        "topk_logprobs": topk.values.half().view(batch, seq_len, k),
        "target_logprob": teacher.gather(-1, next_tokens[:, None]).half().view(batch, seq_len),
        "seq_ids": torch.arange(batch),
    }
    return reader_batch, stats


def time_interleaved(fns: dict[str, Callable[[], None]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each fn, calls interleaved round-robin (fair under a drifting machine load)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def step_fns(model, batch: dict, names: tuple[str, ...]) -> dict[str, Callable[[], None]]:
    """One full optimizer step per loss name, as trainer.distill does it (grad_accum 1, one process)."""
    device = torch.device("cpu")
    autocast = torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=False)  # fp32, as on CPU
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.01)

    def make(name: str) -> Callable[[], None]:
        cfg = DistillConfig(student="-", cache=Path("-"), out=Path("-"), loss=name)  # paths unused here
        loss = losses.build_loss(name, cfg)

        def step() -> None:
            parts = batch_losses(model, batch, cfg, loss, device, autocast)
            parts.total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    return {name: make(name) for name in names}


def kd_batch(batch: dict) -> losses.KDBatch:
    """The teacher side as trainer._teacher_at builds it (every position trained here)."""
    return losses.KDBatch(
        support_ids=batch["topk_ids"].long(),  # as trainer._teacher_at widens them
        teacher_logprobs=batch["topk_logprobs"],
        mask=batch["target_mask"],
        target_ids=batch["input_ids"][:, 1:],
        teacher_target_logprob=batch["target_logprob"],
    ).flat()


def loss_fns(batch: dict, vocab: int, names: tuple[str, ...]) -> dict[str, Callable[[], None]]:
    """Forward + backward of the loss alone on fixed fp32 logits [N, V] (leaf: no model in the way)."""
    teacher = kd_batch(batch)
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(teacher.mask.numel(), vocab, generator=gen) * TEACHER_LOGIT_STD).requires_grad_(True)

    def make(run: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def fn() -> None:
            run().backward()
            logits.grad = None

        return fn

    fns = {name: make(lambda loss=losses.build_loss(name): loss(teacher, logits).total) for name in names}

    def bins_only() -> torch.Tensor:
        bins = losses.student_bins(logits, teacher.support_ids, teacher.target_ids)
        return bins.log_q_support.sum() + bins.log_q_rest.sum() + bins.log_q_target.sum()

    fns["student_bins"] = make(bins_only)
    fns["F.cross_entropy"] = make(
        lambda: torch.nn.functional.cross_entropy(logits, teacher.target_ids)  # the dense reference
    )
    return fns


def profile_losses(batch: dict, vocab: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    fns = loss_fns(batch, vocab, KD_LOSSES)
    for name in KD_LOSSES:
        fns[name]()  # warm
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fns[name]()
        print(f"\n### torch.profiler: {name} loss alone, forward + backward\n")
        print("```")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
        print("```")


def machine() -> str:
    cpu = cpu_model()
    return f"{os.cpu_count()} cores ({cpu}), torch {torch.__version__}, {torch.get_num_threads()} threads"


def load_average() -> str:
    """Other processes' load: on a shared machine it stretches every row (the ratios stay fair: interleaved)."""
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256, help="trained positions per sequence")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds (each runs every loss once)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--loss-repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    ap.add_argument("--loss-only", action="store_true", help="skip the (slow) full training steps")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    vocab = SMOLLM2_135M["vocab_size"]
    batch, stats = synthetic_batch(args.batch, args.seq_len, args.k, vocab)
    n = args.batch * args.seq_len
    print(f"{machine()}; load average at the start: {load_average()}")
    print(
        f"student: SmolLM2-135M architecture, {args.layers} layers, fp32; batch {args.batch} x {args.seq_len} "
        f"= {n} positions; k = {args.k}; teacher top-1 {stats['top1_mass']:.2f}, top-{args.k} mass "
        f"{stats['topk_mass']:.2f}, target in top-{args.k} {stats['target_in_topk']:.2f}\n"
    )

    names = (BASELINE,) + KD_LOSSES
    loss_times = time_interleaved(loss_fns(batch, vocab, names), warmup=1, repeats=args.loss_repeats)
    base_loss = statistics.median(loss_times[BASELINE])
    base = None
    if not args.loss_only:
        model = build_student(args.layers)
        step_times = time_interleaved(step_fns(model, batch, names), args.warmup, args.repeats)
        base = statistics.median(step_times[BASELINE])
        print(f"### Step: forward + loss + backward + clip + AdamW ({args.repeats} interleaved repeats)\n")
        print(f"| loss | median step (s) | min step (s) | KD/CE (median of per-round ratios) | goal <= {GOAL_RATIO} |")
        print("|---|---:|---:|---:|---|")
        for name in names:
            # Each round runs every loss back to back: the ratio within a round cancels slow drifts in load.
            ratio = statistics.median(t / b for t, b in zip(step_times[name], step_times[BASELINE]))
            verdict = "" if name == BASELINE else ("ok" if ratio <= GOAL_RATIO else "ABOVE")
            med = statistics.median(step_times[name])
            print(f"| {name} | {med:.3f} | {min(step_times[name]):.3f} | {ratio:.3f} | {verdict} |")
        print()

    print(f"### The loss alone: forward + backward on fixed [{n}, {vocab}] fp32 logits ({args.loss_repeats} repeats)\n")
    print("| part | median (ms) | min (ms) | over ce (ms) | share of the ce step |")
    print("|---|---:|---:|---:|---:|")
    for name, times in loss_times.items():
        med = statistics.median(times)
        share = f"{med / base:.1%}" if base else "-"
        print(f"| {name} | {med * 1e3:.0f} | {min(times) * 1e3:.0f} | {(med - base_loss) * 1e3:+.0f} | {share} |")
    print(f"\nload average (1, 5, 15 min) at the end: {load_average()}")

    if args.profile:
        profile_losses(batch, vocab)


if __name__ == "__main__":
    main()
