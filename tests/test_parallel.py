"""Multi-process training on CPU (gloo, 2 ranks): FSDP2 against DDP, kill -9 and resume under FSDP, resharding
2 -> 1 rank, per-rank memory, and the launch form that does not depend on the working directory."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kd_pipeline.train.checkpoint import latest_checkpoint

BIN = Path(sys.executable).parent  # the venv's console scripts: torchrun, pipeline
STEPS = 30


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def step_losses(out: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(out) if "loss" in m}


@pytest.fixture(scope="module")
def user_project(tmp_path_factory) -> Path:
    """A working directory like a user's ML project: its own train.py, cache.py and pipeline.py that must never be
    imported."""
    d = tmp_path_factory.mktemp("user_project")
    for name in ("train.py", "cache.py", "pipeline.py"):
        (d / name).write_text("raise SystemExit('the user\\'s own %s was imported' % __file__)\n")
    return d


def distill_args(student, cache, out, *extra) -> list[str]:
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
        "--grad-accum",
        "2",
        "--lr",
        "3e-3",
        "--warmup-steps",
        "3",
        "--max-steps",
        str(STEPS),
        "--save-every",
        "5",
        "--eval-every",
        "20",
        "--eval-sequences",
        "12",
        "--log-every",
        "1",
        "--no-progress",
        "--device",
        "cpu",
        *extra,
    ]


def torchrun(args: list[str], port: int, nproc: int = 2) -> list[str]:
    """The launch form of the README: torchrun runs the `pipeline` console script (its imports are all under
    kd_pipeline, so the working directory's own modules never shadow them)."""
    return [
        str(BIN / "torchrun"),
        "--nproc-per-node",
        str(nproc),
        "--master-port",
        str(port),
        "--no-python",
        str(BIN / "pipeline"),
        *args,
    ]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc: torchrun's workers run in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def launch(cmd: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=600, **kw)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_cache, student_config, user_project) -> dict[str, Path]:
    """Uninterrupted 2-rank runs of the same configuration under DDP, FSDP and FSDP with the fused loss, started
    from a directory holding the user's own train.py."""
    root = tmp_path_factory.mktemp("parallel")
    out = {}
    for port, (name, extra) in enumerate(
        {
            "ddp": ["--parallel", "ddp"],
            "fsdp": ["--parallel", "fsdp"],
            "fsdp_fused": ["--parallel", "fsdp", "--fused-loss"],
        }.items()
    ):
        out[name] = root / name
        result = launch(
            torchrun(distill_args(student_config, small_cache, out[name], *extra), 29540 + port), user_project
        )
        assert result.returncode == 0, result.stderr[-3000:]
        out[name + "_stderr"] = result.stderr
    return out


def test_module_form_and_console_script_work_in_a_user_project(user_project, small_cache, student_config, tmp_path):
    """The working directory comes first on sys.path under ``python -m``: its train.py, cache.py and pipeline.py
    must not shadow the package's modules."""
    for i, launcher in enumerate(([sys.executable, "-m", "kd_pipeline"], [str(BIN / "pipeline")])):
        args = distill_args(student_config, small_cache, tmp_path / f"run{i}", "--max-steps", "2")
        result = launch([*launcher, *args], user_project)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "the user's own" not in result.stderr + result.stdout


def test_fsdp_gives_ddp_losses_step_for_step(runs):
    ddp, fsdp, fused = step_losses(runs["ddp"]), step_losses(runs["fsdp"]), step_losses(runs["fsdp_fused"])
    assert sorted(ddp) == sorted(fsdp) == sorted(fused) == list(range(1, STEPS + 1))
    for step in ddp:
        assert abs(fsdp[step] - ddp[step]) <= 1e-3 * abs(ddp[step]), step
        assert abs(fused[step] - ddp[step]) <= 1e-3 * abs(ddp[step]), step  # the fused head on a sharded root
    assert ddp[STEPS] < ddp[1]
    # The step-0 eval and the before -> after summary are on the console.
    assert "step 0 (before training): eval_ce" in runs["fsdp_stderr"]
    assert "eval (before -> after): eval CE" in runs["fsdp_stderr"] and "trained tokens seen" in runs["fsdp_stderr"]


def test_fsdp_holds_half_the_parameters_and_optimizer_state_per_rank(runs):
    ddp = json.loads((runs["ddp"] / "memory.json").read_text())
    fsdp = json.loads((runs["fsdp"] / "memory.json").read_text())
    assert fsdp["strategy"] == "fsdp" and fsdp["world_size"] == 2 and len(fsdp["ranks"]) == 2
    whole = ddp["ranks"][0]
    for rank in fsdp["ranks"]:
        for key in ("parameter_bytes", "optimizer_bytes"):
            # 1/N of the unsharded size, up to the padding of dimensions that do not split evenly
            assert 0.5 * whole[key] <= rank[key] <= 0.52 * whole[key], (key, rank[key], whole[key])
    assert sum(r["parameter_bytes"] for r in fsdp["ranks"]) >= whole["parameter_bytes"]


def test_final_student_is_a_plain_save_pretrained_folder(runs):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(runs["fsdp"] / "final")
    ddp, fsdp = (
        load_file(runs["ddp"] / "final" / "model.safetensors"),
        load_file(runs["fsdp"] / "final" / "model.safetensors"),
    )
    assert ddp.keys() == fsdp.keys() and len(fsdp) == len(model.state_dict())
    assert all(torch.allclose(ddp[k], fsdp[k], atol=1e-5) for k in ddp)


def test_fsdp_kill_9_resume_and_reshard_to_one_rank(runs, small_cache, student_config, user_project, tmp_path):
    out = tmp_path / "killed"
    cmd = torchrun(distill_args(student_config, small_cache, out, "--parallel", "fsdp"), 29550)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=user_project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        ckpt = latest_checkpoint(out)
        if ckpt is not None and int(ckpt.name.removeprefix("step-")) >= 10:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed"
    for pid in [proc.pid, *descendants(proc.pid)]:  # the launcher and both ranks (their own session), as a lost node
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    killed_at = int(latest_checkpoint(out).name.removeprefix("step-"))
    assert 10 <= killed_at < STEPS
    one_rank = tmp_path / "one_rank"
    shutil.copytree(out, one_rank)

    resumed = launch(cmd + ["--resume"], user_project)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out}/checkpoints/step-{killed_at:08d}" in resumed.stderr
    want, got = step_losses(runs["fsdp"]), step_losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert abs(got[step] - want[step]) <= 1e-4 * abs(want[step]), step

    # The same checkpoint on one process: the shards of both ranks are read back into one unsharded student.
    args = distill_args(student_config, small_cache, one_rank, "--parallel", "none", "--resume")
    alone = launch([str(BIN / "pipeline"), *args], user_project)
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert "written by 2 ranks, this run has 1" in alone.stderr
    losses = step_losses(one_rank)
    assert sorted(losses) == list(range(1, STEPS + 1)) and losses[STEPS] < losses[1]
    # The first step after the resume starts from the 2-rank run's weights: its loss is that of the same student
    # on half the batch (rank 0's), so near the 2-rank value, not the untrained one.
    assert abs(losses[killed_at + 1] - want[killed_at + 1]) < 0.1 * want[killed_at + 1]


def test_fsdp_checkpoint_loads_exactly_into_one_process(runs, small_cache, student_config, user_project, tmp_path):
    """The 2-rank FSDP run's last checkpoint resumed by one process with nothing left to train: the student it
    saves again is the 2-rank run's, bit for bit."""
    from safetensors.torch import load_file

    out = tmp_path / "again"
    shutil.copytree(runs["fsdp"], out)
    shutil.rmtree(out / "final")
    args = distill_args(student_config, small_cache, out, "--parallel", "none", "--resume")
    result = launch([str(BIN / "pipeline"), *args], user_project)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"at step {STEPS}" in result.stderr
    want, got = load_file(runs["fsdp"] / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
