"""Issue 21: many teachers, one student, on real material (docs/multi-teacher.md). One command::

    python -m bench.bench_multiteacher            # SmolLM2-135M + a State-of-the-Union expert -> the 6-layer cut
    python -m bench.bench_multiteacher --quick    # smoke run: tiny steps, numbers that mean nothing

Two teachers that differ in what they know: the SmolLM2-135M teacher (``base``) and a copy of it fine-tuned for
``--finetune-steps`` on State of the Union addresses (``expert``; every tenth address held out). Two domains: Moby
Dick (every tenth chapter held out, bench/material.py) and the addresses. Students, all the same 6-layer cut, seed,
optimizer, steps and tokens per step:

- mixture: ``base@moby`` alone, ``expert@sotu`` alone, and their mixture (weights 0.5 / 0.5: half the trained tokens
  from each cache);
- ensemble on the addresses: ``base@sotu`` alone, ``expert@sotu`` alone (the run above), and the ensemble of both,
  with static weights and with per-position weights (temperature 1).

Each student is scored on both held-out domains against each live teacher over the FULL vocabulary (bench/quality.py's
:class:`HeldOut`): KL(teacher‖student) and bits per byte. Results: ``--out``/results.json and report.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench.common import cpu_model
from bench.quality import HeldOut, load_model
from kd_pipeline.cache.build import CacheConfig, cache_teacher
from kd_pipeline.cache.format.manifest import load_cache
from kd_pipeline.train.trainer import DistillConfig, distill


@dataclass(frozen=True)
class Settings:
    seq_len: int = 128
    batch_size: int = 4
    steps: int = 48
    lr: float = 5e-4
    warmup_steps: int = 5
    top_k: int = 64
    finetune_steps: int = 60
    finetune_lr: float = 1e-4
    eval_sequences: int = 12
    seed: int = 0

    @property
    def train_sequences(self) -> int:
        return self.steps * self.batch_size  # one pass for a single cache


FULL = Settings()
QUICK = Settings(seq_len=32, batch_size=2, steps=2, warmup_steps=0, top_k=16, finetune_steps=2, eval_sequences=2)


def _log(message: str) -> None:
    print(f"[multiteacher] {message}", file=sys.stderr, flush=True)


def split_sotu(root: Path) -> tuple[Path, Path]:
    """The State of the Union addresses as training and held-out jsonl (every tenth address held out)."""
    from bench import material

    docs = [json.loads(line) for line in material.corpus("sotu").read_text().splitlines()]
    train, held = root / "sotu-train.jsonl", root / "sotu-heldout.jsonl"
    for path, keep in ((train, lambda i: i % 10 != 0), (held, lambda i: i % 10 == 0)):
        path.write_text("".join(json.dumps({"text": d["text"]}) + "\n" for i, d in enumerate(docs) if keep(i)))
    return train, held


def finetune(teacher: str, data: Path, out: Path, s: Settings) -> Path:
    """The teacher trained with CE for ``s.finetune_steps`` steps on ``data``: the domain expert."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").exists():
        return out
    tok = AutoTokenizer.from_pretrained(teacher)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
    ids: list[int] = []
    for line in data.read_text().splitlines():
        ids += tok(json.loads(line)["text"])["input_ids"] + [tok.eos_token_id]
    seqs = torch.tensor(ids[: len(ids) // s.seq_len * s.seq_len]).view(-1, s.seq_len)
    order = list(range(len(seqs)))
    random.Random(s.seed).shuffle(order)
    torch.manual_seed(s.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.finetune_lr, weight_decay=0.0)
    model.train()
    started = time.perf_counter()
    for step in range(s.finetune_steps):
        rows = [order[(step * s.batch_size + j) % len(order)] for j in range(s.batch_size)]
        batch = seqs[rows]
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == s.finetune_steps - 1:
            _log(f"fine-tune step {step + 1}/{s.finetune_steps}: CE {loss.item():.3f}")
    _log(f"fine-tuned the expert in {time.perf_counter() - started:.0f} s")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


def build(teacher: str, data: Path, out: Path, sequences: int, s: Settings) -> Path:
    if not (out / "manifest.json").exists():
        cache_teacher(
            CacheConfig(
                teacher=teacher,
                data=str(data),
                out=out,
                top_k=s.top_k,
                seq_len=s.seq_len,
                batch_size=8,
                max_sequences=sequences,
                progress=False,
            )
        )
    return out


def train(name: str, student: str, caches: list[str], root: Path, s: Settings, **kw) -> dict:
    out = root / "runs" / name
    shutil.rmtree(out, ignore_errors=True)
    cfg = DistillConfig(
        student=student,
        cache=caches,
        out=out,
        loss="fkl",
        batch_size=s.batch_size,
        lr=s.lr,
        warmup_steps=s.warmup_steps,
        max_steps=s.steps,
        seed=s.seed,
        eval_sequences=0,  # scored below, over the full vocabulary
        save_every=s.steps,
        keep_checkpoints=1,
        log_every=1,
        device="cpu",
        progress=False,
        **kw,
    )
    started = time.perf_counter()
    distill(cfg)
    seconds = time.perf_counter() - started
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    tokens = sum(json.loads(line).get("tokens", 0) for line in (out / "metrics.jsonl").read_text().splitlines())
    _log(f"{name}: {s.steps} steps, {tokens} trained tokens, {seconds:.0f} s")
    return {"final": str(out / "final"), "seconds": seconds, "tokens": tokens}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_multiteacher", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny steps (the numbers mean nothing)")
    parser.add_argument("--out", type=Path, default=Path("bench-multiteacher"))
    parser.add_argument("--steps", type=int, help="student steps (default 48; quick 2)")
    parser.add_argument("--finetune-steps", type=int, help="expert fine-tuning steps (default 60; quick 2)")
    args = parser.parse_args(argv)
    s = QUICK if args.quick else FULL
    if args.steps:
        s = Settings(**{**asdict(s), "steps": args.steps})
    if args.finetune_steps:
        s = Settings(**{**asdict(s), "finetune_steps": args.finetune_steps})
    from bench import material

    root = args.out
    (root / "data").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    teacher, student = str(material.teacher_dir()), str(material.student_dir())
    moby, moby_held = material.corpus("moby-dick-train"), material.corpus("moby-dick-heldout")
    sotu, sotu_held = split_sotu(root / "data")
    expert = str(finetune(teacher, sotu, root / "expert", s))
    c = root / "caches"
    n = s.train_sequences
    caches = {
        "base@moby": build(teacher, moby, c / "base-moby", n, s),
        "expert@sotu": build(expert, sotu, c / "expert-sotu", n, s),
        "base@sotu": build(teacher, sotu, c / "base-sotu", n, s),
    }
    held = {
        "moby": build(teacher, moby_held, c / "heldout-moby", s.eval_sequences, s),
        "sotu": build(teacher, sotu_held, c / "heldout-sotu", s.eval_sequences, s),
    }
    _log(f"material, expert and caches ready after {time.perf_counter() - started:.0f} s")

    runs = {
        "base@moby": dict(caches=[f"base_moby={caches['base@moby']}"]),
        "expert@sotu": dict(caches=[f"expert_sotu={caches['expert@sotu']}"]),
        "mixture": dict(
            caches=[f"base_moby={caches['base@moby']}", f"expert_sotu={caches['expert@sotu']}"], cache_weights="1,1"
        ),
        "base@sotu": dict(caches=[f"base_sotu={caches['base@sotu']}"]),
        "ensemble": dict(caches=[f"base={caches['base@sotu']}", f"expert={caches['expert@sotu']}"], combine="ensemble"),
        "ensemble-t1": dict(
            caches=[f"base={caches['base@sotu']}", f"expert={caches['expert@sotu']}"],
            combine="ensemble",
            ensemble_temperature=1.0,
        ),
    }
    trained = {}
    for name, kw in runs.items():
        caches_of = kw.pop("caches")
        trained[name] = train(name.replace("@", "-"), student, caches_of, root, s, **kw)

    device = torch.device("cpu")
    scores: dict = {name: {} for name in ["teacher:base", "teacher:expert", "student:untrained", *trained]}
    for t_name, t_spec in (("base", teacher), ("expert", expert)):
        t_model = load_model(t_spec, device)
        for domain, cache in held.items():
            ho = HeldOut(load_cache(cache), t_model, s.batch_size, device)
            for name, spec in [
                ("teacher:base", teacher),
                ("teacher:expert", expert),
                ("student:untrained", student),
                *((k, v["final"]) for k, v in trained.items()),
            ]:
                model = t_model if spec == t_spec else load_model(spec, device)
                r = ho.score(model)
                scores[name][f"{domain}/kl_{t_name}"] = r["kl"]
                scores[name][f"{domain}/bpb"] = r["bpb"]
                del model
            del ho
        del t_model
    report = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{cpu_model()}, {torch.get_num_threads()} threads, {platform.platform()}",
        "settings": asdict(s),
        "quick": args.quick,
        "runs": trained,
        "scores": scores,
        "seconds": time.perf_counter() - started,
    }
    (root / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    table = format_table(scores)
    (root / "report.md").write_text(table + "\n")
    print(table)
    _log(f"done in {report['seconds']:.0f} s: {root / 'results.json'}")
    return 0


def format_table(scores: dict) -> str:
    cols = ["moby/bpb", "moby/kl_base", "moby/kl_expert", "sotu/bpb", "sotu/kl_base", "sotu/kl_expert"]
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in scores.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[c]:.4f}" if c in r else "-" for c in cols) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
