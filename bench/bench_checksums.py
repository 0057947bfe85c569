"""What checkpoint checksums cost (issue 23): hash rates, and a real checkpoint's save and resume check.

1. Throughput of zlib.crc32, zlib.adler32, hashlib.sha256 and hashlib.blake2b over 64 MiB of random bytes held in
   memory (best of 3 per function): the choice of train/checkpoint.py's checksum.
2. train/checkpoint.py's ``save`` of Llama students (weights + AdamW state, through torch.distributed.checkpoint,
   one process) and the CRC-32 share of it: the time to checksum the checkpoint's files (page cache warm, as right
   after the write) against the save's total, and ``check_files`` (what ``--resume`` runs: sizes and CRC-32).

    python -m bench.bench_checksums [--sizes tiny,small]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
import zlib
from pathlib import Path

import torch

from bench.common import cpu_model

# tiny: the tests' student (tests/conftest.py); small: a 4-layer Llama with a 32k vocabulary.
SHAPES = {
    "tiny": dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4),
    "small": dict(
        vocab_size=32000, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8
    ),
}


def hash_rates(megabytes: int = 64) -> list[tuple[str, float]]:
    data = os.urandom(megabytes << 20)
    functions = {
        "zlib.crc32": lambda: zlib.crc32(data),
        "zlib.adler32": lambda: zlib.adler32(data),
        "hashlib.sha256": lambda: hashlib.sha256(data).digest(),
        "hashlib.blake2b": lambda: hashlib.blake2b(data).digest(),
    }
    out = []
    for name, run in functions.items():
        best = min(_timed(run) for _ in range(3))
        out.append((name, best * 1000 / megabytes))
    return out


def _timed(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def checkpoint_cost(shape: dict, root: Path) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from kd_pipeline.train import checkpoint
    from kd_pipeline.train.parallel import init_processes, make_strategy

    d, device = init_processes("cpu")
    strategy = make_strategy("none", d, device)
    torch.manual_seed(0)
    model = strategy.wrap(LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **shape)), bf16=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=torch.zeros(1, 8, dtype=torch.long)).logits.sum().backward()
    optimizer.step()  # AdamW's state exists only after a step
    started = time.perf_counter()
    ckpt = checkpoint.save(root, 1, strategy, model, optimizer, {"step": 1}, {}, keep=1)
    save_s = time.perf_counter() - started
    files = [f for f in ckpt.iterdir() if f.name != checkpoint.COMPLETE_MARKER]
    size = sum(f.stat().st_size for f in files)
    crc_s = min(_timed(lambda: [checkpoint.file_crc32(f) for f in files]) for _ in range(3))
    check_s = min(_timed(lambda: checkpoint.check_files(ckpt)) for _ in range(3))
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "mb": size / 2**20,
        "save_ms": save_s * 1000,
        "crc_ms": crc_s * 1000,
        "check_ms": check_s * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,small")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"machine: nproc {os.cpu_count()}, {cpu_model()}, load average {os.getloadavg()[0]:.1f}\n")
    print("| function | ms per MB | MB/s |\n|---|---|---|")
    for name, ms in hash_rates():
        print(f"| {name} | {ms:.2f} | {1000 / ms:.0f} |")
    print(
        "\n| student | parameters | checkpoint MB | save ms | CRC-32 of its files ms | share of save | check_files ms |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in args.sizes.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            r = checkpoint_cost(SHAPES[name], Path(tmp))
        print(
            f"| {name} | {r['parameters']:,} | {r['mb']:.2f} | {r['save_ms']:.0f} | {r['crc_ms']:.1f} | "
            f"{r['crc_ms'] / r['save_ms']:.0%} | {r['check_ms']:.1f} |"
        )


if __name__ == "__main__":
    main()
