"""What a run does when something goes wrong: a non-finite loss or gradient, a resume with other options, a
damaged checkpoint. Each ends in a clear message and a non-zero exit, or does what it says, never silently."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kd_pipeline.pipeline import app
from kd_pipeline.train import trainer
from kd_pipeline.train.checkpoint import checkpoint_dirs
from kd_pipeline.train.trainer import DistillConfig, distill


def config(student, cache, out, **kw) -> DistillConfig:
    base = dict(
        student=str(student),
        cache=Path(cache),
        out=Path(out),
        batch_size=4,
        grad_accum=2,
        lr=3e-3,
        max_steps=4,
        eval_every=1000,
        eval_sequences=12,
        save_every=2,
        keep_checkpoints=3,
        log_every=1,
        progress=False,
    )
    base.update(kw)
    return DistillConfig(**base)


def cli(student, cache, out, *extra) -> tuple[int, str]:
    args = [
        "distill",
        "--student",
        str(student),
        "--cache",
        str(cache),
        "--out",
        str(out),
        "--batch-size",
        "4",
        "--grad-accum",
        "2",
        "--lr",
        "3e-3",
        "--max-steps",
        "4",
        "--eval-every",
        "1000",
        "--eval-sequences",
        "12",
        "--save-every",
        "2",
        "--keep-checkpoints",
        "3",
        "--log-every",
        "1",
        "--no-progress",
        *extra,
    ]
    result = CliRunner().invoke(app, args)
    return result.exit_code, result.output


def losses_logged(out: Path) -> dict[int, dict]:
    return {m["step"]: m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m}


# ------------------------------------------------------------------------------------------- non-finite
class PoisonedTeacher(trainer.TeacherSignal):
    """The cache's teacher, except that chosen calls (micro-batches, counted from 0) give a NaN loss."""

    def __init__(self, poisoned: set[int]):
        self.poisoned, self.calls = poisoned, 0

    def loss(self, loss, student):
        parts = super().loss(loss, student)
        self.calls += 1
        if self.calls - 1 in self.poisoned:
            parts = parts._replace(total=parts.total * float("nan"))
        return parts


def test_nonfinite_loss_stops_naming_step_and_micro_batch(tmp_path, small_cache, student_config):
    out = tmp_path / "nan"
    # Micro-batches 0-3 make steps 1-2 (2 per step); call 5 is step 3's second micro-batch.
    with pytest.raises(trainer.NonFiniteStep) as error:
        distill(config(student_config, small_cache, out, max_steps=6), teacher=PoisonedTeacher({5}))
    message = str(error.value)
    assert message.startswith(
        "step 3: non-finite loss (nan) in micro-batch 2 of 2; stopped before the optimizer update"
    )
    assert "checkpoints/step-00000002" in message and "--skip-nonfinite-steps" in message
    assert [p.name for p in checkpoint_dirs(out)] == ["step-00000002"]  # the last good one, nothing after it
    assert not (out / "final").exists()
    assert sorted(losses_logged(out)) == [1, 2]


def test_nonfinite_steps_can_be_skipped_up_to_a_count(tmp_path, small_cache, student_config, capsys):
    out = tmp_path / "skip"
    distill(config(student_config, small_cache, out, skip_nonfinite_steps=1), teacher=PoisonedTeacher({2}))
    assert "warning: step 2: non-finite loss (nan) in micro-batch 1 of 2; skipped" in capsys.readouterr().err
    logged = losses_logged(out)
    assert sorted(logged) == [1, 2, 3, 4]  # a skipped step does not count toward --max-steps
    assert all(m["loss"] == m["loss"] for m in logged.values())
    with pytest.raises(trainer.NonFiniteStep, match="step 2: non-finite loss"):
        distill(
            config(student_config, small_cache, tmp_path / "two", skip_nonfinite_steps=1),
            teacher=PoisonedTeacher({2, 4}),
        )


def test_exploding_gradient_exits_2_with_one_line(tmp_path, small_cache, student_config):
    out = tmp_path / "explode"
    code, output = cli(student_config, small_cache, out, "--lr", "1e30", "--save-every", "1")
    assert code == 2, output
    assert "error: step 2: non-finite gradient norm; stopped before the optimizer update" in output
    assert "Traceback" not in output
    assert [p.name for p in checkpoint_dirs(out)] == ["step-00000001"]


# -------------------------------------------------------------------------------------- resume options
@pytest.fixture(scope="module")
def four_steps_once(tmp_path_factory, small_cache, student_config) -> Path:
    out = tmp_path_factory.mktemp("four_steps") / "run"
    code, output = cli(student_config, small_cache, out, "--loss", "fkl")
    assert code == 0, output
    return out


@pytest.fixture
def four_steps(four_steps_once, tmp_path) -> Path:
    """A finished 4-step fkl run (checkpoints at steps 2 and 4), a copy of its own for each test."""
    return Path(shutil.copytree(four_steps_once, tmp_path / "run"))


def test_resume_refuses_options_that_change_training(four_steps, small_cache, student_config):
    before = (four_steps / "distill_config.json").read_text()
    code, output = cli(student_config, small_cache, four_steps, "--loss", "rkl", "--lr", "1e-2", "--resume")
    assert code == 2
    assert "--loss: fkl in the checkpoint, rkl now" in output and "--lr: 0.003 in the checkpoint, 0.01 now" in output
    assert "--allow-config-change" in output
    assert (four_steps / "distill_config.json").read_text() == before  # the record is still what ran
    code, output = cli(student_config, small_cache, four_steps, "--seed", "1", "--resume", "--allow-config-change")
    assert code == 2 and "--seed: 0 in the checkpoint, 1 now" in output and "start a new run" in output


def test_longer_max_steps_is_refused_then_rebuilds_the_schedule(four_steps, small_cache, student_config):
    code, output = cli(student_config, small_cache, four_steps, "--max-steps", "7", "--resume")
    assert code == 2 and "--max-steps: 4 in the checkpoint, 7 now" in output and "cosine schedule" in output
    code, output = cli(
        student_config, small_cache, four_steps, "--max-steps", "7", "--lr", "1e-2", "--resume", "--allow-config-change"
    )
    assert code == 0, output
    logged = losses_logged(four_steps)
    assert sorted(logged) == list(range(1, 8))
    assert logged[4]["lr"] == 0.0  # the first schedule ended at 0 ...
    # ... the rebuilt one is the cosine over 7 steps at the new peak: lr after step 5 = 1e-2 * (1 + cos(pi*5/7)) / 2
    import math

    assert logged[5]["lr"] == pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi * 5 / 7)), rel=1e-9)
    recorded = json.loads((four_steps / "distill_config.json").read_text())
    assert recorded["max_steps"] == 7 and recorded["lr"] == 0.01
    lineage = json.loads((four_steps / "final" / "lineage.json").read_text())
    assert lineage["config"]["lr"] == 0.01 and lineage["config_changes"][0]["step"] == 4
    assert any("--lr: 0.003" in change for change in lineage["config_changes"][0]["changes"])


def test_same_options_resume_without_a_word_about_changes(four_steps, small_cache, student_config):
    code, output = cli(student_config, small_cache, four_steps, "--resume", "--log-every", "2", "--no-fused-loss")
    assert code == 0, output
    assert "allow-config-change" not in output and "resumed from" in output


# ----------------------------------------------------------------------------------- damaged checkpoint
def test_truncated_checkpoint_falls_back_to_the_previous_one(four_steps, small_cache, student_config):
    latest = checkpoint_dirs(four_steps)[-1]
    assert latest.name == "step-00000004"
    shard = next(latest.glob("*.distcp"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    code, output = cli(student_config, small_cache, four_steps, "--max-steps", "6", "--resume", "--allow-config-change")
    assert code == 0, output
    assert (
        f"warning: skipping checkpoint {latest}: {shard}: {len(data) // 2} bytes, the checkpoint recorded {len(data)}"
        in output
    )
    assert "resumed from" in output and "step-00000002 at step 2" in output
    assert sorted(losses_logged(four_steps)) == list(range(1, 7))


def test_no_usable_checkpoint_is_a_clear_error(four_steps, small_cache, student_config):
    for ckpt in checkpoint_dirs(four_steps):
        (ckpt / "trainer_state.json").write_text("")
    code, output = cli(student_config, small_cache, four_steps, "--resume")
    assert code == 2
    assert "no usable checkpoint left in" in output and "step-00000002" in output and "step-00000004" in output
    assert "Traceback" not in output
