"""`pipeline plot` (panels that compare across losses, the loss in the legend, --x steps|tokens) and the one
reader of metrics.jsonl that plot and the trainer's resume share (a torn last line is dropped, damage is named)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kd_pipeline.errors import PipelineError
from kd_pipeline.pipeline import app
from kd_pipeline.train.metrics import read_metrics
from kd_pipeline.train.plot import curves
from kd_pipeline.train.trainer import _truncate_metrics


def write_run(run: Path, loss: str, records: list[dict], tail: str = "") -> Path:
    run.mkdir(parents=True)
    (run / "distill_config.json").write_text(json.dumps({"loss": loss, "lr": 1e-3}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return run


def train_record(step: int, tokens_seen: int, loss: float, kl: float) -> dict:
    return {"step": step, "loss": loss, "kl": kl, "soft_ce": kl + 1.0, "tokens": 64, "tokens_seen": tokens_seen}


def eval_record(step: int, kl: float) -> dict:
    return {"step": step, "eval_ce": 3.0, "eval_kl": kl, "eval_bpb": 1.5 + kl, "eval_top1": 0.5}


@pytest.fixture
def two_runs(tmp_path) -> list[Path]:
    """A TAID run (its loss rises as t anneals) logging every 2 steps of 96 tokens, an fkl run every 3 of 64."""
    taid = write_run(
        tmp_path / "a" / "run",
        "taid",
        [eval_record(0, 2.0), train_record(2, 192, 0.4, 1.8), train_record(4, 384, 0.9, 1.6), eval_record(4, 1.5)]
        + [train_record(6, 576, 1.6, 1.4), eval_record(6, 1.3)],
    )
    fkl = write_run(
        tmp_path / "b" / "run",
        "fkl",
        [train_record(3, 192, 1.9, 1.9), eval_record(5, 1.7), train_record(6, 384, 1.5, 1.5), eval_record(6, 1.4)],
    )
    return [taid, fkl]


def test_panels_are_the_comparable_metrics_with_the_loss_in_each_label(two_runs):
    panels = curves(two_runs)
    assert list(panels) == ["kl", "soft_ce", "eval_kl", "eval_bpb", "eval_top1"]  # not `loss`: TAID's rises by design
    assert panels["kl"] == {"a/run (taid)": ([2, 4, 6], [1.8, 1.6, 1.4]), "b/run (fkl)": ([3, 6], [1.9, 1.5])}
    assert panels["eval_kl"]["a/run (taid)"] == ([0, 4, 6], [2.0, 1.5, 1.3])
    assert panels["eval_bpb"]["b/run (fkl)"] == ([5, 6], [3.2, 2.9])
    assert list(curves(two_runs, keys=("loss",))["loss"]["a/run (taid)"][1]) == [0.4, 0.9, 1.6]  # when asked for


def test_x_tokens_puts_runs_of_other_batch_sizes_on_one_axis(two_runs):
    panels = curves(two_runs, x="tokens")
    assert panels["kl"]["a/run (taid)"][0] == [192, 384, 576] and panels["kl"]["b/run (fkl)"][0] == [192, 384]
    # Eval records carry no count: 0 at step 0, linear between logged steps (fkl step 5: 192 + 2/3 * 192 = 320).
    assert panels["eval_kl"]["a/run (taid)"][0] == [0, 384, 576]
    assert panels["eval_kl"]["b/run (fkl)"][0] == [320, 384]
    with pytest.raises(PipelineError, match="--x must be one of steps, tokens"):
        curves(two_runs, x="time")


def test_plot_cli_writes_the_panels_against_tokens_and_names_a_run_without_tokens_seen(tmp_path, two_runs):
    pytest.importorskip("matplotlib")
    out = tmp_path / "p.png"
    result = CliRunner().invoke(app, ["plot", *map(str, two_runs), "--out", str(out), "--x", "tokens"])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    old = write_run(tmp_path / "old", "fkl", [{"step": 1, "loss": 2.0, "kl": 1.0}])
    result = CliRunner().invoke(app, ["plot", str(old), "--x", "tokens"])
    assert result.exit_code == 2 and "no tokens_seen" in result.output and "--x steps" in result.output
    assert CliRunner().invoke(app, ["plot", str(old)]).exit_code == 0


def test_a_torn_last_line_is_dropped_with_a_warning(tmp_path, capsys):
    run = write_run(tmp_path / "run", "fkl", [train_record(1, 64, 2.0, 1.0)], tail='{"step": 2, "loss": 1.')
    assert read_metrics(run / "metrics.jsonl") == [train_record(1, 64, 2.0, 1.0)]
    assert f"warning: {run / 'metrics.jsonl'}: line 2 is cut short" in capsys.readouterr().err
    # A last record complete but for its newline is kept.
    (run / "metrics.jsonl").write_text(json.dumps(train_record(1, 64, 2.0, 1.0)) + "\n" + '{"step": 2}')
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]
    pytest.importorskip("matplotlib")
    (run / "metrics.jsonl").write_text(json.dumps(train_record(1, 64, 2.0, 1.0)) + "\n" + '{"st')
    assert CliRunner().invoke(app, ["plot", str(run)]).exit_code == 0


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n', r"line 2 is not a JSON record .*the file is damaged"),
        ('{"step": 1}\n{"step": 2, "lo\n', r"line 2 is not a JSON record"),  # ends in a newline: not a torn append
        ('{"step": 1}\n[1, 2]\n', r"line 2 is not a metrics record \(no integer 'step'\)"),
        ('{"loss": 1.0}\n', r"line 1 is not a metrics record"),
    ],
)
def test_damage_before_the_last_line_is_an_error_naming_file_and_line(tmp_path, text, message):
    path = tmp_path / "metrics.jsonl"
    path.write_text(text)
    with pytest.raises(PipelineError, match=f"^{path}: {message}"):
        read_metrics(path)
    result = CliRunner().invoke(app, ["plot", str(tmp_path)])
    assert result.exit_code == 2 and result.output.startswith(f"error: {path}: line")


def test_resume_truncates_a_metrics_file_whose_last_line_was_torn(tmp_path):
    """A run killed while appending a record resumes: the trainer's truncation reads through read_metrics."""
    records = [train_record(s, 64 * s, 1.0, 1.0) for s in (1, 2, 3)]
    path = write_run(tmp_path / "run", "fkl", records, tail='{"step": 4, "lo') / "metrics.jsonl"
    _truncate_metrics(path, 2)
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in records[:2])
