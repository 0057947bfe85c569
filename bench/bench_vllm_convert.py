"""The Python-object price of vLLM's prompt logprobs, on vLLM's own classes (needs vllm: `.venv-vllm`).

    .venv-vllm/bin/python -m bench.bench_vllm_convert [--requests 8] [--tokens 1024] [--k 64] [--repeats 5]

vLLM's engine hands the front end three arrays per request (token ids and log-probs [L-1, k+1], the actual
tokens' ranks [L-1]); with ``flat_logprobs=True`` its ``LogprobsProcessor._update_prompt_logprobs`` turns
them into a ``FlatLogprobs`` of Python lists, one ``append_fast`` per position. We then turn those lists
back into arrays (``cache.vllm_backend.prompt_logprobs_to_scores``). Both run here, in one process on one
thread, on the same data, through vLLM 0.32's real code:

1. vLLM: ``_update_prompt_logprobs`` on a fresh ``LogprobsProcessor`` per request (tokenizer None, as
   with ``detokenize=False``);
2. ours: ``prompt_logprobs_to_scores`` on the resulting objects, for all requests in one call.

Reported: positions per second of each (best of --repeats), and what one core could feed a GPU if it
did only this work (both parts in series: 1 / (1/a + 1/b)). The data: random ids and sorted log-probs,
the actual token first with its rank, as vLLM fills it.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--tokens", type=int, default=1024, help="prompt length L (L-1 scored positions)")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--baseline", default=None, metavar="GIT_REV",
        help="also time cache/vllm_backend.py as it was at this git revision (e.g. the converter before a change)",
    )  # fmt: skip
    return p.parse_args(argv)


def converter_at(rev: str):
    """prompt_logprobs_to_scores as committed at ``rev`` (read with git show, imported from a temp file)."""
    import importlib.util
    import subprocess
    import tempfile
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    source = subprocess.run(
        ["git", "show", f"{rev}:cache/vllm_backend.py"], cwd=repo, capture_output=True, text=True, check=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "vllm_backend_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("vllm_backend_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.prompt_logprobs_to_scores


def make_arrays(requests: int, tokens: int, k: int, vocab: int, seed: int = 0):
    """Per request: (input_ids [L], ids [L-1, k+1] int64, logprobs [L-1, k+1] f32, ranks [L-1] int64)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(requests):
        input_ids = rng.integers(0, vocab, size=tokens)
        topk = rng.integers(0, vocab, size=(tokens - 1, k))
        top_lp = -np.sort(rng.exponential(2.0, size=(tokens - 1, k)), axis=-1).astype(np.float32)
        actual_lp = (top_lp[:, -1] - rng.exponential(1.0, size=tokens - 1)).astype(np.float32)
        ids = np.concatenate([input_ids[1:, None], topk], axis=1)
        lps = np.concatenate([actual_lp[:, None], top_lp], axis=1)
        ranks = rng.integers(k + 1, vocab, size=tokens - 1)
        out.append((input_ids.astype(np.int32), ids, lps, ranks))
    return out


def vllm_build(arrays, k: int):
    """vLLM 0.32's own list building, through its LogprobsProcessor."""
    import torch
    from vllm.logprobs import create_prompt_logprobs
    from vllm.v1.engine.logprobs import LogprobsProcessor
    from vllm.v1.outputs import LogprobsTensors

    built = []
    for _, ids, lps, ranks in arrays:
        proc = LogprobsProcessor(
            tokenizer=None, logprobs=None, prompt_logprobs=create_prompt_logprobs(True), cumulative_logprob=None,
            num_logprobs=None, num_prompt_logprobs=k,
        )  # fmt: skip
        proc._update_prompt_logprobs(
            LogprobsTensors(torch.from_numpy(ids), torch.from_numpy(lps), torch.from_numpy(ranks))
        )
        built.append(proc.prompt_logprobs)
    return built


def best_of(repeats: int, fn):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main(argv=None) -> None:
    import torch
    import vllm

    from bench.common import cpu_model
    from cache.vllm_backend import prompt_logprobs_to_scores

    args = parse_args(argv)
    torch.set_num_threads(1)
    arrays = make_arrays(args.requests, args.tokens, args.k, args.vocab)
    input_ids = np.stack([a[0] for a in arrays])
    positions = args.requests * (args.tokens - 1)

    vllm_s, flat = best_of(args.repeats, lambda: vllm_build(arrays, args.k))
    assert type(flat[0]).__name__ == "FlatLogprobs" and len(flat[0]) == args.tokens
    ours_s, scores = best_of(args.repeats, lambda: prompt_logprobs_to_scores(flat, input_ids, args.k))
    # The conversion is exact: the arrays vLLM started from come back.
    for r, (_, ids, lps, _) in enumerate(arrays):
        np.testing.assert_array_equal(scores.topk_ids[r], ids[:, 1:])
        np.testing.assert_array_equal(scores.topk_logprobs[r], lps[:, 1:])
        np.testing.assert_array_equal(scores.target_logprob[r], lps[:, 0])

    baseline_s = None
    if args.baseline:
        baseline = converter_at(args.baseline)
        baseline_s, old = best_of(args.repeats, lambda: baseline(flat, input_ids, args.k))
        np.testing.assert_array_equal(old.topk_ids, scores.topk_ids)
    vllm_rate, ours_rate = positions / vllm_s, positions / ours_s
    both = 1 / (1 / vllm_rate + 1 / ours_rate)
    print(
        f"\n{time.strftime('%Y-%m-%d')}, vLLM {vllm.__version__}, {os.cpu_count()} CPUs ({cpu_model()}), "
        f"Python {platform.python_version()}, one thread; {args.requests} requests x {args.tokens} tokens, "
        f"k = {args.k}, best of {args.repeats}\n"
    )
    print("| part | seconds | positions/s | entries/s |")
    print("|---|---|---|---|")
    entries = positions * (args.k + 1)
    for name, seconds in (
        ("vLLM: arrays -> FlatLogprobs (LogprobsProcessor._update_prompt_logprobs)", vllm_s),
        ("ours: FlatLogprobs -> arrays (prompt_logprobs_to_scores)", ours_s),
    ):
        print(f"| {name} | {seconds:.3f} | {positions / seconds:,.0f} | {entries / seconds:,.0f} |")
    if baseline_s is not None:
        print(f"| ours at {args.baseline} | {baseline_s:.3f} | {positions / baseline_s:,.0f} | {entries / baseline_s:,.0f} |")
    print(f"| both, in series on one core | {vllm_s + ours_s:.3f} | {both:,.0f} | |")
    print(f"\nours / vLLM's speed: {ours_rate / vllm_rate:.2f}x")
    if baseline_s is not None:
        print(f"ours / ours at {args.baseline}: {baseline_s / ours_s:.2f}x")


if __name__ == "__main__":
    main()
