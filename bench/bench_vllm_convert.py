"""The Python-object price of vLLM's prompt logprobs, on vLLM's own classes (needs vllm: `.venv-vllm`).

    .venv-vllm/bin/python -m bench.bench_vllm_convert [--requests 8] [--tokens 1024] [--k 64] [--repeats 5]
        [--baseline GIT_REV]

vLLM's engine hands the front end three arrays per request (token ids and log-probs [L-1, k+1], the actual
tokens' ranks [L-1]); with ``flat_logprobs=True`` its ``LogprobsProcessor._update_prompt_logprobs`` turns
them into a ``FlatLogprobs`` of Python lists, one ``append_fast`` per position. We then turn those lists
back into arrays (``cache.vllm_backend.prompt_logprobs_to_scores``). Both run here, in one process on one
thread, on the same data, through vLLM 0.32's real code:

1. vLLM: ``_update_prompt_logprobs`` on a fresh ``LogprobsProcessor`` per request (tokenizer None, as
   with ``detokenize=False``);
2. ours from vLLM's lists: ``prompt_logprobs_to_scores`` on the resulting objects, for all requests in
   one call;
3. what the backend does: the same ``_update_prompt_logprobs`` calls inside
   ``keep_prompt_logprob_arrays`` (the tensors are kept, no lists), then ``prompt_logprobs_to_scores``
   on the kept arrays;
4. for scale, a Python loop that only visits every list entry once (the floor of any list reader).

Reported: positions per second of each (best of --repeats, the parts interleaved round by round), and
what one core could feed a GPU if it did only this work (1. and 2. in series: 1 / (1/a + 1/b); 3. is
both steps already). The data: random ids and sorted log-probs, the actual token first with its rank,
as vLLM fills it.
"""

from __future__ import annotations

import argparse
import collections
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
        "--baseline",
        default=None,
        metavar="GIT_REV",
        help="also time cache/backends/vllm.py as it was at this git revision (e.g. the converter before a change)",
    )
    return p.parse_args(argv)


def converter_at(rev: str):
    """prompt_logprobs_to_scores as committed at ``rev`` (read with git show, imported from a temp file)."""
    import importlib.util
    import subprocess
    import tempfile
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    source = subprocess.run(
        ["git", "show", f"{rev}:cache/backends/vllm.py"], cwd=repo, capture_output=True, text=True, check=True
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


def vllm_build(arrays, k: int, keep_arrays: bool = False):
    """vLLM 0.32's own list building, through its LogprobsProcessor (with ``keep_arrays``: inside our
    keep_prompt_logprob_arrays, as VLLMTeacher.score calls it)."""
    import contextlib

    import torch
    from vllm.logprobs import create_prompt_logprobs
    from vllm.v1.engine.logprobs import LogprobsProcessor
    from vllm.v1.outputs import LogprobsTensors

    from kd_pipeline.cache.backends.vllm import keep_prompt_logprob_arrays

    built = []
    keeping = keep_prompt_logprob_arrays(LogprobsProcessor, k) if keep_arrays else contextlib.nullcontext()
    with keeping:
        for _, ids, lps, ranks in arrays:
            proc = LogprobsProcessor(
                tokenizer=None,
                logprobs=None,
                prompt_logprobs=create_prompt_logprobs(True),
                cumulative_logprob=None,
                num_logprobs=None,
                num_prompt_logprobs=k,
            )
            proc._update_prompt_logprobs(
                LogprobsTensors(torch.from_numpy(ids), torch.from_numpy(lps), torch.from_numpy(ranks))
            )
            built.append(proc.prompt_logprobs)
    return built


def visit_every_entry(flat) -> None:
    """The least any reader of the lists must do: iterate each token id and log-prob once, in C."""
    for pl in flat:
        collections.deque(pl.token_ids, maxlen=0)
        collections.deque(pl.logprobs, maxlen=0)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main(argv=None) -> None:
    import torch
    import vllm

    from bench.common import cpu_model
    from kd_pipeline.cache.backends.vllm import PromptLogprobArrays, prompt_logprobs_to_scores

    args = parse_args(argv)
    torch.set_num_threads(1)
    arrays = make_arrays(args.requests, args.tokens, args.k, args.vocab)
    input_ids = np.stack([a[0] for a in arrays])
    positions = args.requests * (args.tokens - 1)
    load_before = os.getloadavg()

    baseline = converter_at(args.baseline) if args.baseline else None
    parts = {
        "vllm_lists": lambda: vllm_build(arrays, args.k),
        "ours_lists": lambda: prompt_logprobs_to_scores(flat, input_ids, args.k),
        "vllm_kept": lambda: vllm_build(arrays, args.k, keep_arrays=True),
        "ours_kept": lambda: prompt_logprobs_to_scores(kept, input_ids, args.k),
        "floor": lambda: visit_every_entry(flat),
    }
    if baseline is not None:
        parts["baseline"] = lambda: baseline(flat, input_ids, args.k)
    best = dict.fromkeys(parts, float("inf"))
    flat = vllm_build(arrays, args.k)
    kept = vllm_build(arrays, args.k, keep_arrays=True)
    for _ in range(args.repeats):  # interleaved, so that every part sees the same load
        for name, fn in parts.items():
            seconds, result = timed(fn)
            best[name] = min(best[name], seconds)
            if name == "vllm_lists":
                flat = result
            elif name == "vllm_kept":
                kept = result
    assert type(flat[0]).__name__ == "FlatLogprobs" and len(flat[0]) == args.tokens
    assert isinstance(kept[0], PromptLogprobArrays) and len(kept[0]) == args.tokens
    # Both paths are exact: the arrays vLLM started from come back.
    for scores in (prompt_logprobs_to_scores(form, input_ids, args.k) for form in (flat, kept)):
        for r, (_, ids, lps, _) in enumerate(arrays):
            np.testing.assert_array_equal(scores.topk_ids[r], ids[:, 1:])
            np.testing.assert_array_equal(scores.topk_logprobs[r], lps[:, 1:])
            np.testing.assert_array_equal(scores.target_logprob[r], lps[:, 0])
    if baseline is not None:
        np.testing.assert_array_equal(baseline(flat, input_ids, args.k).topk_ids, scores.topk_ids)

    rate = {name: positions / seconds for name, seconds in best.items()}
    print(
        f"\n{time.strftime('%Y-%m-%d %H:%M %Z')}, vLLM {vllm.__version__}, {os.cpu_count()} CPUs ({cpu_model()}), "
        f"Python {platform.python_version()}, one thread; {args.requests} requests x {args.tokens} tokens, "
        f"k = {args.k}, best of {args.repeats} interleaved rounds; load average before / after: "
        f"{' / '.join(f'{v:.2f}' for v in load_before)} ; {' / '.join(f'{v:.2f}' for v in os.getloadavg())}\n"
    )
    print("| part | seconds | positions/s | entries/s |")
    print("|---|---|---|---|")
    entries = positions * (args.k + 1)
    rows = [
        ("1. vLLM: arrays -> FlatLogprobs lists (LogprobsProcessor._update_prompt_logprobs)", best["vllm_lists"]),
        ("2. ours: FlatLogprobs lists -> arrays (prompt_logprobs_to_scores)", best["ours_lists"]),
    ]
    if baseline is not None:
        rows.append((f"2'. ours at {args.baseline}, same lists", best["baseline"]))
    rows += [
        ("1+2 in series (vLLM's lists, then ours)", best["vllm_lists"] + best["ours_lists"]),
        ("3a. vLLM's method inside keep_prompt_logprob_arrays (tensors kept)", best["vllm_kept"]),
        ("3b. ours: kept arrays -> arrays (prompt_logprobs_to_scores)", best["ours_kept"]),
        ("3a+3b in series (what VLLMTeacher.score does)", best["vllm_kept"] + best["ours_kept"]),
        ("floor of any list reader: iterate both lists once, no conversion", best["floor"]),
    ]
    for name, seconds in rows:
        print(f"| {name} | {seconds:.4f} | {positions / seconds:,.0f} | {entries / seconds:,.0f} |")
    series_lists = best["vllm_lists"] + best["ours_lists"]
    series_kept = best["vllm_kept"] + best["ours_kept"]
    print(f"\nours from lists / vLLM's list building, speed: {rate['ours_lists'] / rate['vllm_lists']:.2f}x")
    if baseline is not None:
        print(f"ours from lists / ours at {args.baseline}: {best['baseline'] / best['ours_lists']:.2f}x")
    print(f"ours from kept arrays / ours from lists: {best['ours_lists'] / best['ours_kept']:.1f}x")
    print(f"front end, kept arrays (3a+3b) / lists (1+2): {series_lists / series_kept:.1f}x")


if __name__ == "__main__":
    main()
