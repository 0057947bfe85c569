"""bench.bench_switch --quick end to end on the tiny local models: generate, cache and distill per data mode."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench import bench_switch
from kd_pipeline.cache.generate import MODES
from tests.conftest import make_corpus, one_torch_thread


@pytest.fixture(scope="module")
def quick(tmp_path_factory, teacher_dir, student_config, corpus_jsonl) -> tuple[int, Path]:
    heldout = tmp_path_factory.mktemp("switch-heldout") / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in make_corpus(20, seed=7)))
    out = tmp_path_factory.mktemp("switch")
    argv = [
        "--quick",
        "--teacher",
        str(teacher_dir),
        "--student",
        str(student_config),
        "--data",
        str(corpus_jsonl),
        "--eval-data",
        str(heldout),
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    with one_torch_thread():
        return bench_switch.main(argv), out


def test_quick_run_reports_every_mode(quick):
    code, out = quick
    assert code == 0
    report = json.loads((out / "results.json").read_text())
    s = bench_switch.QUICK
    assert list(report["modes"]) == list(MODES)
    assert report["warmup"]["after"]["step"] == s.warmup_steps
    modes = report["modes"]
    # Who wrote the tokens: the teacher everywhere, nowhere, or where SWITCH's threshold says.
    assert modes["teacher"]["teacher_share"] == 1.0
    assert modes["student"]["teacher_share"] == 0.0
    assert 0.0 <= modes["switch"]["teacher_share"] <= 1.0
    for m in modes.values():
        assert m["responses"] == s.num_prompts
        assert 0 < m["mean_response_tokens"] <= s.max_new_tokens
        assert m["mean_jsd"] is not None and 0 <= m["mean_jsd"] <= math.log(2)  # JSD in nats is at most ln 2
        assert m["after"]["step"] == s.steps and math.isfinite(m["after"]["eval_kl"])
        # Every student starts from the same warmed-up model, scored on the same held-out cache.
        assert m["before"]["eval_kl"] == pytest.approx(report["warmup"]["after"]["eval_kl"], rel=1e-5)
    table = (out / "report.md").read_text()
    for mode in MODES:
        assert f"| {mode} |" in table
