#!/usr/bin/env python
"""FSDP2 training-step time and peak memory for a random-init Llama student, through the trainer's own pieces.

    torchrun --nproc-per-node N scripts/fsdp_step.py [--size 1b|tiny] [--parallel fsdp|ddp|none] \\
        [--batch-size 4] [--seq-len 2048] [--k 64] [--grad-accum 1] [--steps 10] [--loss fkl] [--fused-loss] \\
        [--out fsdp_step.json]

Made for a CUDA machine (bf16 parameters, fp32 gradient reduction: the strategy's MixedPrecisionPolicy);
``--size tiny`` runs the same code on CPU with gloo in seconds (that is how it is checked without a GPU).

What runs per step is what ``pipeline distill`` runs: ``train.parallel`` wraps the student (fully_shard per
decoder layer, then the root), ``trainer.make_optimizer`` builds AdamW, and each micro-batch goes through
``trainer.batch_losses`` (student forward + the registered loss) under ``strategy.accumulating``, then
``strategy.clip_grad_norm``, the optimizer step and zero_grad. Only the data is synthetic: batches in the
reader's format (bench/bench_step.py's ``synthetic_batch``: a Gaussian-logit teacher's top-k and sampled text),
so no tokenizer or cache of the student's 128k vocabulary is needed.

``1b``: Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 heads / 8 kv heads, MLP 8192, vocab 128,256, tied
embeddings; 1.24B parameters). Reported per rank: median step time over ``--steps`` (after 2 warm-up steps),
tokens/s, peak memory allocated (``torch.cuda.max_memory_allocated``; on CPU not measured) and the bytes of
parameters and optimizer state held (local shards).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.bench_step import synthetic_batch  # noqa: E402
from bench.common import LLAMA_3_2_1B  # noqa: E402
from kd_pipeline.train import losses, trainer  # noqa: E402
from kd_pipeline.train.parallel import init_processes, make_strategy  # noqa: E402

SIZES = {
    "1b": LLAMA_3_2_1B,  # random init
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    ),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--parallel", default="fsdp", choices=("fsdp", "ddp", "none"))
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per micro-batch per rank")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--loss", default="fkl")
    parser.add_argument("--fused-loss", action="store_true")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    parser.add_argument("--out", type=Path, default=Path("fsdp_step.json"))
    args = parser.parse_args(argv)

    from transformers import LlamaConfig, LlamaForCausalLM

    d, device = init_processes("auto")
    strategy = make_strategy(args.parallel, d, device)
    cfg = trainer.DistillConfig(
        student="-",
        cache=Path("-"),
        out=Path("-"),
        loss=args.loss,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        precision=args.precision,
        fused_loss=args.fused_loss,
        parallel=args.parallel,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SIZES[args.size])).to(device)  # fp32 master weights, then sharded
    params = sum(p.numel() for p in model.parameters())
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    model = strategy.wrap(model, bf16=bf16)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the unsharded copy is gone; what stays is this rank's shards
    optimizer = trainer.make_optimizer(model, cfg, device)
    loss = losses.build_loss(cfg.loss, cfg)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)
    vocab = SIZES[args.size]["vocab_size"]
    batches = [
        synthetic_batch(args.batch_size, args.seq_len, args.k, vocab, seed=1000 * d.rank + i)[0]
        for i in range(args.grad_accum)
    ]
    if device.type == "cuda":
        batches = [{k: v.pin_memory() for k, v in b.items()} for b in batches]
        torch.cuda.reset_peak_memory_stats(device)

    times = []
    for step in range(args.steps + 2):
        start = time.perf_counter()
        for micro, batch in enumerate(batches):
            with strategy.accumulating(model, last=micro == len(batches) - 1):
                parts = trainer.batch_losses(model, batch, cfg, loss, device, autocast)
                (parts.total / len(batches)).backward()
        strategy.clip_grad_norm(model, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= 2:
            times.append(time.perf_counter() - start)
    held = strategy.local_bytes(model, optimizer)
    step_s = statistics.median(times)
    result = {
        "size": args.size,
        "parameters": params,
        "parallel": strategy.name,
        "world_size": d.world_size,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "bf16": bf16,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "grad_accum": args.grad_accum,
        "k": args.k,
        "loss": args.loss,
        "fused_loss": args.fused_loss,
        "step_seconds": step_s,
        "tokens_per_s_per_rank": args.batch_size * args.seq_len * args.grad_accum / step_s,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "last_loss": float(parts.total.detach()),
        **held,
    }
    ranks = d.all_gather_objects(result)
    if d.main:
        args.out.write_text(json.dumps(ranks, indent=1) + "\n")
        for r in ranks[:1]:
            peak = (
                f"{r['peak_memory_bytes'] / 2**30:.2f} GiB"
                if r["peak_memory_bytes"] is not None
                else "not measured (CPU)"
            )
            print(
                f"{r['size']} ({r['parameters'] / 1e6:,.1f}M params, {r['parallel']} x {r['world_size']}, {r['device']}, "
                f"bf16={r['bf16']}): {r['step_seconds']:.3f} s/step, {r['tokens_per_s_per_rank']:.0f} tokens/s per rank, "
                f"peak {peak}, parameters {r['parameter_bytes'] / 2**20:.1f} MiB + optimizer "
                f"{r['optimizer_bytes'] / 2**20:.1f} MiB per rank; loss {r['last_loss']:.4f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
