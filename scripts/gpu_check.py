#!/usr/bin/env python
"""Stage one on a GPU machine: HF backend throughput and the writer's share of the time, and, where vLLM is
installed, HF-vs-vLLM parity and throughput. It also runs on CPU (``--device cpu``, ``--build-teacher tiny``).

    python scripts/gpu_check.py --out gpu_check_out                        # a ~1B Llama, random weights
    python scripts/gpu_check.py --out o --teacher MODEL_DIR --data corpus.jsonl --num-seqs 64
    python scripts/gpu_check.py --out o --build-teacher tiny --seq-len 128 --num-seqs 8 --device cpu

A GPU machine may have no model hub and no vLLM: without ``--teacher`` the script builds a Llama from a
config with random weights (``--build-teacher 1b``: Llama-3.2-1B's shape, 1.24B parameters; ``tiny`` for a
smoke run) into OUT/teacher, and without ``--data`` it scores random token ids. Steps:

1. ``hf``: the HF backend's ``score()`` in tokens/s at ``--seq-len`` (default 2048; load and one warm-up
   batch excluded), then ``kd_pipeline.cache.format.files.write_shard`` on those scores: the writer's share of
   score + write time (the writer runs on the host while a GPU would wait).
2. ``vllm`` (only where vllm imports): the same sequences through the vLLM backend, its tokens/s and its
   parity with HF: top-1 agreement, top-k overlap, |Δ log-prob| on shared ids, |Δ target log-prob|.
3. ``--via-pipeline``: `pipeline cache-teacher` with each available backend, caches compared as stored.

Each result is appended to OUT/gpu_check.jsonl as soon as it exists (a late failure loses nothing); one
table is printed at the end. Exit 1 when a parity figure is below its threshold (--min-top1,
--min-overlap, --max-mean-diff; rough bf16 expectations, not a spec).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import LLAMA_3_2_1B  # noqa: E402

# Shapes of the teachers --build-teacher makes (random weights).
TEACHER_SHAPES = {
    "1b": LLAMA_3_2_1B,
    # Heads of 32: vLLM's CPU attention has kernels for head sizes 32, 64, 80, ... only.
    "small": dict(
        vocab_size=32000,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    ),
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    ),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="output directory (gpu_check.jsonl, built teacher, caches)")
    p.add_argument("--teacher", default=None, help="teacher: local HF directory or hub id (default: build one)")
    p.add_argument(
        "--build-teacher",
        choices=sorted(TEACHER_SHAPES),
        default="1b",
        help="shape of the random-weight Llama built when --teacher is not given (default 1b)",
    )
    p.add_argument("--data", default=None, help="dataset (any format cache-teacher reads); default: random token ids")
    p.add_argument("--k", type=int, default=64, help="top-k support size (default 64)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default 2048)")
    p.add_argument("--num-seqs", type=int, default=64, help="sequences to score (default 64)")
    p.add_argument("--device", default="auto", help="HF backend device: auto (CUDA if present) | cpu | cuda:N")
    p.add_argument(
        "--dtype", default="auto", help="both backends: auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16"
    )
    p.add_argument("--hf-batch-size", type=int, default=8, help="sequences per HF forward (default 8)")
    p.add_argument("--shard-rows", type=int, default=16, help="sequences per shard in the writer step (default 16)")
    p.add_argument("--backends", default="hf,vllm", help="comma list; vllm is skipped where it does not import")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM tensor parallel size")
    p.add_argument("--gpu-memory-utilization", type=float, default=None, help="vLLM memory share (default: ours)")
    p.add_argument("--enforce-eager", action="store_true", help="vLLM without torch.compile / CUDA graphs")
    p.add_argument("--text-field", default="text")
    p.add_argument("--messages-field", default="messages")
    p.add_argument("--split", default="train")
    p.add_argument("--revision", default=None)
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--via-pipeline", action="store_true", help="also compare caches built by the CLI")
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


class Results:
    """Append-only JSONL: each step's record is on disk (flushed) the moment it exists."""

    def __init__(self, path: Path):
        self.path = path
        self.records: list[dict] = []

    def add(self, step: str, **values) -> dict:
        record = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **values}
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")
            f.flush()
        print(
            f"[{step}] " + ", ".join(f"{k}={_short(v)}" for k, v in values.items() if not isinstance(v, dict)),
            flush=True,
        )
        return record


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------------------------------
# Steps.


def build_teacher(shape: str, out: Path, dtype: str) -> tuple[Path, int, float]:
    """A Llama with random weights from a config (no hub), saved where both backends can load it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    start = time.perf_counter()
    directory = out / f"teacher_{shape}"
    config = LlamaConfig(**TEACHER_SHAPES[shape])
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if dtype in ("auto", "bfloat16") else torch.float32)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(directory)
    del model
    gc.collect()
    return directory, params, time.perf_counter() - start


def build_sequences(args, teacher: str) -> np.ndarray:
    """Token sequences exactly as cache-teacher packs them, or random ids when there is no --data."""
    if args.data is None:
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(teacher, trust_remote_code=args.trust_remote_code).vocab_size
        return np.random.default_rng(0).integers(0, vocab, size=(args.num_seqs, args.seq_len), dtype=np.int32)
    from transformers import AutoTokenizer

    from kd_pipeline.cache.data import DataSpec, iter_sequences

    tokenizer = AutoTokenizer.from_pretrained(teacher, revision=args.revision, trust_remote_code=args.trust_remote_code)
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
    teacher.score(input_ids[: min(2, len(input_ids))])  # compile / cudagraph / allocator warm-up, not timed
    sync()
    start = time.perf_counter()
    scores = teacher.score(input_ids)
    sync()
    return scores, time.perf_counter() - start


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free_cuda() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def time_writer(scores, input_ids: np.ndarray, shard_rows: int) -> tuple[float, int]:
    """Write the scores as cache-teacher would (shards of shard_rows sequences); seconds and bytes."""
    from kd_pipeline.cache.config import DEFAULT_ENCODING
    from kd_pipeline.cache.format.encodings import encoding_class
    from kd_pipeline.cache.format.files import write_shard
    from kd_pipeline.cache.format.layout import FORMAT_VERSION
    from kd_pipeline.cache.format.rows import CacheRows

    # The default encoding, its parameters derived from the first shard's tokens as cache-teacher derives them.
    cls = encoding_class(DEFAULT_ENCODING)
    vocab = int(max(input_ids.max(), scores.topk_ids.max())) + 1
    params = cls.new_params(first_block_input_ids=input_ids[:shard_rows], vocab_size=vocab, min_logprob=None)
    encoding = cls(version=FORMAT_VERSION, seq_len=input_ids.shape[1], k=scores.topk_ids.shape[-1], params=params)
    rows = CacheRows(
        seq_ids=np.arange(len(input_ids), dtype=np.int64),
        input_ids=input_ids,
        loss_mask=np.ones_like(input_ids, dtype=bool),
        topk_ids=scores.topk_ids,
        topk_logprobs=scores.topk_logprobs,
        target_logprob=scores.target_logprob,
    )
    total = 0
    with tempfile.TemporaryDirectory() as tmp:
        write_shard(rows.slice(0, 1), Path(tmp) / "warm-up.parquet", 1, encoding)  # imports and codec set-up, not timed
        start = time.perf_counter()
        for i, s in enumerate(range(0, len(input_ids), shard_rows)):
            path = Path(tmp) / f"{i:08d}.parquet"
            write_shard(rows.slice(s, s + shard_rows), path, shard_rows, encoding)
            total += path.stat().st_size
        seconds = time.perf_counter() - start
    return seconds, total


def step_hf(args, teacher: str, input_ids: np.ndarray, results: Results):
    from kd_pipeline.cache.backends.hf import HFTeacher

    start = time.perf_counter()
    hf = HFTeacher(
        teacher,
        k=args.k,
        batch_size=args.hf_batch_size,
        dtype=args.dtype,
        device=args.device,
        revision=args.revision,
        trust_remote_code=args.trust_remote_code,
    )
    load_s = time.perf_counter() - start
    described = hf.describe()
    scores, score_s = timed_score(hf, input_ids)
    hf.close()
    del hf
    free_cuda()
    write_s, nbytes = time_writer(scores, input_ids, args.shard_rows)
    tokens = int(input_ids.size)
    results.add(
        "hf",
        device=described["backend"]["device"],
        dtype=described["teacher"]["dtype"],
        load_s=load_s,
        tokens=tokens,
        score_s=score_s,
        tokens_per_s=tokens / score_s,
        write_s=write_s,
        write_tokens_per_s=tokens / write_s,
        writer_share=write_s / (score_s + write_s),
        bytes_per_token=nbytes / tokens,
    )
    return scores


def step_vllm(args, teacher: str, input_ids: np.ndarray, hf_scores, results: Results) -> list[str]:
    from kd_pipeline.cache.backends.vllm import VLLMTeacher

    dtype = VLLMTeacher.teacher_dtype(args)
    # A teacher built here has no tokenizer; prompts are token ids and nothing is detokenized.
    no_tokenizer = Path(teacher).is_dir() and not any(Path(teacher).glob("tokenizer*"))
    start = time.perf_counter()
    with VLLMTeacher(
        teacher,
        k=args.k,
        seq_len=args.seq_len,
        tensor_parallel_size=args.tensor_parallel_size,
        dtype=dtype,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager,
        revision=args.revision,
        trust_remote_code=args.trust_remote_code,
        llm_kwargs={"skip_tokenizer_init": True} if no_tokenizer else None,
    ) as vl:
        load_s = time.perf_counter() - start
        scores, score_s = timed_score(vl, input_ids)
    tokens = int(input_ids.size)
    record = {"load_s": load_s, "tokens": tokens, "score_s": score_s, "tokens_per_s": tokens / score_s, "dtype": dtype}
    problems = []
    if hf_scores is not None:
        parity = compare(
            hf_scores.topk_ids,
            hf_scores.topk_logprobs,
            hf_scores.target_logprob,
            scores.topk_ids,
            scores.topk_logprobs,
            scores.target_logprob,
        )
        record.update(parity)
        problems = [f"in-process: {p}" for p in verdict(parity, args)]
    results.add("vllm", **record)
    return problems


def read_cache(root: Path):
    from kd_pipeline import read_all
    from kd_pipeline.cache.format.manifest import load_cache
    from kd_pipeline.cache.format.rows import CacheRows

    info = load_cache(root)
    rows = read_all(info)
    order = np.argsort(rows.seq_ids, kind="stable")
    return info, CacheRows(**{f: getattr(rows, f)[order] for f in CacheRows.__dataclass_fields__})


def run_pipeline(args, teacher: str, backend: str) -> tuple[Path, float]:
    out = args.out / f"cache_{backend}"
    cmd = [
        sys.executable,
        "-m",
        "kd_pipeline",
        "cache-teacher",
        "--teacher",
        teacher,
        "--data",
        args.data,
        "--out",
        str(out),
        "--top-k",
        str(args.k),
        "--seq-len",
        str(args.seq_len),
        "--backend",
        backend,
        "--max-sequences",
        str(args.num_seqs),
        "--dtype",
        args.dtype,
        "--batch-size",
        str(args.hf_batch_size),
        "--device",
        args.device,
        "--tensor-parallel-size",
        str(args.tensor_parallel_size),
        "--text-field",
        args.text_field,
        "--messages-field",
        args.messages_field,
        "--split",
        args.split,
        "--overwrite",
        "--no-progress",
    ]
    if args.gpu_memory_utilization is not None:
        cmd += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    if args.enforce_eager:
        cmd += ["--enforce-eager"]
    if args.revision:
        cmd += ["--revision", args.revision]
    if args.trust_remote_code:
        cmd += ["--trust-remote-code"]
    print("$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO)
    return out, time.perf_counter() - start


def step_pipeline(args, teacher: str, backends: list[str], results: Results) -> list[str]:
    caches = {}
    for backend in backends:
        out, seconds = run_pipeline(args, teacher, backend)
        info, rows = read_cache(out)
        caches[backend] = rows
        results.add(
            f"pipeline_{backend}",
            cache=str(out),
            wall_s_incl_load=seconds,
            tokens=info.num_tokens,
            bytes_per_token=info.num_bytes / max(info.num_tokens, 1),
            backend=info.manifest.backend,
        )
    if len(caches) < 2:
        return []
    a, b = caches["hf"], caches["vllm"]
    if not (np.array_equal(a.seq_ids, b.seq_ids) and np.array_equal(a.input_ids, b.input_ids)):
        raise SystemExit("the two caches hold different token sequences; cannot compare them")
    parity = compare(a.topk_ids, a.topk_logprobs, a.target_logprob, b.topk_ids, b.topk_logprobs, b.target_logprob)
    results.add("pipeline_parity", **parity)
    return [f"pipeline caches: {p}" for p in verdict(parity, args)]


# ---------------------------------------------------------------------------------------------------


TABLE = (
    ("hf", "tokens_per_s", "HF score() tokens/s", "{:,.0f}"),
    ("hf", "writer_share", "writer share of score+write", "{:.1%}"),
    ("hf", "write_tokens_per_s", "writer tokens/s", "{:,.0f}"),
    ("hf", "bytes_per_token", "bytes/token", "{:.1f}"),
    ("hf", "load_s", "HF load s", "{:.1f}"),
    ("vllm", "tokens_per_s", "vLLM score() tokens/s", "{:,.0f}"),
    ("vllm", "load_s", "vLLM engine start s", "{:.1f}"),
    ("vllm", "top1_agreement", "top-1 id agreement", "{:.4%}"),
    ("vllm", "topk_overlap", "top-k id overlap", "{:.4%}"),
    ("vllm", "logprob_abs_diff_max", "max |Δ logprob| shared", "{:.4f}"),
    ("vllm", "target_abs_diff_max", "max |Δ target_logprob|", "{:.4f}"),
    ("pipeline_parity", "top1_agreement", "caches: top-1 agreement", "{:.4%}"),
    ("pipeline_parity", "topk_overlap", "caches: top-k overlap", "{:.4%}"),
)


def print_table(title: str, results: Results) -> None:
    by_step = {r["step"]: r for r in results.records}
    rows = [(label, fmt.format(by_step[s][key])) for s, key, label, fmt in TABLE if key in by_step.get(s, {})]
    if "hf" in by_step and "vllm" in by_step:
        rows.append(("vLLM / HF speed", f"{by_step['vllm']['tokens_per_s'] / by_step['hf']['tokens_per_s']:.2f}x"))
    width = max([len(name) for name, _ in rows] + [10])
    print(f"\n{title}\n" + "-" * (width + 22))
    for name, value in rows:
        print(f"{name:<{width}}  {value:>20}")


def main(argv=None) -> int:
    import torch

    from bench.common import cpu_model

    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = Results(args.out / "gpu_check.jsonl")
    on_cuda = torch.cuda.is_available()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if "vllm" in backends and importlib.util.find_spec("vllm") is None:
        print("note: vllm is not installed here; the vLLM steps are skipped", file=sys.stderr)
        backends.remove("vllm")
    results.add(
        "machine",
        device=torch.cuda.get_device_name(0) if on_cuda else f"{os.cpu_count()} CPUs ({cpu_model()})",
        torch=torch.__version__,
        python=platform.python_version(),
        args={k: str(v) for k, v in vars(args).items()},
    )
    teacher = args.teacher
    if teacher is None:
        path, params, seconds = build_teacher(args.build_teacher, args.out, args.dtype)
        teacher = str(path)
        results.add("build_teacher", shape=args.build_teacher, params=params, seconds=seconds, path=teacher)
    input_ids = build_sequences(args, teacher)
    problems: list[str] = []
    hf_scores = step_hf(args, teacher, input_ids, results) if "hf" in backends else None
    if "vllm" in backends:
        problems += step_vllm(args, teacher, input_ids, hf_scores, results)
    if args.via_pipeline:
        if args.data is None:
            raise SystemExit("--via-pipeline needs --data (the CLI reads a dataset)")
        free_cuda()
        problems += step_pipeline(args, teacher, backends, results)
    results.add("verdict", problems=problems, ok=not problems)
    print_table(f"{input_ids.shape[0]} sequences x {args.seq_len} tokens, k={args.k}, teacher {teacher}", results)
    print(f"\nresults: {results.path}")
    for p in problems:
        print(f"PARITY BELOW THRESHOLD: {p}", file=sys.stderr)
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
