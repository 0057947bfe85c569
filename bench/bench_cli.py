"""CLI start-up benchmark: how long `pipeline --help` and each `pipeline COMMAND --help` take, and what they import.

    python -m bench.bench_cli [--repeats 5]

Each command runs in a fresh interpreter (the installed `pipeline` entry point's code path, `main()`), output to a
pipe; the best of ``--repeats`` wall and CPU (user + system) seconds are reported, with the load average, since the
machine may be shared: CPU seconds are the figure that load disturbs least. "heavy" lists which of torch, numpy,
pyarrow, transformers, datasets the command loaded (none is the goal: --help must not pay for the model stack).
For scale, the same interpreter importing torch alone is measured too.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

COMMANDS = ["", "cache-teacher", "distill", "generate", "plan-teacher", "verify", "inspect", "plot"]
HEAVY = ("torch", "numpy", "pyarrow", "transformers", "datasets")
SCRIPT = """
import json, sys
from kd_pipeline.pipeline import main
args = json.loads(sys.argv[1])
sys.argv = ["pipeline", *args]
try:
    main()
except SystemExit:
    pass
print("@@" + json.dumps([m for m in %r if m in sys.modules]))
"""


def timed(argv: list[str]) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds of the child, its stdout) of one subprocess."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    print(f"Machine: {os.cpu_count()} CPUs, CPython {sys.version.split()[0]}")
    print("Load average at start (1/5/15 min): " + " / ".join(f"{x:.2f}" for x in os.getloadavg()))
    print()
    print("| command                          | wall s (best) | CPU s (best) | heavy modules loaded |")
    print("|----------------------------------|---------------|--------------|----------------------|")
    script = SCRIPT % (list(HEAVY),)
    for command in COMMANDS:
        words = [command, "--help"] if command else ["--help"]
        runs = [timed([sys.executable, "-c", script, json.dumps(words)]) for _ in range(args.repeats)]
        loaded = json.loads(runs[-1][2].rpartition("@@")[2])
        name = f"`pipeline {' '.join(words)}`"
        wall, cpu = min(r[0] for r in runs), min(r[1] for r in runs)
        print(f"| {name:<32} | {wall:13.2f} | {cpu:12.2f} | {', '.join(loaded) or 'none':<20} |")
    runs = [timed([sys.executable, "-c", "import torch"]) for _ in range(args.repeats)]
    wall, cpu = min(r[0] for r in runs), min(r[1] for r in runs)
    name = '`python -c "import torch"`'
    print(f"| {name:<32} | {wall:13.2f} | {cpu:12.2f} | {'torch':<20} |")
    print()
    print("Load average at end (1/5/15 min): " + " / ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
