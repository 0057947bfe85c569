"""A student of another tokenizer, distilled from a cache: CE alone against ``--cross-tokenizer`` KD, in bits per byte.

One command (``python -m bench.bench_cross_tokenizer``): the SmolLM2-135M teacher (bench.material, 49,152 ids)
caches its top-k on Moby Dick chapters (``corpus("moby-dick-train")``) and on the held-out chapters
(``corpus("moby-dick-heldout")``); a small Llama with GPT-2's tokenizer (50,257 ids, random init, the same for every
run) is trained on the same cached text with each loss, ``pipeline distill --cross-tokenizer`` as a user would run
it, and evaluated on the held-out cache. Bits per byte of held-out text is the figure that compares them (its CE
is per GPT-2 token). Every run sees the same batches in the same order (same cache, seed, options).

Defaults are sized for a shared 2-core CPU (about 15 minutes in all under load); the table states the budget.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from bench import material


def _cache(data: Path, out: Path, args, sequences: int) -> float:
    from kd_pipeline.cache.build import CacheConfig, cache_teacher

    if (out / "manifest.json").exists():
        return 0.0  # built by an earlier run of this bench with the same --work: reused
    started = time.perf_counter()
    cache_teacher(
        CacheConfig(
            teacher=str(material.teacher_dir()),
            data=str(data),
            out=out,
            top_k=args.top_k,
            seq_len=args.seq_len,
            max_sequences=sequences,
            batch_size=8,
            progress=False,
        )
    )
    return time.perf_counter() - started


def _student(root: Path, args) -> Path:
    """A from-scratch Llama config with GPT-2's tokenizer beside it (load_student builds it from the config)."""
    from transformers import AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(material.gpt2_tokenizer_dir())
    path = root / "student"
    tok.save_pretrained(path)
    LlamaConfig(
        vocab_size=len(tok),
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2 * args.seq_len,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    ).save_pretrained(path)
    return path


RUNS = {  # name: (loss, extra DistillConfig fields)
    "ce": ("ce", {}),
    "fkl same-token": ("fkl", {}),
    "fkl aligned": ("fkl", {"cross_tokenizer_positions": "aligned"}),
    "uld + ce": ("uld", {"ce_weight": 1.0}),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=material.material_root() / "bench-cross-tokenizer")
    parser.add_argument("--runs", default="ce,fkl same-token", help=f"comma-separated, of: {', '.join(RUNS)}")
    parser.add_argument("--train-sequences", type=int, default=48)
    parser.add_argument("--eval-sequences", type=int, default=12)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args(argv)
    names = args.runs.split(",")
    unknown = sorted(set(names) - set(RUNS))
    if unknown:
        parser.error(f"unknown runs {unknown}; choose from {', '.join(RUNS)}")

    from kd_pipeline.train.trainer import DistillConfig, distill

    started = time.perf_counter()
    load = os.getloadavg()
    root = args.work
    root.mkdir(parents=True, exist_ok=True)
    train_cache, eval_cache = root / "cache-train", root / "cache-heldout"
    cache_s = _cache(material.corpus("moby-dick-train"), train_cache, args, args.train_sequences)
    cache_s += _cache(material.corpus("moby-dick-heldout"), eval_cache, args, args.eval_sequences)
    student = _student(root, args)
    rows = []
    for name in names:
        loss, extra = RUNS[name]
        out = root / "runs" / name.replace(" ", "_").replace("+", "plus")
        if out.exists():
            import shutil

            shutil.rmtree(out)
        run_started = time.perf_counter()
        distill(
            DistillConfig(
                student=str(student),
                cache=train_cache,
                out=out,
                loss=loss,
                cross_tokenizer=True,
                max_steps=args.steps,
                batch_size=args.batch_size,
                lr=args.lr,
                warmup_steps=max(1, args.steps // 10),
                eval_cache=eval_cache,
                eval_every=args.steps,
                save_every=10 * args.steps,
                log_every=10,
                progress=False,
                seed=0,
                **extra,
            )
        )
        evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "eval_bpb" in line]
        rows.append((name, loss, extra, evals[0], evals[-1], time.perf_counter() - run_started))

    total = time.perf_counter() - started
    ce_bpb = next((last["eval_bpb"] for name, *_, last, _s in rows if name == "ce"), None)
    print(
        f"\nMachine: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), load average at start "
        f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}"
    )
    print(
        f"Teacher: SmolLM2-135M-Instruct (49,152 ids), top-{args.top_k} cache of {args.train_sequences} x "
        f"{args.seq_len} Moby Dick tokens (train) and {args.eval_sequences} x {args.seq_len} of the held-out chapters; "
        f"student: Llama {args.layers} layers x {args.hidden} wide, GPT-2 tokenizer (50,257 ids, tied embeddings), "
        f"random init; budget {args.steps} steps x {args.batch_size} sequences, lr {args.lr}."
    )
    print(
        "\n| run | loss | distilled at | held-out bits/byte | vs ce | held-out CE (nats per GPT-2 token) | "
        "KD positions | train + eval s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, loss, extra, first, last, seconds in rows:
        where = "-" if loss == "ce" else extra.get("cross_tokenizer_positions", "same-token")
        rel = "" if ce_bpb is None or name == "ce" else f"{100 * (last['eval_bpb'] / ce_bpb - 1):+.1f}%"
        print(
            f"| {name} | {loss} | {where} | {first['eval_bpb']:.3f} -> {last['eval_bpb']:.3f} | {rel} | "
            f"{last['eval_ce']:.3f} | {last['eval_kd_tokens'] / max(last['eval_tokens'], 1):.0%} of "
            f"{last['eval_tokens']:,} | {seconds:.0f} |"
        )
    print(f"\nteacher caches built in {cache_s:.0f} s; whole bench {total:.0f} s")


if __name__ == "__main__":
    main()
