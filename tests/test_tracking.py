"""--report-to: every metrics.jsonl record and the config reach TensorBoard, W&B (offline) and MLflow (local SQLite),
read back here with each library's own reader; a run killed past its checkpoint and resumed continues the same
tracker runs with each step once; an unknown or uninstalled tracker is refused before anything starts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from kd_pipeline.errors import MissingDependency
from kd_pipeline.pipeline import app
from kd_pipeline.train import tracking
from kd_pipeline.train.checkpoint import latest_checkpoint

BIN = Path(sys.executable).parent
STEPS = 10
KEYS = ("loss", "kl", "soft_ce", "lr", "tokens_seen", "eval_kl", "eval_ce")


def installed(*modules: str) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in modules)


# The trackers are in .[dev] (CI runs these); a machine without one skips its tests, saying which.
TENSORBOARD = pytest.mark.skipif(
    not installed("tensorboard"), reason="tensorboard not installed: pip install -e '.[tensorboard]'"
)
WANDB = pytest.mark.skipif(not installed("wandb"), reason="wandb not installed: pip install -e '.[wandb]'")
MLFLOW = pytest.mark.skipif(
    not installed("mlflow", "sqlalchemy", "alembic"), reason="mlflow not installed: pip install -e '.[mlflow]'"
)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def expected(out: Path, key: str) -> dict[int, float]:
    return {r["step"]: float(r[key]) for r in records(out) if key in r}


def descendants(pid: int) -> list[int]:
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


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory, small_cache, student_config) -> tuple[Path, int]:
    """A run reporting to TensorBoard and MLflow, killed (-9) two or more steps past a checkpoint, then resumed to
    the end: (run dir, the checkpoint's step)."""
    if not installed("tensorboard", "mlflow", "sqlalchemy", "alembic"):
        pytest.skip("tensorboard or mlflow not installed: pip install -e '.[tensorboard,mlflow]'")
    out = tmp_path_factory.mktemp("tracked") / "run"
    cmd = [str(BIN / "pipeline"), "distill", "--student", str(student_config), "--cache", str(small_cache)] + [
        "--out", str(out), "--loss", "fkl", "--batch-size", "4", "--lr", "3e-3", "--max-steps", str(STEPS),
        "--save-every", "3", "--eval-every", "4", "--eval-sequences", "12", "--log-every", "1", "--no-progress",
        "--device", "cpu", "--report-to", "tensorboard", "--report-to", "mlflow",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        ckpt = latest_checkpoint(out)
        try:
            logged = max((r["step"] for r in records(out) if "loss" in r), default=0)
        except (OSError, ValueError):
            logged = 0
        if ckpt is not None and logged >= int(ckpt.name.removeprefix("step-")) + 2:
            break
        time.sleep(0.002)
    assert proc.poll() is None, "the run finished before it could be killed: " + proc.stderr.read()[-2000:]
    for pid in [proc.pid, *descendants(proc.pid)]:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    killed_at = int(latest_checkpoint(out).name.removeprefix("step-"))
    resumed = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return out, killed_at


@TENSORBOARD
def test_tensorboard_holds_every_record_once_after_a_resume(killed_and_resumed):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    out, _ = killed_and_resumed
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    for key in KEYS:
        got = [(e.step, e.value) for e in acc.Scalars(key)]
        want = expected(out, key)
        # purge_step hid what the killed run logged past its checkpoint: each step once, in order
        assert [s for s, _ in got] == sorted(want), key
        assert np.allclose([v for _, v in got], np.float32([want[s] for s, _ in got]), rtol=1e-6, atol=0), key
    config = tensor_util.make_ndarray(acc.Tensors("config/text_summary")[0].tensor_proto).item().decode()
    assert '"loss": "fkl"' in config and '"max_steps": 10' in config


def _wandb_history(run_dir: Path) -> tuple[str, dict[int, dict]]:
    """(run id, step -> logged values) of one offline run, through wandb's own reader (`wandb leet inspect`)."""
    lines = subprocess.run(
        [str(BIN / "wandb"), "leet", "inspect", "--json", str(run_dir)], capture_output=True, text=True, timeout=120
    ).stdout.splitlines()
    run_id, history = None, {}
    for rec in map(json.loads, lines):
        if rec["type"] == "run":
            run_id = rec["run"]["run_id"]
            assert rec["run"]["config"]["update"]["loss"] == "fkl"
        elif rec["type"] == "history":
            item = rec["history"]["item"]
            history.setdefault(int(item["_step"]), {}).update(item)
    return run_id, history


@pytest.fixture(scope="module")
def preempted_and_resumed(tmp_path_factory, small_cache, student_config) -> tuple[Path, int]:
    """A W&B-tracked run stopped by SIGTERM (the preemption path closes the trackers), then resumed. (After a
    kill -9 the offline run of the killed process can be empty: wandb's service had not written it yet.)"""
    out = tmp_path_factory.mktemp("tracked") / "preempted"
    cmd = [str(BIN / "pipeline"), "distill", "--student", str(student_config), "--cache", str(small_cache)] + [
        "--out", str(out), "--loss", "fkl", "--batch-size", "4", "--lr", "3e-3", "--max-steps", str(STEPS),
        "--eval-every", "4", "--eval-sequences", "12", "--log-every", "1", "--no-progress", "--device", "cpu",
        "--report-to", "wandb",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    env.pop("WANDB_MODE", None)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        try:
            if max((r["step"] for r in records(out) if "loss" in r), default=0) >= 3:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.002)
    assert proc.poll() is None, "the run finished before the signal: " + proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr[-3000:]
    stopped_at = int(latest_checkpoint(out).name.removeprefix("step-"))
    resumed = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return out, stopped_at


@WANDB
def test_wandb_offline_run_continues_under_the_same_id(preempted_and_resumed):
    out, stopped_at = preempted_and_resumed
    first, second = sorted((out / "wandb").glob("offline-run-*"))  # one folder per process, the same run id
    (id1, before), (id2, after) = _wandb_history(first), _wandb_history(second)
    assert id1 == id2 == json.loads((out / "trackers.json").read_text())["wandb"]["id"]
    # Together the two folders hold every step once: the first up to the checkpoint, the second after it.
    assert sorted(before) == list(range(0, stopped_at + 1)) and sorted(after) == list(range(stopped_at + 1, STEPS + 1))
    for key in KEYS:
        want = expected(out, key)
        assert want and all((after if s > stopped_at else before)[s][key] == want[s] for s in want), key  # float64


@MLFLOW
def test_mlflow_run_holds_each_step_once_and_the_config(killed_and_resumed):
    import mlflow
    from mlflow import MlflowClient

    out, _ = killed_and_resumed
    state = json.loads((out / "trackers.json").read_text())["mlflow"]
    assert state["tracking_uri"] == f"sqlite:///{(out / 'mlflow' / 'mlflow.db').resolve()}"
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    run = client.get_run(state["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["loss"] == "fkl" and run.data.params["max_steps"] == "10"
    assert mlflow.artifacts.load_dict(run.info.artifact_uri + "/config.json")["loss"] == "fkl"
    for key in ("loss", "kl", "tokens_seen", "eval_kl"):
        history = [(m.step, m.value) for m in client.get_metric_history(state["run_id"], key)]
        want = expected(out, key)
        assert [s for s, _ in history] == sorted(want), key  # each step once
        assert all(v == pytest.approx(want[s], rel=1e-6, abs=0) for s, v in history), key
    assert not (Path.cwd() / "mlruns").exists()


def test_unknown_or_uninstalled_tracker_is_refused_before_anything_starts(tmp_path, small_cache, student_config):
    out = tmp_path / "run"
    args = ["distill", "--student", str(student_config), "--cache", str(small_cache), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--report-to", "neptune"])
    assert result.exit_code == 2 and "unknown tracker; choose from mlflow, tensorboard, wandb" in result.output
    assert not out.exists()

    @tracking.register
    class Absent(tracking.Tracker):  # a tracker whose library is not installed here
        name = "absent"
        modules = ("kd_pipeline_absent_tracker_library",)

    try:
        with pytest.raises(MissingDependency, match=r"pip install 'kd-pipeline\[absent\]'"):
            tracking.check(["tensorboard", "absent"])
        result = CliRunner().invoke(app, [*args, "--report-to", "absent"])
        assert result.exit_code == 2 and "kd_pipeline_absent_tracker_library" in result.output
        assert not out.exists()
    finally:
        del tracking.TRACKERS["absent"]
