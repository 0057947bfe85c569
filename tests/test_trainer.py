"""Stage two end to end: distillation works (numbers), exact resume after kill -9, DDP, CLI, plot."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kd_pipeline.pipeline import app
from kd_pipeline.train.trainer import DistillConfig, distill, latest_checkpoint


def run(student, cache, out, **kw) -> dict:
    base = dict(
        student=str(student),
        cache=Path(cache),
        out=Path(out),
        batch_size=8,
        lr=3e-3,
        warmup_steps=5,
        max_steps=60,
        eval_every=1000,
        eval_sequences=12,
        save_every=1000,
        log_every=5,
        progress=False,
    )
    base.update(kw)
    return distill(DistillConfig(**base))


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def quality_runs(tmp_path_factory, small_cache, student_config) -> dict[str, tuple[dict, dict]]:
    """(first eval, last eval) for a CE-only, an FKL and a TAID student trained the same way."""
    results = {}
    for loss in ("ce", "fkl", "taid"):
        out = tmp_path_factory.mktemp(f"run_{loss}")
        run(student_config, small_cache, out, loss=loss, max_steps=150, eval_every=150, eval_at_start=True)
        evals = [m for m in metrics(out) if "eval_kl" in m]
        results[loss] = (evals[0], evals[-1])
    return results


@pytest.mark.parametrize("loss", ["fkl", "taid"])
def test_kd_student_approaches_the_teacher(quality_runs, loss):
    first, last = quality_runs[loss]
    assert first["step"] == 0 and last["step"] == 150
    assert last["eval_kl"] < 0.5 * first["eval_kl"]  # KL to the teacher on held-out sequences halves at least
    assert last["eval_kl"] < 0.7 * quality_runs["ce"][1]["eval_kl"]  # and ends well below a CE-only student
    assert last["eval_top1"] > quality_runs["ce"][1]["eval_top1"]


def test_taid_schedule_is_logged_and_monotone(tmp_path, small_cache, student_config):
    out = tmp_path / "taid"
    run(student_config, small_cache, out, loss="taid", max_steps=20, log_every=1)
    ts = [m["taid_t"] for m in metrics(out) if "taid_t" in m]
    assert len(ts) == 20 and ts[0] == pytest.approx(0.4) and all(b >= a for a, b in zip(ts, ts[1:]))
    assert ts[-1] >= 0.4 + 0.6 * 19 / 20 - 1e-9  # never below the linear floor


BIN = Path(sys.executable).parent  # the venv's console scripts: the launch form that ignores the working directory


def _distill_cmd(student, cache, out, steps, extra=()) -> list[str]:
    return [
        str(BIN / "pipeline"),
        "distill",
        "--student",
        str(student),
        "--cache",
        str(cache),
        "--out",
        str(out),
        "--loss",
        "taid",
        "--batch-size",
        "4",
        "--grad-accum",
        "2",
        "--lr",
        "3e-3",
        "--max-steps",
        str(steps),
        "--save-every",
        "10",
        "--eval-every",
        "1000",
        "--eval-sequences",
        "12",
        "--log-every",
        "1",
        "--no-progress",
        *extra,
    ]


def test_kill_9_and_resume_reproduces_the_uninterrupted_run(tmp_path, small_cache, student_config):
    steps = 200
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    ref = subprocess.run(_distill_cmd(student_config, small_cache, ref_out, steps), capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-3000:]
    proc = subprocess.Popen(
        _distill_cmd(student_config, small_cache, out, steps), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        ckpt = latest_checkpoint(out)
        if ckpt is not None and int(ckpt.name.removeprefix("step-")) >= 20:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = int(latest_checkpoint(out).name.removeprefix("step-"))
    assert 20 <= killed_at < steps
    refused = subprocess.run(_distill_cmd(student_config, small_cache, out, steps), capture_output=True, text=True)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    resumed = subprocess.run(
        _distill_cmd(student_config, small_cache, out, steps, ["--resume"]), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    a = {m["step"]: m for m in metrics(ref_out) if "loss" in m}
    b = {m["step"]: m for m in metrics(out) if "loss" in m}
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    for s in range(1, steps + 1):
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], rel=1e-5, abs=1e-7), s
        assert b[s]["taid_t"] == pytest.approx(a[s]["taid_t"], rel=1e-9), s
    from safetensors.torch import load_file

    wa, wb = load_file(ref_out / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_ddp_two_processes_on_cpu(tmp_path, small_cache, student_config):
    out = tmp_path / "ddp"
    cmd = [
        str(BIN / "torchrun"),
        "--nproc-per-node",
        "2",
        "--master-port",
        "29533",
        "--no-python",
        str(BIN / "pipeline"),
        "distill",
        "--student",
        str(student_config),
        "--cache",
        str(small_cache),
        "--out",
        str(out),
        "--loss",
        "fkl",
        "--batch-size",
        "4",
        "--lr",
        "3e-3",
        "--max-steps",
        "40",
        "--eval-every",
        "20",
        "--eval-sequences",
        "12",
        "--save-every",
        "20",
        "--log-every",
        "5",
        "--no-progress",
        "--device",
        "cpu",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    evals = [m for m in metrics(out) if "eval_kl" in m]
    assert [m["step"] for m in evals] == [0, 20, 40]  # the untrained student first (--eval-at-start)
    # Both ranks evaluated their half: the token count is the whole held-out set (12 seqs x 31 targets).
    assert evals[-1]["eval_tokens"] == 12 * 31
    ckpt = latest_checkpoint(out)
    assert (ckpt / "rng-rank0.pt").exists() and (ckpt / "rng-rank1.pt").exists()
    losses = [m["loss"] for m in metrics(out) if "loss" in m]
    assert losses[-1] < losses[0]
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out / "final") is not None


def test_student_with_another_tokenizer_is_refused(tmp_path, small_cache):
    from tests.conftest import build_llama, build_tokenizer

    student = tmp_path / "student"
    tok = build_tokenizer(student, vocab_size=300)
    build_llama(student, len(tok), layers=1, hidden=32)
    result = CliRunner().invoke(
        app,
        [
            "distill",
            "--student",
            str(student),
            "--cache",
            str(small_cache),
            "--out",
            str(tmp_path / "o"),
            "--max-steps",
            "1",
        ],
    )
    assert result.exit_code == 2
    assert "tokenizer differs from the teacher" in result.output and "--cross-tokenizer" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_bad_loss_name_lists_the_choices(tmp_path, small_cache, student_config):
    result = CliRunner().invoke(
        app,
        [
            "distill",
            "--student",
            str(student_config),
            "--cache",
            str(small_cache),
            "--out",
            str(tmp_path / "o"),
            "--loss",
            "kl",
        ],
    )
    assert result.exit_code == 2 and "taid" in result.output and "atkd" in result.output


@pytest.mark.parametrize("loss", ["rkl", "js", "sfkl", "srkl", "atkd"])
def test_every_loss_trains(tmp_path, small_cache, student_config, loss):
    out = tmp_path / loss
    run(student_config, small_cache, out, loss=loss, max_steps=30, eval_every=30, ce_weight=0.1, eval_at_start=True)
    evals = [m for m in metrics(out) if "eval_kl" in m]
    assert evals[-1]["eval_kl"] < evals[0]["eval_kl"]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics(out) if "loss" in m)
    # The run joined its reader's prefetch thread: one left inside arrow at interpreter exit aborts the process.
    assert not [t for t in threading.enumerate() if t.name == "cache-prefetch"]


def test_plot_writes_a_png(tmp_path, small_cache, student_config):
    out = tmp_path / "run"
    run(student_config, small_cache, out, loss="ce", max_steps=10, eval_every=5)
    result = CliRunner().invoke(app, ["plot", str(out)])
    assert result.exit_code == 0, result.output
    png = out / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_a_cache_of_one_row_group_trains_with_default_holdout(tmp_path, teacher_dir, corpus_jsonl, student_config):
    """80 sequences in one row group: the default --eval-sequences 64 holds out 64 sequences, 16 train."""
    from kd_pipeline.cache.build import CacheConfig, cache_teacher

    cache = tmp_path / "cache"
    cache_teacher(
        CacheConfig(
            teacher=str(teacher_dir),
            data=str(corpus_jsonl),
            out=cache,
            top_k=8,
            seq_len=32,
            batch_size=16,
            shard_tokens=32 * 1000,
            row_group_tokens=32 * 1000,
            max_sequences=80,
            progress=False,
        )
    )
    out = tmp_path / "run"
    last = distill(DistillConfig(student=str(student_config), cache=cache, out=out, max_steps=2, progress=False))
    assert last["eval_tokens"] == 64 * 31  # the whole default holdout, every target of 64 sequences of 32 tokens
    assert last["step"] == 2


def test_batch_size_beyond_the_cache_is_said_and_tokens_are_counted(tmp_path, small_cache, student_config, capsys):
    from kd_pipeline.cache.format.manifest import load_cache
    from kd_pipeline.train.reader import CacheReader, plan_chunks, split_holdout

    out = tmp_path / "big_batch"
    run(student_config, small_cache, out, batch_size=200, max_steps=3, log_every=1, eval_sequences=12)
    err = capsys.readouterr().err
    assert "--batch-size 200 is more than the 78 training sequences per process" in err
    info = load_cache(small_cache)
    train, _ = split_holdout(plan_chunks(info), 12)
    (epoch,) = list(CacheReader(info, 200, chunks=train).iter_epoch(0))
    true_tokens = int(epoch["target_mask"].sum())  # each step trains on all 78 sequences, not 200
    records = [m for m in metrics(out) if "loss" in m]
    assert [m["tokens"] for m in records] == [true_tokens] * 3


def test_the_trainer_runs_any_registered_loss(tmp_path, small_cache, student_config, monkeypatch):
    """The trainer names no loss: a loss added to the registry (Hellinger distance here, in this test only) trains
    and logs through the contract, its state checkpointed, its optimizer-step hook called once per step."""
    from kd_pipeline.train import losses

    calls = []

    class Hellinger(losses.DistillLoss):
        name = "hellinger"
        summary = "squared Hellinger distance"

        def per_position(self, bins):
            return 1.0 - (0.5 * (bins.log_p + bins.log_q)).exp().sum(-1)

        def optimizer_step(self, kd, step, total_steps):
            calls.append(step)

        def state_dict(self):
            return {"steps_seen": len(calls)}

        def load_state_dict(self, state):
            pass

        def metrics(self):
            return {"hellinger_calls": float(len(calls))}

    monkeypatch.setitem(losses.LOSSES, "hellinger", Hellinger)
    out = tmp_path / "hellinger"
    run(student_config, small_cache, out, loss="hellinger", max_steps=4, log_every=1, grad_accum=2, save_every=2)
    assert calls == [0, 1, 2, 3]  # once per optimizer step, not per micro-batch
    records = [m for m in metrics(out) if "loss" in m]
    assert [m["hellinger_calls"] for m in records] == [1.0, 2.0, 3.0, 4.0]
    assert all(0 < m["kd"] < 1 for m in records)  # a squared Hellinger distance, averaged
    state = json.loads((latest_checkpoint(out) / "trainer_state.json").read_text())
    assert state["loss"] == {"steps_seen": 4}


def test_metrics_report_kl_and_soft_ce_beside_the_loss(tmp_path, small_cache, student_config):
    out = tmp_path / "rkl_t2"
    run(student_config, small_cache, out, loss="rkl", temperature=2.0, max_steps=4, log_every=2, eval_every=4)
    train = [m for m in metrics(out) if "loss" in m]
    assert all(m["soft_ce"] > m["kl"] > 0 for m in train)
    evals = [m for m in metrics(out) if "eval_kl" in m]
    assert evals and all(m["eval_soft_ce"] > m["eval_kl"] > 0 for m in evals)


def test_distill_help_lists_every_registered_loss_and_the_loss_options():
    from kd_pipeline.train.losses import LOSSES

    result = CliRunner().invoke(app, ["distill", "--help"], terminal_width=400, env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    text = "".join(result.output.replace("│", "").split())  # rich wraps the help column in a box: compare bare
    for name, cls in LOSSES.items():
        entry = "".join(f"{name}: {cls.summary}".split())
        assert entry in text, name  # `ce` included (it was missing from a hand-written list)
    for flag in ("--temperature", "--ce-weight", "--js-beta", "--skew-alpha", "--atkd-alpha", "--taid-t-start"):
        assert flag in text, flag
    assert text.index("--student") < text.index("--temperature")  # the run's own options first


def test_eval_bpb_is_the_eval_ce_over_the_bytes_of_the_heldout_text(tmp_path, small_cache, student_config, capfd):
    """Bits per byte of a same-tokenizer run: total CE (nats) over the bytes of text the held-out targets stand
    for (special tokens none), / ln 2; in metrics.jsonl at every eval and in the summary."""
    import math

    from transformers import AutoTokenizer

    from kd_pipeline.cache.format.layout import TOKENIZER_DIR
    from kd_pipeline.cache.format.manifest import load_cache
    from kd_pipeline.train.cross_tokenizer import TokenPieces
    from kd_pipeline.train.reader import CacheReader, plan_chunks, split_holdout

    out = tmp_path / "bpb"
    run(student_config, small_cache, out, loss="ce", max_steps=10, eval_every=5)
    evals = [m for m in metrics(out) if "eval_bpb" in m]
    assert [m["step"] for m in evals] == [0, 5, 10]
    info = load_cache(small_cache)
    pieces = TokenPieces.of(AutoTokenizer.from_pretrained(small_cache / TOKENIZER_DIR))
    _, held = split_holdout(plan_chunks(info), 12)
    n_bytes = n_targets = 0
    for batch in CacheReader(info, 8, chunks=held, shuffle=False, drop_remainder=False, prefetch=0).iter_epoch(0):
        mask = batch["target_mask"].numpy()
        n_bytes += int((pieces.text_bytes(batch["input_ids"][:, 1:].numpy()) * mask).sum())
        n_targets += int(mask.sum())
    assert n_targets == evals[-1]["eval_tokens"] and n_bytes > n_targets
    for ev in evals:
        assert ev["eval_bpb"] == pytest.approx(ev["eval_ce"] * ev["eval_tokens"] / (n_bytes * math.log(2)), rel=1e-9)
    assert evals[-1]["eval_bpb"] < evals[0]["eval_bpb"]
    assert f"bits/byte {evals[0]['eval_bpb']:.4f} -> {evals[-1]['eval_bpb']:.4f}" in capfd.readouterr().err


def test_an_option_newer_than_the_checkpoint_compares_as_its_default():
    """A checkpoint written before --cross-tokenizer existed resumes; one that used it cannot resume without it."""
    from kd_pipeline.train.trainer import config_differences

    now = DistillConfig(student="s", cache=Path("c"), out=Path("o")).record()
    older = {k: v for k, v in now.items() if not k.startswith("cross_tokenizer")}
    assert config_differences(older, now) == ([], [])
    allowed, fixed = config_differences({**older, "cross_tokenizer": True}, now)
    assert fixed == ["--cross-tokenizer: True in the checkpoint, False now"] and not allowed
