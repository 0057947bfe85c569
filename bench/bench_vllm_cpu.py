"""vLLM vs HF scoring throughput on CPU, in one run, and the vLLM engine's start time (needs `.venv-vllm`).

    .venv-vllm/bin/python -m bench.bench_vllm_cpu [extra scripts/gpu_check.py options]

It is `scripts/gpu_check.py` on a CPU-sized configuration: a random-weight Llama of 20M parameters (the
"small" shape: 4 layers, hidden 256, heads of 32, vocabulary 32,000), 32 random sequences of 256 tokens,
k = 64, float32, both backends on the same sequences; vLLM with --enforce-eager (torch.compile would add
minutes to the start). Prints gpu_check's table: each backend's score() tokens/s
(load and one warm-up batch excluded), their ratio, vLLM's engine start, HF's writer share, and parity.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path

DEFAULTS = [
    "--build-teacher",
    "small",
    "--device",
    "cpu",
    "--dtype",
    "float32",
    "--seq-len",
    "256",
    "--num-seqs",
    "32",
    "--k",
    "64",
    "--enforce-eager",
]


def main(argv=None) -> int:
    path = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    with tempfile.TemporaryDirectory() as out:
        return gpu_check.main(["--out", out, *DEFAULTS, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
