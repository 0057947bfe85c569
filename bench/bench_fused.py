"""Fused-loss benchmark (issue 6): the sparse KD loss from hidden states vs from full logits.

    python -m bench.bench_fused [--vocab 32768 131072] [--positions 4096 16384] [--hidden 576] [--k 64]
                                [--chunk-size 4096] [--max-seconds 60] [--append bench/RESULTS.md]

For each vocabulary size V and number of positions N, one forward + backward of the loss (forward KL on the k+1
bins plus the CE term, as `pipeline distill --loss fkl --ce-weight 0.1` computes it) from hidden states h [N, d]
and an output layer W [V, d], by both paths:

- logits: ``z = h @ W.T`` ([N, V] fp32), then the fkl loss on ``z``: the trainer's default;
- fused: ``fused.fused_student_bins(h, W, ...)`` in vocabulary chunks, then the fkl loss on ``student=bins``.

Peak extra memory is what the step allocates above its inputs (h, W and the teacher data), the gradients of h and
W included (any path needs those: W's is V·d·4 bytes). On CUDA it is ``torch.cuda.max_memory_allocated``; on CPU
torch's allocations are invisible to tracemalloc, and peak RSS mixes in the C allocator's page reuse, so it is the
allocator's running total as torch's memory profiler reports it. Each measurement runs in a fresh process. Time is
the best of ``--repeats`` steps after a warm-up (5 on CUDA, 2 on CPU, where these are slow).

On a small CPU the requested sizes can take minutes per step or not fit in memory: N is then halved until an
estimate (from a quick matmul calibration, and a generous 6 [N, V] fp32 buffers for the logits path) fits
``--max-seconds`` and 60% of the available memory, and the table says so. Time and the memory beyond the gradients
scale about linearly in N, so their ratios carry over to the sizes asked for; W's gradient does not grow with N, so
the ratio with the gradients included grows with N.

What to expect: the fused path multiplies by W four times (forward, and in the backward the recomputed logits,
``dz @ W`` and ``dz.T @ h``) where the logits path does three, so where the products dominate the step (a CPU) it
is up to 4/3 slower; its elementwise work is about the logits path's, in chunk-sized pieces.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import cpu_model
from kd_pipeline.train import fused, losses

CE_WEIGHT = 0.1
# The logits path holds about this many [N, V] fp32 buffers at its peak (the logits, the complement copy and the
# softmax-shaped temporaries of log-sum-exp and its backward): used only to decide what fits.
LOGITS_PATH_BUFFERS = 6


# ---------------------------------------------------------------------------------------------------------------
# One measurement (run in its own process)


def make_inputs(n: int, vocab: int, d: int, k: int, device: torch.device, seed: int = 0):
    """Student head inputs and a teacher batch with a realistic spread of logits (std ~2) and tail (~10%)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(n, d, generator=gen).to(device).requires_grad_(True)
    w = (torch.randn(vocab, d, generator=gen) * (2.0 / math.sqrt(d))).to(device).requires_grad_(True)
    # Distinct ids per row without an [N, V] tensor: a random offset plus evenly spaced ids.
    base = torch.randint(0, vocab, (n, 1), generator=gen)
    ids = (base + torch.arange(k) * (vocab // k)) % vocab
    logprobs = torch.log_softmax(torch.randn(n, k, generator=gen) * 2.0, -1) + math.log(0.9)
    batch = losses.KDBatch(
        support_ids=ids.to(device),
        teacher_logprobs=logprobs.half().to(device),
        mask=torch.ones(n, dtype=torch.bool, device=device),
        target_ids=torch.randint(0, vocab, (n,), generator=gen).to(device),
        teacher_target_logprob=(-torch.rand(n, generator=gen) * 5).half().to(device),
    )
    return h, w, batch


def loss_step(method: str, h, w, batch, chunk: int) -> float:
    """Forward + backward of the loss; returns the loss value."""
    if method == "logits":
        out = losses.build_loss("fkl", ce_weight=CE_WEIGHT)(batch, h @ w.T)
    else:
        bins = fused.fused_student_bins(h, w, batch.support_ids, batch.target_ids, chunk_size=chunk)
        out = losses.build_loss("fkl", ce_weight=CE_WEIGHT)(batch, student=bins)
    out.total.backward()
    return out.total.item()


def cpu_peak_allocated(step) -> int:
    """Peak bytes that torch allocates on the CPU while ``step()`` runs, above what was allocated before.

    tracemalloc cannot see torch's allocations and peak RSS is blurred by the C allocator (pages reused from
    earlier frees, arenas): torch's memory profiler reports every allocation with the allocator's running total.
    """
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = [e["args"] for e in json.loads(trace.read_text())["traceEvents"] if e.get("name") == "[memory]"]
    events = [e for e in events if e.get("Device Type") == 0]
    if not events:
        return 0
    before = events[0]["Total Allocated"] - events[0]["Bytes"]
    return max(e["Total Allocated"] for e in events) - before


def worker(method: str, n: int, vocab: int, d: int, k: int, chunk: int, repeats: int) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    h, w, batch = make_inputs(n, vocab, d, k, device)
    # One small step first: thread pools, kernel selection and other one-time costs stay out of the numbers.
    few = losses.KDBatch(**{k: v[:64] for k, v in vars(batch).items() if v is not None})
    loss_step(method, h[:64].detach().requires_grad_(True), w, few, chunk)
    h.grad = w.grad = None

    def step():
        value = loss_step(method, h, w, batch, chunk)
        h.grad = w.grad = None
        return value

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = cpu_peak_allocated(step)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        value = step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    grads = (h.numel() + w.numel()) * h.element_size()  # what any path must return: dL/dh and dL/dW
    # Best of the repeats: the step's own cost, least disturbed by whatever else the machine is doing.
    return {"peak_extra": peak, "grads": grads, "seconds": min(times), "loss": value}


def measure(method: str, n: int, vocab: int, d: int, k: int, chunk: int, repeats: int) -> dict:
    """:func:`worker` in a fresh process, so one measurement's allocations cannot hide in another's peak."""
    cmd = [
        sys.executable,
        "-m",
        "bench.bench_fused",
        "--worker",
        method,
        "--positions",
        str(n),
        "--vocab",
        str(vocab),
        "--hidden",
        str(d),
        "--k",
        str(k),
        "--chunk-size",
        str(chunk),
        "--repeats",
        str(repeats),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["killed"])[-1][:120]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------------
# Planning on a small machine


def matmul_flops_per_s() -> float:
    a, b = torch.randn(1024, 576), torch.randn(576, 8192)
    a @ b
    start = time.perf_counter()
    for _ in range(3):
        a @ b
    return 3 * 2 * a.shape[0] * a.shape[1] * b.shape[1] / (time.perf_counter() - start)


def plan_positions(n: int, vocab: int, d: int, max_seconds: float, flops: float, avail: int) -> int:
    """Largest N' = n / 2^j whose slower path (the fused one: four N·V·d products, plus elementwise work taken as
    as much again) fits ``max_seconds`` and whose logits path fits 60% of ``avail`` bytes."""
    while n > 256:
        seconds = 2 * 4 * 2 * n * vocab * d / flops
        memory = LOGITS_PATH_BUFFERS * n * vocab * 4
        if seconds <= max_seconds and memory <= 0.6 * avail:
            break
        n //= 2
    return n


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpu = cpu_model()
    # Other work on the machine inflates CPU timings (the memory figures are exact): say how busy it was.
    load = os.getloadavg()[0]
    return f"{cpu}, {torch.get_num_threads()} threads, load average {load:.1f}, torch {torch.__version__} (CPU)"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--positions", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=fused.DEFAULT_CHUNK_SIZE)
    parser.add_argument("--repeats", type=int, help="timed steps per measurement (default 5 on CUDA, 2 on CPU)")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="CPU: scale N down past this est. step time")
    parser.add_argument("--append", type=Path, help="append the table as a section to this Markdown file")
    parser.add_argument("--worker", choices=["logits", "fused"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        n, vocab = args.positions[0], args.vocab[0]
        print(json.dumps(worker(args.worker, n, vocab, args.hidden, args.k, args.chunk_size, args.repeats or 1)))
        return

    cuda = torch.cuda.is_available()
    repeats = args.repeats or (5 if cuda else 2)
    flops = matmul_flops_per_s() if not cuda else float("inf")
    avail = (
        torch.cuda.mem_get_info()[0]
        if cuda
        else int(re.search(r"MemAvailable:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) * 1024
    )
    header = (
        "| V | N (asked) | peak extra: logits | fused | ratio | beyond the grads: logits | fused | ratio "
        "| fwd+bwd: logits | fused | fused/logits |\n" + "|---:" * 11 + "|"
    )
    rows, notes, scaled = [header], [], False
    print(header, flush=True)
    for vocab in args.vocab:
        seen = set()
        for asked in args.positions:
            n = asked if cuda else plan_positions(asked, vocab, args.hidden, args.max_seconds, flops, avail)
            if n in seen:
                notes.append(f"V={vocab}, N={asked}: skipped, it scales down to the N={n} already measured")
                continue
            seen.add(n)
            scaled |= n != asked
            # Fused first: a failure of the logits path (out of memory) must not cost the fused measurement.
            f = measure("fused", n, vocab, args.hidden, args.k, args.chunk_size, repeats)
            lg = measure("logits", n, vocab, args.hidden, args.k, args.chunk_size, repeats)
            rows.append(_row(vocab, n, asked, lg, f))
            print(rows[-1], flush=True)
            if "loss" in lg and "loss" in f and not math.isclose(lg["loss"], f["loss"], rel_tol=1e-4):
                notes.append(f"V={vocab}, N={n}: losses differ ({lg['loss']:.6g} vs {f['loss']:.6g})")
    if scaled:
        notes.append(
            f"N was scaled down where the estimated step exceeded {args.max_seconds:.0f} s or the logits path "
            f"{LOGITS_PATH_BUFFERS} x N x V x 4 bytes exceeded 60% of the {avail / 2**30:.1f} GiB available "
            f"(matmul calibration: {flops / 1e9:.0f} GFLOP/s)"
        )
    for note in notes:
        print(f"note: {note}")
    if args.append is not None:
        _append(args, rows, notes, repeats, cuda)


def _mib(x: int) -> str:
    return f"{x / 2**20:,.0f} MiB"


def _row(vocab: int, n: int, asked: int, lg: dict, f: dict) -> str:
    cells = [f"{vocab // 1024}k", f"{n}" if n == asked else f"{n} ({asked})"]
    ok = "error" not in lg and "error" not in f
    for memory in (lambda r: r["peak_extra"], lambda r: r["peak_extra"] - r["grads"]):
        for r in (lg, f):
            cells.append(r["error"] if "error" in r else _mib(memory(r)))
        cells.append(f"{memory(lg) / max(memory(f), 1):.1f}x" if ok else "-")
    for r in (lg, f):
        cells.append("-" if "error" in r else f"{r['seconds']:.2f} s")
    cells.append(f"{f['seconds'] / lg['seconds']:.2f}" if ok else "-")
    return "| " + " | ".join(cells) + " |"


def _append(args, rows: list[str], notes: list[str], repeats: int, cuda: bool) -> None:
    """One append at the end of the file (other benchmarks add their own sections; nothing is rewritten)."""
    lines = [
        "",
        "## Fused loss (issue 6)",
        "",
        f"{datetime.date.today().isoformat()}, {machine()}. `python -m bench.bench_fused` (d={args.hidden}, "
        f"k={args.k}, chunk {args.chunk_size}, loss fkl + {CE_WEIGHT}·CE, fp32, time: best of {repeats} steps). "
        "Peak extra memory of one loss forward + backward above its inputs, the gradients of h and W included "
        f"({'torch.cuda.max_memory_allocated' if cuda else 'torch profiler, CPU allocations'}), and the same "
        "less those gradients ((N + V)·d·4 bytes, which any path returns): the loss's own working memory.",
        "",
        *rows,
        "",
        *(f"- {note}" for note in notes),
    ]
    with open(args.append, "a") as out:
        out.write("\n".join(lines).rstrip("\n") + "\n")
    print(f"appended to {args.append}")


if __name__ == "__main__":
    main()
