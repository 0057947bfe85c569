"""Nothing silently wrong (issue 11): bad inputs, crashes and concurrent use end in one clear error, never in
exit 0 with a bad cache. Each test is one case of the "bad inputs tried" table in bench/RESULTS.md."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cache import cache_bytes, config
from test_lock import _holder, _release
from typer.testing import CliRunner

from kd_pipeline.cache import build
from kd_pipeline.cache.backends.hf import HFTeacher
from kd_pipeline.cache.build import cache_teacher
from kd_pipeline.cache.data import DataSpec, iter_documents, iter_sequences, source_fingerprint
from kd_pipeline.cache.format.layout import SHARD_DIR, TOKENIZER_DIR
from kd_pipeline.cache.format.manifest import load_cache
from kd_pipeline.cache.format.verify import verify_cache
from kd_pipeline.errors import CacheError, DataError, LockHeld
from kd_pipeline.pipeline import app
from kd_pipeline.train.trainer import RUN_LOCK, DistillConfig, distill

runner = CliRunner()


def _one_line_error(result, *needles: str) -> str:
    """The CLI failed with exit 2 and a one-line message holding every needle."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, teacher_dir, corpus_jsonl) -> Path:
    """The uninterrupted cache the crash cases must reproduce byte for byte (40 sequences, 7 shards)."""
    out = tmp_path_factory.mktemp("reliability_ref") / "cache"
    cache_teacher(config(teacher_dir, corpus_jsonl, out))
    return out


def _copy(cache: Path, to: Path) -> Path:
    shutil.copytree(cache, to)
    return to


# ----------------------------------------------------------------------------------------- NaN teacher
def test_a_block_with_non_finite_teacher_outputs_is_not_committed(tmp_path, teacher_dir, corpus_jsonl, monkeypatch):
    """Sequence 7 (block 1) comes back NaN: block 0 stays committed, nothing of block 1 is, the error names both."""
    make = HFTeacher.from_config

    def poisoned(config):
        teacher = make(config)
        real = teacher.score

        def scores(input_ids, progress=None, first_seq_id=0):
            out = real(input_ids, progress, first_seq_id)
            if first_seq_id <= 7 < first_seq_id + len(input_ids):
                out.topk_logprobs[7 - first_seq_id, 3, 0] = np.nan
            return out

        teacher.score = scores
        return teacher

    monkeypatch.setattr(HFTeacher, "from_config", staticmethod(poisoned))
    out = tmp_path / "cache"
    with pytest.raises(CacheError, match=r"non-finite log-probabilities .* sequences 7 of .*shards/00000001\.parquet"):
        cache_teacher(config(teacher_dir, corpus_jsonl, out, max_sequences=18))
    info = load_cache(out, require_complete=False)
    assert [s.block for s in info.shards] == [0] and not info.complete
    assert sorted(p.name for p in (out / SHARD_DIR).iterdir()) == ["00000000.parquet"]


def test_nan_teacher_weights_fail_cache_teacher_with_exit_2(tmp_path, teacher_dir, corpus_jsonl):
    from transformers import AutoModelForCausalLM

    nan_teacher = _copy(teacher_dir, tmp_path / "nan_teacher")
    model = AutoModelForCausalLM.from_pretrained(nan_teacher)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.fill_(float("nan"))
    model.save_pretrained(nan_teacher)
    out = tmp_path / "cache"
    result = runner.invoke(
        app,
        [
            "cache-teacher",
            "--teacher",
            str(nan_teacher),
            "--data",
            str(corpus_jsonl),
            "--out",
            str(out),
            "--top-k",
            "4",
            "--seq-len",
            "16",
            "--max-sequences",
            "8",
            "--no-progress",
        ],
    )
    _one_line_error(result, "non-finite", "sequences 0, 1, 2", "shards/00000000.parquet", "nothing was written")
    assert not list((out / SHARD_DIR).iterdir()) and not (out / "manifest.json").exists()


# --------------------------------------------------------------------------------------------- locks
def test_second_cache_writer_is_refused_naming_the_holder(tmp_path, teacher_dir, corpus_jsonl):
    out = tmp_path / "cache"
    holder = _holder(out / build.writer_lock_name(0))  # a live writer of worker 0, as another process
    try:
        result = runner.invoke(
            app,
            [
                "cache-teacher",
                "--teacher",
                str(teacher_dir),
                "--data",
                str(corpus_jsonl),
                "--out",
                str(out),
                "--top-k",
                "8",
                "--max-sequences",
                "4",
                "--no-progress",
            ],
        )
        _one_line_error(result, f"cache {out} is being written by another run", f"pid {holder.pid}", "host")
        # Worker 1 of a two-worker layout is another writer: it is not held up.
        cache_teacher(config(teacher_dir, corpus_jsonl, out, worker_index=1, num_workers=2, max_sequences=12))
    finally:
        _release(holder)
    assert not (out / "manifest.json").exists()  # the refused run wrote nothing
    cache_teacher(config(teacher_dir, corpus_jsonl, out, worker_index=0, num_workers=2, max_sequences=12))
    assert load_cache(out).complete  # the holder was killed -9: its lock went with it


def test_second_distill_on_one_out_is_refused(tmp_path, small_cache, student_config):
    out = tmp_path / "run"
    holder = _holder(out / RUN_LOCK)
    try:
        with pytest.raises(LockHeld, match=rf"run {out} is being written by another run \(pid {holder.pid}"):
            distill(DistillConfig(student=str(student_config), cache=small_cache, out=out, max_steps=1, progress=False))
    finally:
        _release(holder)
    assert not (out / "metrics.jsonl").exists()


# -------------------------------------------------------------------------------------- shard names
@pytest.mark.parametrize(
    "name",
    [
        "/etc/hostname",
        "../../etc/passwd",
        "shards/../manifest.json",
        "shards/sub/x.parquet",
        "../outside/00000000.parquet",
    ],
)
def test_shard_names_outside_the_shard_folder_are_a_corrupt_manifest(tmp_path, reference, student_config, name):
    cache = _copy(reference, tmp_path / "cache")
    manifest = json.loads((cache / "manifest.json").read_text())
    if name.startswith("../outside/"):  # the real shard, moved out with its checksum kept
        (tmp_path / "outside").mkdir()
        shutil.move(cache / manifest["shards"][0]["name"], tmp_path / "outside" / "00000000.parquet")
    manifest["shards"][0]["name"] = name
    (cache / "manifest.json").write_text(json.dumps(manifest))
    problems = verify_cache(cache).problems
    assert len(problems) == 1 and "manifest.json: corrupt manifest" in problems[0] and repr(name) in problems[0]
    result = runner.invoke(
        app,
        [
            "distill",
            "--student",
            str(student_config),
            "--cache",
            str(cache),
            "--out",
            str(tmp_path / "run"),
            "--max-steps",
            "1",
            "--no-progress",
        ],
    )
    _one_line_error(result, "corrupt manifest", "is not a file name inside shards/")


# ---------------------------------------------------------------------------------- symlinked data
def test_a_folder_linking_to_itself_is_read_once_and_the_loop_reported(tmp_path, corpus_jsonl, caplog):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(corpus_jsonl, data / "corpus.jsonl")
    (data / "again").symlink_to(data, target_is_directory=True)  # data/again/again/... forever
    (data / "same.jsonl").symlink_to(data / "corpus.jsonl")  # one file under two names
    with caplog.at_level(logging.WARNING, logger="kd_pipeline.cache.data"):
        documents = list(iter_documents(data))
    assert documents == list(iter_documents(corpus_jsonl))  # 60 documents, each once
    assert [f[0] for f in source_fingerprint(data)["files"]] == ["corpus.jsonl"]
    assert any("symlink loop" in r.message and "again" in r.message for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kd_pipeline.cache.data"):  # a ** glob follows links: the same holds
        assert list(iter_documents(f"{data}/**/*.jsonl")) == documents
    assert [f[0] for f in source_fingerprint(f"{data}/**/*.jsonl")["files"]] == ["corpus.jsonl"]
    assert any("again: symlink loop" in r.message for r in caplog.records)
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(DataError, match="symlink loop"):
        list(iter_documents(tmp_path / "a"))


# ------------------------------------------------------------------------------------- crash states
def test_kill_after_the_first_shard_rename_before_any_manifest_resumes(
    tmp_path, reference, teacher_dir, corpus_jsonl, capsys
):
    """The state a kill -9 leaves between the first shard's rename and the first manifest write."""
    out = _copy(reference, tmp_path / "cache")
    (out / "manifest.json").unlink()
    for shard in sorted((out / SHARD_DIR).iterdir())[1:]:
        shard.unlink()
    cache_teacher(config(teacher_dir, corpus_jsonl, out))
    assert cache_bytes(out) == cache_bytes(reference)
    assert "00000000.parquet: not in the manifest" in capsys.readouterr().err


def test_foreign_files_in_a_shard_folder_without_manifest_are_still_refused(tmp_path, teacher_dir, corpus_jsonl):
    out = tmp_path / "cache"
    (out / SHARD_DIR).mkdir(parents=True)
    (out / SHARD_DIR / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="notes.txt"):
        cache_teacher(config(teacher_dir, corpus_jsonl, out))
    assert (out / SHARD_DIR / "notes.txt").read_text() == "mine"


def test_a_full_disk_names_the_file_and_the_cache_resumes(tmp_path, reference, teacher_dir, corpus_jsonl, monkeypatch):
    write = build.write_shard
    written = []

    def disk_fills_at_the_third_shard(rows, final, row_group_rows, encoding):
        if len(written) == 2:  # half a temporary file, then ENOSPC, as a real full disk gives
            (final.parent / f".{final.name}.tmp-{os.getpid()}").write_bytes(b"PAR1 half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written.append(final)
        write(rows, final, row_group_rows, encoding)

    monkeypatch.setattr(build, "write_shard", disk_fills_at_the_third_shard)
    out = tmp_path / "cache"
    with pytest.raises(CacheError, match=r"shards/00000002\.parquet: cannot write \(No space left on device\)"):
        cache_teacher(config(teacher_dir, corpus_jsonl, out))
    assert len(load_cache(out, require_complete=False).shards) == 2
    monkeypatch.setattr(build, "write_shard", write)  # space freed
    cache_teacher(config(teacher_dir, corpus_jsonl, out))
    assert cache_bytes(out) == cache_bytes(reference)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 48 KiB tmpfs (room for the tokenizer and a shard or two): a real full disk (needs root to mount; skipped elsewhere)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(mount)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_real_full_disk_names_the_file_and_the_cache_resumes(small_tmpfs, reference, teacher_dir, corpus_jsonl):
    out = small_tmpfs / "cache"
    # pyarrow words it "Error writing bytes to file. Detail: [errno 28] No space left on device"
    with pytest.raises(
        CacheError, match=r"cache/\S+: cannot write \(.*No space left on device\); the shards committed"
    ):
        cache_teacher(config(teacher_dir, corpus_jsonl, out))
    committed = len(load_cache(out, require_complete=False).shards)
    assert 0 < committed < 7
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_tmpfs)], check=True)
    cache_teacher(config(teacher_dir, corpus_jsonl, out))
    assert cache_bytes(out) == cache_bytes(reference)


# ----------------------------------------------------------------------------------- one-line errors
def test_missing_model_paths_are_one_line_errors(tmp_path, small_cache, corpus_jsonl):
    missing = str(tmp_path / "no" / "such" / "model")
    result = runner.invoke(
        app,
        [
            "cache-teacher",
            "--teacher",
            missing,
            "--data",
            str(corpus_jsonl),
            "--out",
            str(tmp_path / "cache"),
            "--no-progress",
        ],
    )
    _one_line_error(result, f"--teacher {missing}: no such file or directory")
    assert not (tmp_path / "cache").exists()
    result = runner.invoke(
        app,
        ["distill", "--student", missing, "--cache", str(small_cache), "--out", str(tmp_path / "run"), "--no-progress"],
    )
    _one_line_error(result, f"--student {missing}: no such file or directory")
    result = runner.invoke(
        app,
        [
            "generate",
            "--prompts",
            str(corpus_jsonl),
            "--out",
            str(tmp_path / "g.jsonl"),
            "--mode",
            "teacher",
            "--teacher",
            "./nope",
        ],
    )
    _one_line_error(result, "--teacher ./nope: no such file or directory")
    assert not (tmp_path / "g.jsonl.meta.json").exists()


def test_a_truncated_weights_file_is_named(tmp_path, teacher_dir, corpus_jsonl):
    broken = _copy(teacher_dir, tmp_path / "teacher")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = runner.invoke(
        app,
        [
            "cache-teacher",
            "--teacher",
            str(broken),
            "--data",
            str(corpus_jsonl),
            "--out",
            str(tmp_path / "cache"),
            "--top-k",
            "4",
            "--seq-len",
            "16",
            "--max-sequences",
            "4",
            "--no-progress",
        ],
    )
    _one_line_error(result, f"{weights}: truncated or damaged weights file")


# ------------------------------------------------------------------------------------------ oddities
def test_whitespace_only_documents_contribute_nothing(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    with_blanks, without = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    docs = ["   ", "the whale", "\n\n\t", "said ahab", " "]
    with_blanks.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    without.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs if d.strip()))
    got = [(i.tolist(), m.tolist()) for i, m in iter_sequences(DataSpec(with_blanks, 16), tok)]
    assert got == [(i.tolist(), m.tolist()) for i, m in iter_sequences(DataSpec(without, 16), tok)]


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.zst", "txt"])
def test_a_non_utf8_byte_is_named_by_file_line_and_column(tmp_path, kind):
    lines = [json.dumps({"text": "x" * 3000}) for _ in range(3)] + ['{"text": "caf\xe9"}']
    data = "\n".join(lines).encode("latin-1") + b"\n"
    path = tmp_path / f"bad.{kind}"
    if kind == "jsonl.zst":
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    where = f"{path}:4" if kind != "txt" else f"{path}"
    column = "column 14" if kind != "txt" else "line 4, column 14"
    with pytest.raises(DataError, match=rf"{where}: not UTF-8 text \(byte 0xe9 at {column}"):
        list(iter_documents(path))


def test_verify_checks_the_saved_tokenizer(tmp_path, reference, tokenizer_dir):
    from transformers import AutoTokenizer

    cache = _copy(reference, tmp_path / "cache")
    assert verify_cache(cache).ok
    shutil.rmtree(cache / TOKENIZER_DIR)
    assert verify_cache(cache, check_values=False).problems == [
        f"{cache / TOKENIZER_DIR}: missing (the teacher's tokenizer, saved with the cache; distill and inspect use it)"
    ]
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(cache / TOKENIZER_DIR)
    (problem,) = verify_cache(cache).problems
    assert "tokenizer fingerprint" in problem and "differs from the manifest's" in problem


def test_plot_labels_runs_that_share_a_folder_name_apart(tmp_path):
    from kd_pipeline.train.plot import run_labels

    runs = []
    for parent, loss in (("a", 2.0), ("b", 1.0)):
        run = tmp_path / parent / "run"
        run.mkdir(parents=True)
        (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": loss, "kl": loss}) + "\n")
        runs.append(run)
    assert run_labels(runs) == ["a/run", "b/run"]
    result = runner.invoke(app, ["plot", *map(str, runs), "--out", str(tmp_path / "p.png")])
    assert result.exit_code == 0 and (tmp_path / "p.png").stat().st_size > 0
    _one_line_error(runner.invoke(app, ["plot", str(runs[0]), str(runs[0])]), "the same run is given twice")


def test_inspect_out_of_range_is_an_error(reference):
    info = load_cache(reference)
    _one_line_error(runner.invoke(app, ["inspect", str(reference), "--seq", "40"]), "no sequence 40", "0..5")
    _one_line_error(runner.invoke(app, ["inspect", str(reference), "--seq", "-1"]), "no sequence -1")
    _one_line_error(
        runner.invoke(app, ["inspect", str(reference), "--position", "31"]), "--position 31 is outside [0, 30]"
    )
    shown = runner.invoke(app, ["inspect", str(reference), "--seq", str(info.num_sequences - 1)])
    assert shown.exit_code == 0 and f"seq {info.num_sequences - 1}," in shown.output
