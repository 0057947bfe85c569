"""SWITCH data vs teacher-written vs student-written data, end to end on the quality benchmark's material.

For one set of prompts, `pipeline generate` writes three datasets: the teacher writes every response
(``teacher``), the student does (``student``), or the student writes and the teacher steps in where their
next-token distributions disagree (``switch``, Koo et al. 2024). Each dataset is cached by the teacher and
distills the same student (same init, loss, steps, batch size, seed); every student is scored on the same
held-out teacher cache. The question: at an equal training budget, which data makes the better student?

    python -m bench.bench_switch                # SmolLM2-135M-Instruct -> its 6-layer cut, Moby Dick
    python -m bench.bench_switch --quick        # smoke-sized
    python -m bench.bench_switch --teacher DIR --student DIR --data TRAIN.jsonl --eval-data HELDOUT.jsonl

Steps, all under ``--out`` (rerunning resumes generation and caching; training runs restart):

1. warm-up: the material's student is a layer cut of the teacher with untrained-quality outputs, and
   SWITCH assumes a student that can write. It is first distilled for ``warmup_steps`` on the teacher's
   cache of the training text (0 skips this); that model generates and is every run's initialization.
2. prompts: the first ``prompt_chars`` characters (cut at a space) of paragraphs of the training text,
   ``num_prompts`` of them, as plain-text prompts: the responses are continuations, the held-out text's
   genre. Plain records are cached as prompt + response (prompt tokens trained too, equally in all modes).
3. generate each mode with both models loaded (single-writer modes still record the JSD: how far the
   student is from the teacher on that data), sampled (``temperature``, ``top_p``, ``seed``).
4. cache-teacher each dataset; distill the warmed-up student with forward KL; score on the held-out cache.

Results: ``results.json`` and ``report.md`` (per mode: responses' tokens, teacher share, mean JSD,
generation tokens/s, eval CE / KL / top-1 agreement before and after training).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kd_pipeline.cache.build import CacheConfig, cache_teacher
from kd_pipeline.cache.generate import (
    DEFAULT_DECAY,
    DEFAULT_TAU0,
    MODES,
    GenerateConfig,
    generate,
    load_models,
    load_tokenizer,
)
from kd_pipeline.train.trainer import CHECKPOINT_DIR, FINAL_DIR, DistillConfig, distill


@dataclass(frozen=True)
class Settings:
    num_prompts: int = 256
    prompt_chars: int = 240
    max_new_tokens: int = 128
    temperature: float = 0.8
    top_p: float = 0.95
    tau0: float = DEFAULT_TAU0
    decay: float = DEFAULT_DECAY
    gen_batch_size: int = 16
    seq_len: int = 128
    top_k: int = 64
    batch_size: int = 4
    steps: int = 128
    warmup_steps: int = 64
    lr: float = 5e-4
    eval_sequences: int = 16
    seed: int = 0
    device: str = "auto"


FULL = Settings()
QUICK = Settings(
    num_prompts=8,
    prompt_chars=80,
    max_new_tokens=24,
    gen_batch_size=4,
    seq_len=64,
    top_k=16,
    steps=8,
    warmup_steps=4,
    eval_sequences=4,
)


@dataclass(frozen=True)
class Material:
    teacher: str
    student: str
    data: str  # training text: prompts and the warm-up cache come from it
    eval_data: str  # held-out text, cached once by the teacher for scoring


def default_material() -> Material:
    from bench import material

    return Material(
        teacher=str(material.teacher_dir()),
        student=str(material.student_dir()),
        data=str(material.corpus("moby-dick-train")),
        eval_data=str(material.corpus("moby-dick-heldout")),
    )


def _log(message: str) -> None:
    print(f"[switch] {message}", file=sys.stderr, flush=True)


def write_prompts(data: str, out: Path, s: Settings) -> Path:
    """Plain-text prompts: the opening ``prompt_chars`` characters of paragraphs long enough to hold them."""
    from kd_pipeline.cache.data import iter_documents

    prompts = []
    for doc in iter_documents(data):
        text = doc if isinstance(doc, str) else "\n".join(m["content"] for m in doc)
        for paragraph in re.split(r"\n\s*\n", text):
            paragraph = " ".join(paragraph.split())
            if len(paragraph) > s.prompt_chars:
                prompts.append(paragraph[: s.prompt_chars].rsplit(" ", 1)[0])
    if len(prompts) < s.num_prompts:
        raise SystemExit(f"{data}: only {len(prompts)} paragraphs longer than {s.prompt_chars} characters")
    step = len(prompts) / s.num_prompts  # spread over the whole text, not its first chapters
    chosen = [prompts[int(i * step)] for i in range(s.num_prompts)]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in chosen))
    return out


def cache(teacher: str, data: Path | str, out: Path, s: Settings, max_sequences: int | None = None):
    return cache_teacher(
        CacheConfig(
            teacher=teacher,
            data=str(data),
            out=out,
            top_k=s.top_k,
            seq_len=s.seq_len,
            device=s.device,
            max_sequences=max_sequences,
            shard_tokens=s.seq_len * 64,
            row_group_tokens=s.seq_len * 16,
            progress=False,
        )
    )


def train(student: str, cache_dir: Path, eval_cache: Path, out: Path, steps: int, s: Settings) -> list[dict]:
    shutil.rmtree(out, ignore_errors=True)  # distill refuses to overwrite a finished run
    distill(
        DistillConfig(
            student=student,
            cache=cache_dir,
            out=out,
            loss="fkl",
            batch_size=s.batch_size,
            lr=s.lr,
            warmup_steps=max(1, steps // 10),
            max_steps=steps,
            seed=s.seed,
            eval_cache=eval_cache,
            eval_every=steps,
            eval_at_start=True,
            save_every=steps,
            keep_checkpoints=1,
            log_every=max(1, steps // 8),
            device=s.device,
            progress=False,
        )
    )
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _evals(metrics: list[dict]) -> tuple[dict, dict]:
    evals = [m for m in metrics if "eval_kl" in m]
    return evals[0], evals[-1]


def data_stats(path: Path) -> dict:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    tokens = sum(len(r["token_ids"]) for r in records)
    jsd = [x for r in records for x in (r["jsd"] or [])]
    return {
        "responses": len(records),
        "tokens": tokens,
        "mean_response_tokens": tokens / max(len(records), 1),
        "teacher_share": sum(sum(r["teacher_chosen"]) for r in records) / max(tokens, 1),
        "mean_jsd": sum(jsd) / len(jsd) if jsd else None,
        "stopped_at_eos": sum(r["finish_reason"] == "eos" for r in records) / max(len(records), 1),
    }


def run_experiment(material: Material, s: Settings, out: Path) -> dict:
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    _log(f"settings: {json.dumps(dataclasses.asdict(s))}")
    eval_cache = out / "caches" / "heldout"
    cache(material.teacher, material.eval_data, eval_cache, s, max_sequences=s.eval_sequences)

    student = material.student
    warmup = None
    if s.warmup_steps:
        _log(f"warm-up: {s.warmup_steps} steps on the teacher's cache of the training text")
        warm_cache = out / "caches" / "warmup"
        cache(material.teacher, material.data, warm_cache, s, max_sequences=s.warmup_steps * s.batch_size)
        before, after = _evals(train(student, warm_cache, eval_cache, out / "runs" / "warmup", s.warmup_steps, s))
        student, warmup = str(out / "runs" / "warmup" / FINAL_DIR), {"before": before, "after": after}

    prompts = write_prompts(material.data, out / "prompts.jsonl", s)
    base = GenerateConfig(
        prompts=str(prompts),
        out=out,
        teacher=material.teacher,
        student=student,
        max_new_tokens=s.max_new_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        seed=s.seed,
        tau0=s.tau0,
        decay=s.decay,
        batch_size=s.gen_batch_size,
        device=s.device,
        progress=False,
    )
    models = None  # loaded once for the three modes, only if some generation is left to do
    results = {}
    for mode in MODES:
        data = out / "data" / f"{mode}.jsonl"
        cfg = dataclasses.replace(base, mode=mode, out=data)
        if models is None and not _complete(data, s.num_prompts):
            models = load_models(cfg, load_tokenizer(cfg))
        _log(f"{mode}: generate")
        summary = generate(cfg, models)
        _log(f"{mode}: cache and distill")
        mode_cache = out / "caches" / mode
        cache_seconds = time.perf_counter()
        cache(material.teacher, data, mode_cache, s)
        cache_seconds = time.perf_counter() - cache_seconds
        before, after = _evals(train(student, mode_cache, eval_cache, out / "runs" / mode, s.steps, s))
        results[mode] = {
            **data_stats(data),
            "generate_tokens_per_s": summary.tokens_per_s if summary.generated else None,
            "cache_seconds": cache_seconds,
            "before": before,
            "after": after,
        }
        _log(f"  {json.dumps(results[mode])}")
    report = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "material": dataclasses.asdict(material),
        "settings": dataclasses.asdict(s),
        "warmup": warmup,
        "modes": results,
        "total_seconds": time.perf_counter() - started,
    }
    (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def _complete(data: Path, num_prompts: int) -> bool:
    return data.exists() and sum(1 for _ in open(data)) >= num_prompts


def format_report(r: dict) -> str:
    s = r["settings"]
    lines = [
        f"Date: {r['date']}. Teacher `{Path(r['material']['teacher']).name}`, student "
        f"`{Path(r['material']['student']).name}`"
        + (f" warmed up for {s['warmup_steps']} steps" if r["warmup"] else "")
        + f"; {s['num_prompts']} prompts of {s['prompt_chars']} characters from "
        f"`{Path(r['material']['data']).name}`, up to {s['max_new_tokens']} new tokens, temperature "
        f"{s['temperature']:g}, top-p {s['top_p']:g}; SWITCH tau0 {s['tau0']:g}, lambda {s['decay']:g}.",
        f"Each dataset: cached by the teacher (top-{s['top_k']}, {s['seq_len']}-token sequences), then the same "
        f"student trained {s['steps']} steps x {s['batch_size']} sequences with forward KL, lr {s['lr']:g}; "
        f"scored on {s['eval_sequences']} held-out sequences of `{Path(r['material']['eval_data']).name}` "
        "(KL on the cache's top-k + rest bins).",
        "",
        "| data | tokens | tokens/response | teacher share | mean JSD | gen tok/s | eval CE | eval KL | top-1 agree |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    first = next(iter(r["modes"].values()))["before"]
    lines.append(f"| (start) | | | | | | {first['eval_ce']:.3f} | {first['eval_kl']:.4f} | {first['eval_top1']:.3f} |")
    for mode, m in r["modes"].items():
        jsd = f"{m['mean_jsd']:.3f}" if m["mean_jsd"] is not None else "-"
        rate = f"{m['generate_tokens_per_s']:,.0f}" if m["generate_tokens_per_s"] else "-"
        a = m["after"]
        lines.append(
            f"| {mode} | {m['tokens']:,} | {m['mean_response_tokens']:.1f} | {m['teacher_share']:.1%} | {jsd} | {rate} | "
            f"{a['eval_ce']:.3f} | {a['eval_kl']:.4f} | {a['eval_top1']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_switch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke-sized run")
    parser.add_argument("--teacher", help="teacher HF dir or hub id (default: the bench.material teacher)")
    parser.add_argument(
        "--student", help="student HF dir or hub id, same tokenizer (default: the teacher's 6-layer cut)"
    )
    parser.add_argument(
        "--data", help="training text, any format cache-teacher reads (default: Moby Dick minus held-out)"
    )
    parser.add_argument("--eval-data", help="held-out text (default: every tenth Moby Dick chapter)")
    parser.add_argument("--out", type=Path, help="output directory (default: runs/switch or runs/switch-quick)")
    for f in dataclasses.fields(Settings):
        quick = getattr(QUICK, f.name)
        parser.add_argument(
            f"--{f.name.replace('_', '-')}", type=type(f.default), help=f"(default: {f.default}; quick: {quick})"
        )
    args = parser.parse_args(argv)

    given = [args.teacher, args.student, args.data, args.eval_data]
    if any(given) and not all(given):
        parser.error("give all of --teacher, --student, --data and --eval-data, or none (the offline material)")
    material = Material(*given) if all(given) else default_material()
    overrides = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(Settings) if getattr(args, f.name) is not None
    }
    settings = dataclasses.replace(QUICK if args.quick else FULL, **overrides)
    out = args.out or Path("runs") / ("switch-quick" if args.quick else "switch")

    report = run_experiment(material, settings, out)
    text = format_report(report)
    (out / "report.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
