#!/usr/bin/env python
"""HF-vs-vLLM teacher parity and throughput, on a CUDA machine with the [vllm] extra installed.

    python scripts/gpu_check.py --teacher MODEL_DIR --data corpus.jsonl --k 64 --seq-len 1024 \\
        --num-seqs 64 --out gpu_check_out [--via-pipeline]

Both backends score the same packed token sequences (cache.data, exactly as `pipeline cache-teacher`
builds them). HF runs first and is freed before vLLM starts (vLLM reserves --gpu-memory-utilization of
the GPU). Reported, over all L-1 positions of every sequence:

- top1_agreement: fraction of positions whose top-1 id is the same in both backends;
- topk_overlap: mean |HF top-k ∩ vLLM top-k| / k;
- logprob_abs_diff_{max,mean}: |Δ log-prob| over the ids both top-k lists share;
- target_abs_diff_{max,mean}: |Δ target_logprob| (the actual next token, in or out of the top-k);
- throughput of each backend's score() in tokens/s (model loading and one warm-up batch excluded).

With --via-pipeline the script also runs `pipeline cache-teacher` with --backend hf and --backend vllm
into OUT/cache_hf and OUT/cache_vllm and compares the two caches the same way (values as stored,
float16), with end-to-end wall time and bytes per token.

Results: a printed table and OUT/gpu_check.json. Exit status 1 when parity is below the thresholds
(--min-top1, --min-overlap, --max-mean-diff; defaults are rough bf16-vs-bf16 expectations, not a spec).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="teacher model: local HF directory or hub id")
    p.add_argument("--data", required=True, help="dataset path (any format `pipeline cache-teacher` reads)")
    p.add_argument("--k", type=int, default=64, help="top-k support size (default 64)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per packed sequence (default 1024)")
    p.add_argument("--num-seqs", type=int, default=64, help="sequences to score (default 64)")
    p.add_argument("--out", required=True, type=Path, help="output directory for gpu_check.json (and caches)")
    p.add_argument("--dtype", default="bfloat16", help="weights dtype for both backends (default bfloat16)")
    p.add_argument("--hf-batch-size", type=int, default=8, help="sequences per HF forward (default 8)")
    p.add_argument("--hf-device", default="cuda", help="HF backend device (default cuda)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM tensor parallel size")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85, help="vLLM memory fraction")
    p.add_argument("--text-field", default="text")
    p.add_argument("--messages-field", default="messages")
    p.add_argument("--split", default="train")
    p.add_argument("--revision", default=None)
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--via-pipeline", action="store_true", help="also compare two caches built by the CLI")
    p.add_argument("--min-top1", type=float, default=0.97, help="fail below this top-1 agreement")
    p.add_argument("--min-overlap", type=float, default=0.95, help="fail below this mean top-k overlap")
    p.add_argument("--max-mean-diff", type=float, default=0.05, help="fail above this mean |Δ logprob|")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------
# Parity metrics (numpy only).


def compare(a_ids, a_lp, a_tgt, b_ids, b_lp, b_tgt, max_cells: int = 1 << 26) -> dict:
    """Parity of two top-k results, shapes [N, L-1, k] (ids, logprobs) and [N, L-1] (target)."""
    if a_ids.shape != b_ids.shape:
        raise ValueError(f"shapes differ: {a_ids.shape} vs {b_ids.shape}")
    n, positions, k = a_ids.shape
    top1 = overlap = 0.0
    diff_sum, diff_count, diff_max = 0.0, 0, 0.0
    step = max(1, max_cells // max(1, positions * k * k))  # bounds the [n, L-1, k, k] match tensor
    for s in range(0, n, step):
        ai, bi = a_ids[s : s + step], b_ids[s : s + step]
        al, bl = a_lp[s : s + step].astype(np.float32), b_lp[s : s + step].astype(np.float32)
        top1 += float((ai[..., 0] == bi[..., 0]).sum())
        match = ai[..., :, None] == bi[..., None, :]  # [n, P, k(a), k(b)]
        shared = match.any(-1)
        overlap += float(shared.sum())
        b_at = np.take_along_axis(bl, match.argmax(-1), axis=-1)
        d = np.abs(al - b_at)[shared]
        if d.size:
            diff_sum += float(d.astype(np.float64).sum())
            diff_count += int(d.size)
            diff_max = max(diff_max, float(d.max()))
    td = np.abs(a_tgt.astype(np.float64) - b_tgt.astype(np.float64))
    total = n * positions
    return {
        "positions": int(total),
        "top1_agreement": top1 / total,
        "topk_overlap": overlap / (total * k),
        "logprob_abs_diff_max": diff_max,
        "logprob_abs_diff_mean": diff_sum / max(diff_count, 1),
        "target_abs_diff_max": float(td.max()) if td.size else 0.0,
        "target_abs_diff_mean": float(td.mean()) if td.size else 0.0,
    }


def verdict(parity: dict, args) -> list[str]:
    problems = []
    if parity["top1_agreement"] < args.min_top1:
        problems.append(f"top1_agreement {parity['top1_agreement']:.4f} < {args.min_top1}")
    if parity["topk_overlap"] < args.min_overlap:
        problems.append(f"topk_overlap {parity['topk_overlap']:.4f} < {args.min_overlap}")
    if parity["logprob_abs_diff_mean"] > args.max_mean_diff:
        problems.append(f"logprob_abs_diff_mean {parity['logprob_abs_diff_mean']:.4f} > {args.max_mean_diff}")
    return problems


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len(name) for name, _ in rows)
    print(f"\n{title}")
    print("-" * (width + 24))
    for name, value in rows:
        print(f"{name:<{width}}  {value:>20}")


# ---------------------------------------------------------------------------------------------------
# In-process run of both backends.


def build_sequences(args):
    from transformers import AutoTokenizer

    from cache.data import DataSpec, iter_sequences

    tokenizer = AutoTokenizer.from_pretrained(
        args.teacher, revision=args.revision, trust_remote_code=args.trust_remote_code
    )
    spec = DataSpec(
        path=args.data,
        seq_len=args.seq_len,
        text_field=args.text_field,
        messages_field=args.messages_field,
        split=args.split,
        max_sequences=args.num_seqs,
    )
    pairs = list(iter_sequences(spec, tokenizer))
    if not pairs:
        raise SystemExit(f"{args.data}: produced no token sequences")
    return np.stack([ids for ids, _ in pairs]).astype(np.int32)


def timed_score(teacher, input_ids: np.ndarray) -> tuple[object, float]:
    warm = input_ids[: min(2, len(input_ids))]
    teacher.score(warm)  # compile / cudagraph / allocator warm-up, not timed
    start = time.perf_counter()
    scores = teacher.score(input_ids)
    return scores, time.perf_counter() - start


def free_cuda() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    except ImportError:
        pass


def run_in_process(args, input_ids: np.ndarray) -> dict:
    from cache.hf_backend import HFTeacher

    tokens = int(input_ids.size)
    hf = HFTeacher(
        args.teacher,
        k=args.k,
        batch_size=args.hf_batch_size,
        dtype=args.dtype,
        device=args.hf_device,
        revision=args.revision,
        trust_remote_code=args.trust_remote_code,
    )
    hf_desc = hf.describe()
    hf_scores, hf_s = timed_score(hf, input_ids)
    del hf
    free_cuda()

    from cache.vllm_backend import VLLMTeacher

    vl = VLLMTeacher(
        args.teacher,
        k=args.k,
        seq_len=args.seq_len,
        tensor_parallel_size=args.tensor_parallel_size,
        dtype=args.dtype,
        gpu_memory_utilization=args.gpu_memory_utilization,
        revision=args.revision,
        trust_remote_code=args.trust_remote_code,
    )
    vl_desc = vl.describe()
    vl_scores, vl_s = timed_score(vl, input_ids)

    parity = compare(
        hf_scores.topk_ids, hf_scores.topk_logprobs, hf_scores.target_logprob,
        vl_scores.topk_ids, vl_scores.topk_logprobs, vl_scores.target_logprob,
    )  # fmt: skip
    return {
        "sequences": int(input_ids.shape[0]),
        "tokens": tokens,
        "hf": {"describe": hf_desc, "seconds": hf_s, "tokens_per_s": tokens / hf_s},
        "vllm": {"describe": vl_desc, "seconds": vl_s, "tokens_per_s": tokens / vl_s},
        "parity": parity,
    }


# ---------------------------------------------------------------------------------------------------
# Through the CLI: two caches, compared as stored.


def read_cache(root: Path):
    import pyarrow.parquet as pq

    from cache.format import CacheRows, from_record_batch
    from cache.manifest import load_cache

    info = load_cache(root)
    k, seq_len = info.manifest.k, info.manifest.seq_len
    parts = [from_record_batch(pq.read_table(root / s.name), seq_len, k) for s in info.shards]
    rows = CacheRows.concat(parts)
    order = np.argsort(rows.seq_ids, kind="stable")
    return info, CacheRows(**{f: getattr(rows, f)[order] for f in CacheRows.__dataclass_fields__})


def run_pipeline(args, backend: str) -> tuple[Path, float]:
    out = args.out / f"cache_{backend}"
    cmd = [
        sys.executable, str(REPO / "pipeline.py"), "cache-teacher",
        "--teacher", args.teacher, "--data", args.data, "--out", str(out),
        "--top-k", str(args.k), "--seq-len", str(args.seq_len), "--backend", backend,
        "--max-sequences", str(args.num_seqs), "--dtype", args.dtype,
        "--batch-size", str(args.hf_batch_size), "--device", args.hf_device,
        "--tensor-parallel-size", str(args.tensor_parallel_size),
        "--text-field", args.text_field, "--messages-field", args.messages_field, "--split", args.split,
        "--overwrite", "--no-progress",
    ]  # fmt: skip
    if args.revision:
        cmd += ["--revision", args.revision]
    if args.trust_remote_code:
        cmd += ["--trust-remote-code"]
    print("$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO)
    return out, time.perf_counter() - start


def run_via_pipeline(args) -> dict:
    result = {}
    caches = {}
    for backend in ("hf", "vllm"):
        out, seconds = run_pipeline(args, backend)
        info, rows = read_cache(out)
        caches[backend] = rows
        result[backend] = {
            "cache": str(out),
            "wall_seconds_incl_load": seconds,
            "tokens": info.num_tokens,
            "bytes_per_token": info.num_bytes / max(info.num_tokens, 1),
            "backend": info.manifest.backend,
        }
    a, b = caches["hf"], caches["vllm"]
    if not (np.array_equal(a.seq_ids, b.seq_ids) and np.array_equal(a.input_ids, b.input_ids)):
        raise SystemExit("the two caches hold different token sequences; cannot compare them")
    result["parity"] = compare(
        a.topk_ids, a.topk_logprobs, a.target_logprob, b.topk_ids, b.topk_logprobs, b.target_logprob
    )
    return result


# ---------------------------------------------------------------------------------------------------


def parity_rows(parity: dict) -> list[tuple[str, str]]:
    return [
        ("positions compared", f"{parity['positions']:,}"),
        ("top-1 id agreement", f"{parity['top1_agreement']:.4%}"),
        ("top-k id overlap", f"{parity['topk_overlap']:.4%}"),
        ("max |Δ logprob| shared", f"{parity['logprob_abs_diff_max']:.4f}"),
        ("mean |Δ logprob| shared", f"{parity['logprob_abs_diff_mean']:.5f}"),
        ("max |Δ target_logprob|", f"{parity['target_abs_diff_max']:.4f}"),
        ("mean |Δ target_logprob|", f"{parity['target_abs_diff_mean']:.5f}"),
    ]


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    try:
        import torch

        report["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA"
        report["torch"] = torch.__version__
    except ImportError:
        report["device"] = "unknown"
    report["python"] = platform.python_version()
    if report["device"] == "no CUDA":
        print("warning: no CUDA device visible; the vLLM backend will not start", file=sys.stderr)

    input_ids = build_sequences(args)
    inproc = run_in_process(args, input_ids)
    report["in_process"] = inproc
    print_table(
        f"HF vs vLLM, {inproc['sequences']} sequences x {args.seq_len} tokens, k={args.k} ({report['device']})",
        parity_rows(inproc["parity"])
        + [
            ("HF score() tokens/s", f"{inproc['hf']['tokens_per_s']:,.0f}"),
            ("vLLM score() tokens/s", f"{inproc['vllm']['tokens_per_s']:,.0f}"),
            ("vLLM / HF speed-up", f"{inproc['vllm']['tokens_per_s'] / inproc['hf']['tokens_per_s']:.2f}x"),
        ],
    )
    problems = [f"in-process: {p}" for p in verdict(inproc["parity"], args)]

    if args.via_pipeline:
        free_cuda()
        piped = run_via_pipeline(args)
        report["via_pipeline"] = piped
        print_table(
            "Caches written by `pipeline cache-teacher` (stored float16 values)",
            parity_rows(piped["parity"])
            + [
                ("HF wall s (incl. load)", f"{piped['hf']['wall_seconds_incl_load']:.1f}"),
                ("vLLM wall s (incl. load)", f"{piped['vllm']['wall_seconds_incl_load']:.1f}"),
                ("HF bytes/token", f"{piped['hf']['bytes_per_token']:.1f}"),
                ("vLLM bytes/token", f"{piped['vllm']['bytes_per_token']:.1f}"),
            ],
        )
        problems += [f"pipeline caches: {p}" for p in verdict(piped["parity"], args)]

    report["problems"] = problems
    report["ok"] = not problems
    path = args.out / "gpu_check.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nwrote {path}")
    for p in problems:
        print(f"PARITY BELOW THRESHOLD: {p}", file=sys.stderr)
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
