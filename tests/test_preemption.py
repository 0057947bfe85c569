"""SIGTERM / SIGINT: `distill` checkpoints at the next step boundary (every rank), exits 143 / 130 with the resume
command, and that command continues to the uninterrupted run's losses; `cache-teacher` says what it committed and
its resume command finishes the same cache; a refused start leaves nothing behind."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kd_pipeline.pipeline import app
from kd_pipeline.train.checkpoint import checkpoint_dirs

BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
STEPS = 40


def distill_args(student, cache, out, *extra, steps: int = STEPS) -> list[str]:
    return [
        "distill",
        "--student",
        str(student),
        "--cache",
        str(cache),
        "--out",
        str(out),
        "--loss",
        "fkl",
        "--batch-size",
        "4",
        "--lr",
        "3e-3",
        "--max-steps",
        str(steps),
        "--save-every",
        "1000",
        "--eval-every",
        "1000",
        "--eval-sequences",
        "12",
        "--log-every",
        "1",
        "--no-progress",
        "--device",
        "cpu",
        *extra,
    ]


def step_losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def last_step(out: Path) -> int:
    try:
        return max(step_losses(out), default=0)
    except (OSError, ValueError):  # not written yet, or a line being written
        return 0


def signal_after(cmd: list[str], out: Path, step: int, signum: int, cwd: Path) -> tuple[int, str, int]:
    """Run ``cmd``, send ``signum`` once metrics.jsonl shows ``step``; (exit code, stderr, step seen at the signal)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and last_step(out) < step:
        time.sleep(0.002)
    assert proc.poll() is None, "the run finished before the signal: " + proc.stderr.read()[-2000:]
    seen = last_step(out)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=300)
    return proc.returncode, stderr, seen


def resume_command(stderr: str) -> list[str]:
    """The command the stopped run printed, with this venv's console scripts."""
    line = next(line for line in stderr.splitlines() if line.startswith("Resume with: "))
    words = shlex.split(line.removeprefix("Resume with: "))
    return [str(BIN / word) if word in ("pipeline", "torchrun") else word for word in words]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, small_cache, student_config) -> Path:
    out = tmp_path_factory.mktemp("preempt") / "whole"
    cmd = [str(BIN / "pipeline"), *distill_args(student_config, small_cache, out)]
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_sigterm_checkpoints_at_the_next_step_and_resume_gives_the_uninterrupted_losses(
    uninterrupted, small_cache, student_config, tmp_path
):
    out = tmp_path / "run"
    cmd = [str(BIN / "pipeline"), *distill_args(student_config, small_cache, out)]
    code, stderr, seen = signal_after(cmd, out, 5, signal.SIGTERM, tmp_path)
    assert code == 143, stderr[-3000:]
    assert "SIGTERM: stopping at the next step boundary" in stderr
    (ckpt,) = checkpoint_dirs(out)  # --save-every 1000: the only checkpoint is the one the signal asked for
    stopped_at = int(ckpt.name.removeprefix("step-"))
    # The step in flight when the signal came is finished and saved: nothing trained is lost.
    assert seen <= stopped_at <= seen + 2 and stopped_at < STEPS
    assert max(step_losses(out)) == stopped_at
    assert f"SIGTERM: saved {ckpt} (step {stopped_at} of {STEPS})" in stderr
    assert "Traceback" not in stderr
    # --no-progress: a line per --log-every step
    assert f"step {stopped_at}/{STEPS}: loss " in stderr and "step 1/40: loss " in stderr

    command = resume_command(stderr)
    assert "--resume" in command and "--no-progress" in command and str(out) in command
    resumed = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {ckpt} at step {stopped_at}" in resumed.stderr
    want, got = step_losses(uninterrupted), step_losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert max(abs(got[s] - want[s]) for s in got) <= 1e-6, [(s, got[s], want[s]) for s in got if got[s] != want[s]]


def test_sigint_exits_130_with_the_checkpoint(small_cache, student_config, tmp_path):
    out = tmp_path / "run"
    cmd = [str(BIN / "pipeline"), *distill_args(student_config, small_cache, out)]
    code, stderr, _ = signal_after(cmd, out, 2, signal.SIGINT, tmp_path)
    assert code == 130, stderr[-3000:]
    (ckpt,) = checkpoint_dirs(out)
    assert f"SIGINT: saved {ckpt}" in stderr and "Resume with: pipeline distill" in stderr
    assert "KeyboardInterrupt" not in stderr and "Traceback" not in stderr


def test_a_save_that_cannot_finish_in_time_says_so(small_cache, student_config, tmp_path):
    out = tmp_path / "run"
    cmd = [str(BIN / "pipeline"), *distill_args(student_config, small_cache, out, "--save-on-signal-timeout", "0.001")]
    code, stderr, _ = signal_after(cmd, out, 2, signal.SIGTERM, tmp_path)
    assert code == 143, stderr[-3000:]
    assert "the checkpoint did not finish within --save-on-signal-timeout 0.001 s; exiting without it" in stderr
    assert "no checkpoint yet" in stderr and checkpoint_dirs(out) == []


SECOND_SIGNAL = """
import os, signal, sys, time
from kd_pipeline.signals import SignalCatcher
seen = []
with SignalCatcher(on_first=seen.append, on_exit_now=lambda s: "the last checkpoint is step-7"):
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)  # within the repeat window: the same request
    time.sleep(0.1)
    print("first", seen, flush=True)
    time.sleep(1.2)
    os.kill(os.getpid(), {second})
    time.sleep(5)
print("not reached", flush=True)
"""


@pytest.mark.parametrize("second, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_second_signal_exits_at_once(second, code):
    script = SECOND_SIGNAL.replace("{second}", str(int(second)))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == code, result.stderr
    assert result.stdout.strip() == "first [15]"
    assert f"{second.name} again: exiting now; the last checkpoint is step-7" in result.stderr


def test_fsdp_sigterm_to_torchrun_stops_every_rank_at_one_step_and_resumes_exactly(
    small_cache, student_config, tmp_path
):
    """SIGTERM to the torchrun agent: it forwards the signal to both ranks, which agree on one step, write one
    2-rank checkpoint and exit 143; the printed torchrun command resumes to the uninterrupted losses."""
    steps = 12

    def torchrun(out: Path, port: int) -> list[str]:
        args = distill_args(student_config, small_cache, out, "--parallel", "fsdp", steps=steps)
        return [str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", str(port), "--no-python"] + [
            str(BIN / "pipeline"),
            *args,
        ]

    whole = tmp_path / "whole"
    result = subprocess.run(torchrun(whole, 29620), cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    out = tmp_path / "run"
    code, stderr, seen = signal_after(torchrun(out, 29621), out, 3, signal.SIGTERM, tmp_path)
    # Each rank exits 143; torchrun itself, having been signalled, ends with its own SignalException (exit 1).
    assert code == 1 and "SignalException" in stderr, stderr[-3000:]
    assert stderr.count("SIGTERM: saved ") == 1 and stderr.count("Resume with: ") == 1  # rank 0 speaks
    (ckpt,) = checkpoint_dirs(out)
    stopped_at = int(ckpt.name.removeprefix("step-"))
    assert seen <= stopped_at < steps
    assert json.loads((ckpt / "COMPLETE").read_text())["world_size"] == 2
    assert sorted(p.name for p in ckpt.glob("rng-rank*.pt")) == ["rng-rank0.pt", "rng-rank1.pt"]
    command = resume_command(stderr)
    assert command[:4] == [str(BIN / "torchrun"), "--nproc-per-node", "2", "--no-python"]
    resumed = subprocess.run(
        command[:1] + ["--master-port", "29622"] + command[1:], cwd=tmp_path, env=ENV, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = step_losses(whole), step_losses(out)
    assert sorted(got) == list(range(1, steps + 1))
    assert max(abs(got[s] - want[s]) for s in got) <= 1e-6, [(s, got[s], want[s]) for s in got]


def test_a_refused_start_leaves_nothing_behind(tmp_path, small_cache, student_config):
    from tests.conftest import build_llama, build_tokenizer

    out = tmp_path / "new" / "run"
    args = ["distill", "--student", str(student_config), "--cache", str(small_cache), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--loss", "fkll"])
    assert result.exit_code == 2 and "fkll" in result.output
    assert not (tmp_path / "new").exists()

    student = tmp_path / "student"
    tok = build_tokenizer(student, vocab_size=300)
    build_llama(student, len(tok), layers=1, hidden=32)
    args[2] = str(student)
    result = CliRunner().invoke(app, [*args, "--max-steps", "1"])
    assert result.exit_code == 2 and "tokenizer differs from the teacher" in result.output
    assert not (tmp_path / "new").exists()

    # An existing directory stays, with what it held.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    args[6] = str(tmp_path / "mine")
    result = CliRunner().invoke(app, [*args, "--max-steps", "1"])
    assert result.exit_code == 2 and (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_cache_teacher_sigterm_says_what_was_committed_and_its_command_finishes_the_cache(tmp_path, teacher_dir):
    from tests.conftest import make_corpus

    data = tmp_path / "corpus.jsonl"
    data.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in make_corpus(400, seed=3)))

    def cache_cmd(out: Path) -> list[str]:
        return [str(BIN / "pipeline"), "cache-teacher", "--teacher", str(teacher_dir), "--data", str(data)] + [
            "--out", str(out), "--top-k", "8", "--seq-len", "32", "--shard-tokens", "64", "--max-sequences", "240",
            "--no-progress", "--device", "cpu",
        ]  # fmt: skip

    whole = tmp_path / "whole"
    result = subprocess.run(cache_cmd(whole), env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    out = tmp_path / "cache"
    proc = subprocess.Popen(cache_cmd(out), env=ENV, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        try:
            if len(json.loads((out / "manifest.json").read_text())["shards"]) >= 3:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.002)
    assert proc.poll() is None, "the cache was finished before the signal"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr[-3000:]
    committed = json.loads((out / "manifest.json").read_text())["shards"]
    assert 3 <= len(committed) < 120 and "Traceback" not in stderr
    last = max(committed, key=lambda s: s["block"])["name"]
    assert f"SIGTERM: stopped; {len(committed)} shard(s) committed" in stderr and f"the last {last})" in stderr
    assert "the block in flight was discarded" in stderr

    command = resume_command(stderr)
    assert "--overwrite" not in command and str(out) in command
    resumed = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want = json.loads((whole / "manifest.json").read_text())["shards"]
    got = json.loads((out / "manifest.json").read_text())["shards"]
    # The same shards, byte for byte, as the run that was never stopped.
    assert [(s["name"], s["sha256"]) for s in got] == [(s["name"], s["sha256"]) for s in want]
    assert len(got) == 120
