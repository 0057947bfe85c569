"""LoRA against full fine-tuning: what one rank holds, and the step time, for two student shapes.

    python -m bench.bench_lora [--steps 3] [--batch-size 2] [--seq-len 128]

- Students, built from configs (no download): the tests' tiny Llama (vocab 320, width 64, 2 layers, untied
  head) and the SmolLM2-shaped cut student of bench/material.py (SmolLM2-135M's config with 6 of its 30 layers:
  vocab 49,152, width 576, 9 heads / 3 KV heads, MLP 1,536, tied embeddings; 49.6M parameters).
- Each is trained as the trainer does (train/lora.py's ``wrap_student``, ``make_optimizer``: AdamW over the
  trainable parameters) for ``--steps`` steps of CE on random tokens, fp32, one process.
- Memory: parameter and optimizer-state bytes as ``Strategy.local_bytes`` counts them (what a run's memory.json
  holds), plus the gradient bytes after backward. One process holds all; FSDP over N ranks holds ~1/N of each
  (tests/test_lora.py checks exactly half of the adapters' optimizer state on 2 ranks).
- Time: the median seconds per step after the first, on one intra-op thread (a shared machine: ratios only).

Prints a Markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch

from bench.common import cpu_model
from kd_pipeline.train import lora
from kd_pipeline.train.parallel import Dist, Strategy
from kd_pipeline.train.trainer import make_optimizer

MIB = 2**20


def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )


def smollm2_cut_config():
    """SmolLM2-135M(-Instruct)'s config.json values, with the 6 layers bench/material.py keeps."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=6,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        hidden_act="silu",
    )


def options(r: int, targets: str = "") -> SimpleNamespace:
    """The DistillConfig fields train/lora.py and make_optimizer read."""
    return SimpleNamespace(
        lora_r=r,
        lora_alpha=2.0 * r,
        lora_dropout=0.0,
        lora_target_modules=targets,
        peft_config=None,
        merge_lora=False,
        gradient_checkpointing=False,
        weight_decay=0.01,
        lr=1e-4,
        adam_betas=(0.9, 0.95),
    )


def measure(config, variant: SimpleNamespace, steps: int, batch: int, seq_len: int) -> dict:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = lora.wrap_student(AutoModelForCausalLM.from_config(config, dtype=torch.float32), variant)
    optimizer = make_optimizer(model, variant, torch.device("cpu"))
    ids = torch.randint(0, config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    times, grad_bytes = [], 0
    for _ in range(steps):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    held = Strategy(Dist(), torch.device("cpu")).local_bytes(model, optimizer)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {
        **held,
        "gradient_bytes": grad_bytes,
        "trainable": trainable,
        "total": total,
        "s_per_step": statistics.median(times[1:]) if len(times) > 1 else times[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="LoRA vs full fine-tuning: bytes per rank and step time")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    variants = {
        "full fine-tuning": options(0),
        "LoRA r=16, q_proj,v_proj (PEFT default)": options(16),
        "LoRA r=16, all-linear": options(16, "all-linear"),
    }
    print(f"{cpu_model()}, torch {torch.__version__}, fp32, one thread, batch {args.batch_size} x {args.seq_len}\n")
    print(
        "| student | training | trained parameters | parameters | gradients | optimizer state | params + grads + "
        "optimizer | vs full | s/step |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, config in (("tests' tiny Llama", tiny_config()), ("SmolLM2 6-layer cut", smollm2_cut_config())):
        full = None
        for label, variant in variants.items():
            m = measure(config, variant, args.steps, args.batch_size, args.seq_len)
            held = m["parameter_bytes"] + m["gradient_bytes"] + m["optimizer_bytes"]
            full = full or held
            print(
                f"| {name} | {label} | {m['trainable']:,} of {m['total']:,} ({100 * m['trainable'] / m['total']:.2f}%) "
                f"| {m['parameter_bytes'] / MIB:.2f} MiB | {m['gradient_bytes'] / MIB:.2f} MiB "
                f"| {m['optimizer_bytes'] / MIB:.2f} MiB | {held / MIB:.2f} MiB | {held / full:.3f} "
                f"| {m['s_per_step']:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
