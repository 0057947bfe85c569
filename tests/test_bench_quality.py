"""bench.quality --quick end to end on the tiny local models (no network), and its derived top-k caches."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from bench import quality
from kd_pipeline.cache.build import CacheConfig, cache_teacher
from kd_pipeline.cache.format.encodings import encoding_for
from kd_pipeline.cache.format.manifest import load_cache
from tests.conftest import make_corpus, one_torch_thread


@pytest.fixture(scope="module")
def heldout_jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("heldout") / "heldout.jsonl"
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in make_corpus(20, seed=7)))
    return path


@pytest.fixture(scope="module")
def quick(tmp_path_factory, teacher_dir, student_config, corpus_jsonl, heldout_jsonl) -> tuple[int, Path]:
    out = tmp_path_factory.mktemp("quality")
    argv = [
        "--quick",
        "--teacher",
        str(teacher_dir),
        "--student",
        str(student_config),
        "--data",
        str(corpus_jsonl),
        "--eval-data",
        str(heldout_jsonl),
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    with one_torch_thread():
        return quality.main(argv), out


def test_quick_mode_passes_and_reports_every_run(quick):
    code, out = quick
    report = json.loads((out / "results.json").read_text())
    assert code == 0, quality.quick_failures(report)
    expected = [r.name for r in quality.runs_for(quality.QUICK)]
    assert list(report["runs"]) == expected
    assert {"ce-top64", "fkl-top64", "taid-top64", "atkd-top64", "fkl-top8", "fkl-sampled16", "dense-online"} <= set(
        expected
    )
    table = (out / "report.md").read_text()
    for name in expected:
        assert f"| {name} |" in table
    runs = report["runs"]
    assert runs["fkl-top64"]["kl"] < runs["ce-top64"]["kl"]  # what --quick asserts
    for run in runs.values():
        assert run["tokens"] == report["reference"]["teacher"]["tokens"] > 0
        assert 0 <= run["ece"] <= 1 and 0 <= run["top1"] <= 1 and run["step_seconds"] > 0
        # Bits per byte is the CE over the bytes the targets stand for: nats/token x tokens/byte / ln 2.
        assert run["bpb"] == pytest.approx(
            run["ce"] * run["tokens"] / (report["reference"]["teacher"]["bytes"] * math.log(2))
        )
    for ref in report["reference"].values():  # tiny random models: no order between them to assert
        assert ref["bytes"] == report["reference"]["teacher"]["bytes"] > ref["tokens"] and ref["bpb"] > 0
    assert report["reference"]["teacher"]["kl"] == pytest.approx(0, abs=1e-6)
    assert "Speed: cached FKL step" in table and "On compute alone" in table
    assert (out / "eval_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Storage shrinks with k; every cache holds the same tokens.
    caches = report["caches"]
    assert caches["top8"]["bytes_per_token"] < caches["top16"]["bytes_per_token"] < caches["top64"]["bytes_per_token"]
    assert len({caches[name]["tokens"] for name in ("top64", "top16", "top8", "sampled16")}) == 1
    speed = report["speed"]
    assert speed["online_step_seconds"] > 0 and speed["cache_build_seconds"] > 0
    assert speed["break_even_runs"] is None or speed["break_even_runs"] > 0  # None: online was not slower


def test_quick_mode_exits_nonzero_when_kd_does_not_beat_ce(quick):
    _, out = quick
    report = json.loads((out / "results.json").read_text())
    report["runs"]["fkl-top64"]["kl"] = report["runs"]["ce-top64"]["kl"] + 1.0
    assert quality.quick_failures(report)


def test_derived_top8_equals_a_direct_top8_cache(tmp_path, teacher_dir, corpus_jsonl):
    """Slicing the sorted top-64 gives exactly what the teacher's own top-8 run stores (ids and values)."""
    common = dict(
        teacher=str(teacher_dir),
        data=str(corpus_jsonl),
        seq_len=32,
        max_sequences=12,
        progress=False,
        shard_tokens=32 * 5,
        encoding="exact",
    )
    cache_teacher(CacheConfig(out=tmp_path / "top64", top_k=64, **common))
    cache_teacher(CacheConfig(out=tmp_path / "top8", top_k=8, **common))
    derived = quality.derive_topk_cache(tmp_path / "top64", tmp_path / "derived8", 8)
    direct = load_cache(tmp_path / "top8")
    assert derived.manifest.identity() == direct.manifest.identity()
    assert [s.rows for s in derived.shards] == [s.rows for s in direct.shards]
    for a, b in zip(derived.shards, direct.shards):
        ra, rb = (
            encoding_for(c.manifest).decode(pq.read_table(c.root / s.name)) for c, s in ((derived, a), (direct, b))
        )
        for field in ("input_ids", "topk_ids", "topk_logprobs", "target_logprob"):
            np.testing.assert_array_equal(getattr(ra, field), getattr(rb, field))
    assert [s.sha256 for s in derived.shards] == [s.sha256 for s in direct.shards]  # even the bytes


def test_resume_keeps_the_caches_and_finished_runs(quick, teacher_dir, student_config, corpus_jsonl, heldout_jsonl):
    _, out = quick
    first = json.loads((out / "results.json").read_text())
    interrupted = quality.runs_for(quality.QUICK)[-1]
    (out / "runs" / interrupted.name / quality.SCORES_FILE).unlink()  # as if killed during the last run
    material = quality.Material(str(teacher_dir), str(student_config), str(corpus_jsonl), str(heldout_jsonl))
    settings = dataclasses.replace(quality.QUICK, device="cpu")
    with one_torch_thread():
        report = quality.run_benchmark(material, settings, out, resume=True)
    assert report["resumed"]["caches"] and interrupted.name not in report["resumed"]["runs"]
    assert len(report["resumed"]["runs"]) == len(first["runs"]) - 1
    assert report["caches"]["top64"]["build_seconds"] == first["caches"]["top64"]["build_seconds"]
    for name, run in first["runs"].items():  # same seed, same batches: the rerun run scores the same
        assert report["runs"][name]["kl"] == pytest.approx(run["kl"], rel=1e-4)
    with pytest.raises(RuntimeError, match="without --resume"):
        quality.run_benchmark(material, dataclasses.replace(settings, lr=2e-3), out, resume=True)


def test_selected_runs_reuse_the_caches_for_another_student(quick, tmp_path, teacher_dir, corpus_jsonl, heldout_jsonl):
    """--runs with --resume: another student trains on a copy of the caches, no teacher pass, no speed line."""
    _, out = quick
    first = json.loads((out / "results.json").read_text())
    shutil.copytree(out / "caches", tmp_path / "caches")
    # The teacher itself stands in for a second student: same tokenizer, another architecture size.
    material = quality.Material(str(teacher_dir), str(teacher_dir), str(corpus_jsonl), str(heldout_jsonl))
    settings = dataclasses.replace(quality.QUICK, device="cpu")
    with one_torch_thread():
        report = quality.run_benchmark(material, settings, tmp_path, resume=True, only=["ce-top64"])
    assert report["resumed"]["caches"] and list(report["runs"]) == ["ce-top64"]
    assert report["caches"]["top64"]["build_seconds"] == first["caches"]["top64"]["build_seconds"]
    assert report["params"]["student"] == report["params"]["teacher"] != first["params"]["student"]
    assert report["speed"] is None  # the speed comparison needs fkl-top64 and dense-online
    text = quality.format_report(report)
    assert "| ce-top64 |" in text and "| fkl-top64 |" not in text and "Speed:" not in text
    with pytest.raises(ValueError, match="unknown runs"):
        quality.runs_for(settings, ["fkl-top32"])


def test_noise_seeds_rerun_fkl_and_taid_with_other_trainer_seeds_on_the_same_caches():
    settings = dataclasses.replace(quality.QUICK, seed=3, noise_seeds=2)
    extra = [r for r in quality.runs_for(settings) if r.seed_offset]
    assert [(r.name, r.cache, r.loss, r.seed_offset) for r in extra] == [
        ("fkl-top64-seed4", "top64", "fkl", 1),
        ("taid-top64-seed4", "top64", "taid", 1),
        ("fkl-top64-seed5", "top64", "fkl", 2),
        ("taid-top64-seed5", "top64", "taid", 2),
    ]


def test_runs_are_trained_in_the_order_given():
    names = ["dense-online", "ce-top64", "fkl-sampled16", "ce-top64"]
    assert [r.name for r in quality.runs_for(quality.QUICK, names)] == ["dense-online", "ce-top64", "fkl-sampled16"]
    with pytest.raises(ValueError, match="unknown runs"):
        quality.runs_for(quality.QUICK, ["fkl-top3"])


def test_runs_build_only_the_caches_they_read(tmp_path, teacher_dir, student_config, corpus_jsonl, heldout_jsonl):
    """--runs fkl-top8 needs the top-64 cache (top-8 is sliced from it) and the held-out one, no sampled pass;
    a later --resume for a sampled run builds that cache alone and keeps the others' build times."""
    material = quality.Material(str(teacher_dir), str(student_config), str(corpus_jsonl), str(heldout_jsonl))
    settings = dataclasses.replace(quality.QUICK, device="cpu", steps=4, eval_every=4)
    with one_torch_thread():
        first = quality.run_benchmark(material, settings, tmp_path, only=["fkl-top8"])
        assert list(first["caches"]) == ["top64", "top8", "heldout"] and first["sampled_support"] is None
        assert not (tmp_path / "caches" / "sampled16").exists()
        text = quality.format_report(first)
        assert "Sampled support" not in text and "Derived caches (top8)" in text
        second = quality.run_benchmark(material, settings, tmp_path, resume=True, only=["fkl-sampled16", "fkl-top8"])
    assert list(second["caches"]) == ["top64", "top8", "sampled16", "heldout"]
    assert second["resumed"] == {"caches": ["top64", "top8", "heldout"], "runs": ["fkl-top8"]}
    for name in ("top64", "top8", "heldout"):
        assert second["caches"][name]["build_seconds"] == first["caches"][name]["build_seconds"]
    assert second["sampled_support"]["mean_distinct_ids"] > 1
    assert "the caches top64, top8, heldout and the runs fkl-top8" in quality.format_report(second)
    record = json.loads((tmp_path / "caches" / quality.BUILD_RECORD).read_text())
    assert list(record["build_seconds"]) == ["top64", "top8", "heldout", "sampled16"]


def test_min_logprob_cuts_the_training_cache_not_the_heldout_one(
    tmp_path, teacher_dir, student_config, corpus_jsonl, heldout_jsonl
):
    """--min-logprob X (the compact encoding's support cut) on the training cache only: the held-out cache keeps
    its full top-k, so runs with and without the cut are scored on the same bins."""
    from kd_pipeline import read_all

    material = quality.Material(str(teacher_dir), str(student_config), str(corpus_jsonl), str(heldout_jsonl))
    cut = -5.0  # about the median log-prob of the tiny teacher's top-64
    settings = dataclasses.replace(
        quality.QUICK, device="cpu", steps=2, eval_every=2, encoding="compact", min_logprob=cut
    )
    with one_torch_thread():
        report = quality.run_benchmark(material, settings, tmp_path, only=["fkl-top64"])
    assert list(report["caches"]) == ["top64", "heldout"]
    top, heldout = (load_cache(tmp_path / "caches" / name) for name in ("top64", "heldout"))
    assert encoding_for(top.manifest).min_logprob == cut and encoding_for(heldout.manifest).min_logprob is None
    lp = read_all(top).topk_logprobs
    kept = np.isfinite(lp)
    assert kept[..., 0].all() and not kept.all()  # the cut is real on the tiny teacher
    below = kept & (lp < cut - encoding_for(top.manifest).error_bound())
    assert not below[..., 1:].any()  # only the top-1, always kept, may lie below the cut
    assert np.isfinite(read_all(heldout).topk_logprobs).all()
