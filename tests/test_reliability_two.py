"""Nothing silently wrong, round two (issue 23): inputs that train nothing, a cache replaced under a run, damaged
and half-written checkpoints, odd options, full and read-only disks. Each test is one row of the "bad inputs tried"
table in bench/RESULTS.md, and each failed on the code before the issue's fixes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import build_llama
from test_cache import config as cache_config
from test_data import encode_document
from test_resume import cli, losses_logged
from test_resume import config as distill_config
from typer.testing import CliRunner

from kd_pipeline.cache.build import cache_teacher
from kd_pipeline.cache.data import DataSpec, iter_documents, iter_sequences
from kd_pipeline.cache.format.layout import SHARD_DIR
from kd_pipeline.cache.format.manifest import load_cache
from kd_pipeline.cache.format.verify import verify_cache
from kd_pipeline.errors import CacheError, DataError, TrainingError
from kd_pipeline.pipeline import app
from kd_pipeline.train import checkpoint
from kd_pipeline.train.checkpoint import CHECKPOINT_DIR, checkpoint_dirs
from kd_pipeline.train.reader import CacheReader
from kd_pipeline.train.trainer import distill

runner = CliRunner()


def _one_line_error(result, *needles: str) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _chat_jsonl(path: Path, conversations: list[list[tuple[str, str]]]) -> Path:
    with open(path, "w") as f:
        for turns in conversations:
            f.write(json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]}) + "\n")
    return path


def _conversation(i: int, answer_role: str | None = "assistant") -> list[tuple[str, str]]:
    turns = [("system", "Be brief."), ("user", f"Tell me about the whale number {i} and the sea.")]
    if answer_role:
        turns.append((answer_role, f"The whale {i} swam under the deck of the ship into the dark sea at night."))
    return turns


# ---------------------------------------------------------------------------------- 1. roles that train nothing
@pytest.mark.parametrize("alias", ["model", "gpt"])
def test_gemma_and_sharegpt_answer_roles_train_as_assistant(tokenizer_dir, alias):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    as_assistant = encode_document([{"role": r, "content": c} for r, c in _conversation(1)], tok)
    aliased = encode_document([{"role": r, "content": c} for r, c in _conversation(1, alias)], tok)
    assert as_assistant[1].sum() > 10  # the answer and its end-of-turn marker
    np.testing.assert_array_equal(aliased[0], as_assistant[0])  # rendered as the assistant's turn
    np.testing.assert_array_equal(aliased[1], as_assistant[1])


def test_an_unknown_answer_role_is_refused_by_name_or_named_by_option(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    conversation = [{"role": r, "content": c} for r, c in _conversation(1, "bot")]
    with pytest.raises(DataError, match=r"role\(s\) 'bot' are neither trained .* --assistant-role bot"):
        encode_document(conversation, tok)
    from kd_pipeline.cache.data import encode_batch

    ids, mask, _ = encode_batch([conversation], tok, assistant_roles=["bot"])
    expected = encode_document([{"role": r, "content": c} for r, c in _conversation(1)], tok)
    np.testing.assert_array_equal(ids, expected[0])
    np.testing.assert_array_equal(mask, expected[1])


@pytest.fixture(scope="module")
def untrained_cache(tmp_path_factory, teacher_dir) -> Path:
    """Conversations with no assistant turn (system and user only): a complete cache with 0 trained targets."""
    d = tmp_path_factory.mktemp("untrained")
    data = _chat_jsonl(d / "prompts.jsonl", [_conversation(i, None) for i in range(40)])
    out = d / "cache"
    with pytest.raises(CacheError, match=r"none of the cache's 384 tokens is a trained target"):
        cache_teacher(cache_config(teacher_dir, data, out, max_sequences=12))
    return out


def test_a_cache_that_trains_nothing_is_an_error_in_every_stage(untrained_cache, student_config, tmp_path):
    assert load_cache(untrained_cache).num_trained == 0  # complete, and says so
    report = verify_cache(untrained_cache)
    assert [p for p in report.problems if "is a trained target" in p] == report.problems and report.problems
    assert runner.invoke(app, ["verify", str(untrained_cache)]).exit_code == 1
    result = runner.invoke(
        app,
        ["distill", "--student", str(student_config), "--cache", str(untrained_cache), "--out", str(tmp_path / "r")]
        + ["--max-steps", "1", "--no-progress"],
    )
    _one_line_error(result, "none of the cache's 384 tokens is a trained target")


@pytest.fixture(scope="module")
def prompts_at_the_end(tmp_path_factory, teacher_dir) -> Path:
    """Answered conversations, then prompt-only ones: the cache's last sequences train nothing."""
    d = tmp_path_factory.mktemp("tail")
    conversations = [_conversation(i) for i in range(20)] + [_conversation(i, None) for i in range(40)]
    out = d / "cache"
    cache_teacher(cache_config(teacher_dir, _chat_jsonl(d / "chat.jsonl", conversations), out, max_sequences=None))
    return out


def _trained_per_sequence(cache: Path) -> np.ndarray:
    reader = CacheReader(cache, batch_size=64, shuffle=False, drop_remainder=False, prefetch=0)
    return np.concatenate([b["target_mask"].sum(-1).numpy() for b in reader.iter_epoch(0)])


def test_an_eval_set_without_trained_targets_is_an_error(prompts_at_the_end, student_config, tmp_path):
    trained = _trained_per_sequence(prompts_at_the_end)
    last = int(np.flatnonzero(trained)[-1])  # the last sequence with a trained target
    assert 0 < last < len(trained) - 4
    untrained_tail = len(trained) - 1 - last
    with pytest.raises(TrainingError, match="the eval set .* holds no trained target"):
        distill(distill_config(student_config, prompts_at_the_end, tmp_path / "a", eval_sequences=untrained_tail))


def test_a_batch_stream_without_trained_targets_is_an_error(untrained_cache, student_config, tmp_path):
    """A cache made before shards recorded their trained counts: setup cannot tell, the first epoch does."""
    old = Path(shutil.copytree(untrained_cache, tmp_path / "old"))
    manifest = json.loads((old / "manifest.json").read_text())
    for entry in manifest["shards"]:
        del entry["trained"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert load_cache(old).num_trained is None
    with pytest.raises(TrainingError, match="1 steps .* trained no target"):
        distill(distill_config(student_config, old, tmp_path / "b", eval_sequences=0, max_steps=None, epochs=2.0))
    assert not (tmp_path / "b" / "final").exists()


# ------------------------------------------------------------------------------- 2. a cache replaced under a run
def test_a_shard_replaced_under_a_running_reader_stops_it_by_name(tmp_path, small_cache):
    cache = Path(shutil.copytree(small_cache, tmp_path / "cache"))
    reader = CacheReader(cache, batch_size=6, shuffle=False, prefetch=0)
    batches = iter(reader)
    for _ in range(reader.batches_per_epoch):  # one epoch: every shard verified and read
        next(batches)
    shard = cache / load_cache(cache).shards[0].name
    # A rebuild renames a new file into place: same rows here, other bytes (another compression level).
    table = pq.read_table(shard)
    pq.write_table(table, tmp_path / "new.parquet", compression="zstd", compression_level=19, row_group_size=4)
    os.replace(tmp_path / "new.parquet", shard)
    with pytest.raises(CacheError, match=rf"{shard}: the shard changed since this run verified it"):
        next(batches)
    # The same bytes under a new inode (a copy of the same cache, rsync without --inplace) read on.
    shutil.copytree(small_cache, tmp_path / "again")
    reader = CacheReader(tmp_path / "again", batch_size=6, shuffle=False, prefetch=0)
    batches = iter(reader)
    first = [next(batches)["seq_ids"] for _ in range(reader.batches_per_epoch)]
    again = tmp_path / "again" / load_cache(cache).shards[0].name
    shutil.copy(small_cache / load_cache(cache).shards[0].name, tmp_path / "copy.parquet")
    os.replace(tmp_path / "copy.parquet", again)
    second = [next(batches)["seq_ids"] for _ in range(reader.batches_per_epoch)]
    assert sorted(torch.cat(first).tolist()) == sorted(torch.cat(second).tolist())


# --------------------------------------------------------------------------------------------- 3, 4, 9: checkpoints
@pytest.fixture(scope="module")
def four_steps_once(tmp_path_factory, small_cache, student_config) -> Path:
    out = tmp_path_factory.mktemp("four") / "run"
    code, output = cli(student_config, small_cache, out)
    assert code == 0, output
    return out


@pytest.fixture
def four_steps(four_steps_once, tmp_path) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4, a copy for each test."""
    return Path(shutil.copytree(four_steps_once, tmp_path / "run"))


def _weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "final" / "model.safetensors")


def test_a_resave_killed_between_removing_and_renaming_resumes_from_that_step(
    four_steps, small_cache, student_config, monkeypatch
):
    """A requeued run re-saves the step it resumed from, killed after the old step-4 went, before the new one's
    rename: the complete .tmp stands for step-4 (the old code left an incomplete .tmp and retrained from 0)."""
    real = os.replace

    def killed(src, dst):
        if Path(src).name.startswith(".step-"):
            raise KeyboardInterrupt  # the process dies here
        real(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        distill(distill_config(student_config, small_cache, four_steps, resume=True))
    monkeypatch.setattr(checkpoint.os, "replace", real)
    names = sorted(p.name for p in (four_steps / CHECKPOINT_DIR).iterdir())
    assert names == [".step-00000004.tmp", "step-00000002"]
    code, output = cli(student_config, small_cache, four_steps, "--resume")
    assert code == 0, output
    assert "resumed from" in output and "step-00000004.tmp at step 4" in output
    assert "starting from scratch" not in output
    assert [p.name for p in checkpoint_dirs(four_steps)] == ["step-00000002", "step-00000004"]
    assert sorted(losses_logged(four_steps)) == [1, 2, 3, 4]  # nothing retrained


def test_resume_with_only_incomplete_checkpoints_is_an_error(four_steps, small_cache, student_config):
    for ckpt in checkpoint_dirs(four_steps):
        (ckpt / "COMPLETE").unlink()
    code, output = cli(student_config, small_cache, four_steps, "--resume")
    assert code == 2, output
    assert "holds no complete checkpoint, only step-00000002, step-00000004" in output
    assert "starting from scratch" not in output and "Traceback" not in output


def test_a_flipped_bit_in_a_checkpoint_is_found_and_the_one_before_used(four_steps, small_cache, student_config):
    shard = next((four_steps / CHECKPOINT_DIR / "step-00000004").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10  # inside a tensor's bytes: same size, loads without complaint
    shard.write_bytes(bytes(data))
    code, output = cli(student_config, small_cache, four_steps, "--resume", "--max-steps", "6", "--allow-config-change")
    assert code == 0, output
    assert f"warning: skipping checkpoint {shard.parent}: {shard}: CRC-32" in output
    assert "step-00000002 at step 2" in output


def test_a_checkpoint_without_checksums_resumes_by_sizes_with_a_note(four_steps, small_cache, student_config):
    marker = four_steps / CHECKPOINT_DIR / "step-00000004" / "COMPLETE"
    record = json.loads(marker.read_text())
    del record["crc32"]  # as checkpoints were written before
    marker.write_text(json.dumps(record))
    code, output = cli(student_config, small_cache, four_steps, "--resume")
    assert code == 0, output
    assert "was written before checkpoints had checksums: its files are checked by size only" in output
    assert "step-00000004 at step 4" in output


def test_damaged_dcp_metadata_falls_back_to_the_checkpoint_before(four_steps, small_cache, student_config):
    """torch.distributed.checkpoint raises CheckpointException, a BaseException: it must not end the run."""
    metadata = four_steps / CHECKPOINT_DIR / "step-00000004" / ".metadata"
    metadata.write_bytes(bytes(metadata.stat().st_size))  # same size, not a pickle
    marker = metadata.parent / "COMPLETE"
    record = json.loads(marker.read_text())
    record.pop("crc32")  # damage the checksums cannot see (as in a checkpoint written before them)
    marker.write_text(json.dumps(record))
    code, output = cli(student_config, small_cache, four_steps, "--resume", "--max-steps", "6", "--allow-config-change")
    assert code == 0, output
    assert f"warning: skipping checkpoint {metadata.parent}" in output
    assert "step-00000002 at step 2" in output


def test_an_unreadable_rng_file_falls_back_to_the_checkpoint_before(four_steps, small_cache, student_config):
    rng = four_steps / CHECKPOINT_DIR / "step-00000004" / "rng-rank0.pt"
    marker = rng.parent / "COMPLETE"
    rng.write_bytes(b"\x80\x05not a pickle" + bytes(rng.stat().st_size - 14))  # same size
    record = json.loads(marker.read_text())
    record.pop("crc32")  # damage the checksums cannot see (as in a checkpoint written before them)
    marker.write_text(json.dumps(record))
    code, output = cli(student_config, small_cache, four_steps, "--resume", "--max-steps", "6", "--allow-config-change")
    assert code == 0, output
    assert f"warning: skipping checkpoint {rng.parent}: {rng}: unreadable" in output
    assert "step-00000002 at step 2" in output


# -------------------------------------------------------------------------------------- 5. another teacher's eval
def test_an_eval_cache_of_another_teacher_is_refused_naming_both(tmp_path, small_cache, student_config, tokenizer_dir):
    from transformers import AutoTokenizer

    other = tmp_path / "other-teacher"
    other.mkdir()
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(other)  # the same vocabulary, another model
    build_llama(other, len(AutoTokenizer.from_pretrained(tokenizer_dir)), layers=1, hidden=32, seed=7)
    corpus = load_cache(small_cache).manifest.data_path
    eval_cache = tmp_path / "eval"
    cache_teacher(cache_config(other, corpus, eval_cache, max_sequences=8))
    args = ["--eval-cache", str(eval_cache), "--max-steps", "1"]
    code, output = cli(student_config, small_cache, tmp_path / "run", *args)
    assert code == 2, output
    assert f"was made by teacher {other}" in output and "--allow-eval-teacher-mismatch" in output
    assert str(load_cache(small_cache).manifest.teacher["name_or_path"]) in output
    code, output = cli(student_config, small_cache, tmp_path / "run", *args, "--allow-eval-teacher-mismatch")
    assert code == 0, output


# ---------------------------------------------------------------------------------------------- 6. odd options
@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--max-steps", "0", "--max-steps must be >= 1"),
        ("--max-steps", "-5", "--max-steps must be >= 1"),
        ("--warmup-steps", "-10", "--warmup-steps must be >= 0"),
        ("--grad-clip", "nan", "--grad-clip must be a finite number"),
        ("--grad-clip", "-1", "--grad-clip must be >= 0"),
        ("--lr", "inf", "--lr must be a finite number"),
        ("--eval-sequences", "-5", "--eval-sequences must be >= 0"),
        ("--shuffle-rows", "0", "--shuffle-rows must be >= 1"),
        ("--keep-checkpoints", "0", "--keep-checkpoints must be >= 1"),
        ("--epochs", "nan", "--epochs must be a finite number"),
    ],
)
def test_odd_numeric_options_are_refused_in_one_line(tmp_path, small_cache, student_config, option, value, message):
    result = runner.invoke(
        app,
        ["distill", "--student", str(student_config), "--cache", str(small_cache), "--out", str(tmp_path / "r")]
        + ["--no-progress", option, value],
    )
    _one_line_error(result, message)
    assert not (tmp_path / "r").exists()  # refused before anything is written


# ----------------------------------------------------------------------------------------------------- 7. BOM
@pytest.mark.parametrize("kind", ["txt", "jsonl"])
def test_a_utf8_bom_is_not_text(tmp_path, tokenizer_dir, kind):
    from transformers import AutoTokenizer

    text = "The whale swam under the ship."
    path = tmp_path / f"doc.{kind}"
    path.write_bytes(b"\xef\xbb\xbf" + (text if kind == "txt" else json.dumps({"text": text})).encode())
    assert list(iter_documents(path)) == [text]
    plain = tmp_path / f"plain.{kind}"
    plain.write_bytes(path.read_bytes()[3:])
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    with_bom, without = (list(iter_sequences(DataSpec(str(p), seq_len=16), tok)) for p in (path, plain))
    np.testing.assert_array_equal(np.stack([s[0] for s in with_bom]), np.stack([s[0] for s in without]))


# ------------------------------------------------------------------------------------------- 10. torn metrics
def test_a_torn_last_metrics_line_is_dropped_and_damage_elsewhere_named(four_steps, small_cache, student_config):
    metrics = four_steps / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines) + "\n" + lines[-1][: len(lines[-1]) // 2])  # killed mid-write
    code, output = cli(student_config, small_cache, four_steps, "--resume", "--max-steps", "6", "--allow-config-change")
    assert code == 0, output
    assert f"{metrics}: line {len(lines) + 1} is cut short" in output  # the one metrics reader, train/metrics.py
    assert sorted(losses_logged(four_steps)) == list(range(1, 7))
    lines = metrics.read_text().splitlines()
    lines[2] = lines[2][:10]
    metrics.write_text("\n".join(lines) + "\n")
    code, output = cli(student_config, small_cache, four_steps, "--resume", "--max-steps", "8", "--allow-config-change")
    assert code == 2, output
    assert f"{metrics}: line 3 is not a JSON record" in output and "Traceback" not in output


# ------------------------------------------------------------------------------------- 11. full and read-only disks
@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a fresh tmpfs of that size (needs root; skipped elsewhere); unmounted after the test."""
    mounts = []

    def mount(size: str) -> Path:
        where = tmp_path / f"tmpfs{len(mounts)}"
        where.mkdir()
        if (
            os.geteuid() != 0
            or subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
            ).returncode
        ):
            pytest.skip("cannot mount a tmpfs here")
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        subprocess.run(["umount", str(where)], check=True)


def test_a_full_disk_during_a_checkpoint_is_one_line_and_the_older_ones_hold(
    tmpfs, small_cache, student_config, four_steps_once
):
    step2 = four_steps_once / CHECKPOINT_DIR / "step-00000002"
    size = sum(f.stat().st_size for f in step2.iterdir())
    disk = tmpfs(f"{(size * 3 // 2) // 1024}k")  # room for one checkpoint and a half
    out = disk / "run"
    code, output = cli(student_config, small_cache, out)
    assert code == 2, output
    line = next(x for x in output.splitlines() if x.startswith("error: "))
    assert "checkpoints/.step-00000004.tmp: cannot write the step-4 checkpoint (No space left on device)" in line
    assert "the checkpoints before it are intact (step-00000002)" in line and "Traceback" not in output
    checkpoint.check_files(out / CHECKPOINT_DIR / "step-00000002")  # sizes and checksums still hold
    assert not (out / CHECKPOINT_DIR / ".step-00000004.tmp").exists()  # its space given back
    subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
    code, output = cli(student_config, small_cache, out, "--resume")
    assert code == 0, output
    reference = losses_logged(four_steps_once)
    for step, logged in losses_logged(out).items():
        assert logged["loss"] == pytest.approx(reference[step]["loss"], rel=1e-5)


def test_read_only_outputs_are_one_line(tmpfs, small_cache, student_config, teacher_dir, corpus_jsonl):
    disk = tmpfs("8m")
    cache = disk / "cache"
    cache_teacher(cache_config(teacher_dir, corpus_jsonl, cache, max_sequences=12))
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    result = runner.invoke(
        app,
        ["distill", "--student", str(student_config), "--cache", str(small_cache), "--out", str(disk / "run")]
        + ["--max-steps", "1", "--no-progress"],
    )
    _one_line_error(result, f"{disk / 'run'}/.distill.lock: cannot take the lock", "Read-only file system")
    args = ["cache-teacher", "--teacher", str(teacher_dir), "--data", str(corpus_jsonl), "--out", str(cache)]
    result = runner.invoke(app, args + ["--top-k", "8", "--seq-len", "32", "--max-sequences", "12", "--no-progress"])
    _one_line_error(result, f"{cache}/.writer000.lock: cannot take the lock", "Read-only file system")


# -------------------------------------------------------------------------------------------- 13. a moved cache
def test_a_moved_cache_resumes_by_its_fingerprint_and_records_the_new_path(
    tmp_path, four_steps, small_cache, student_config
):
    moved = Path(shutil.copytree(small_cache, tmp_path / "moved-cache"))
    code, output = cli(student_config, moved, four_steps, "--resume", "--max-steps", "6", "--allow-config-change")
    assert code == 0, output
    assert f"--cache moved from {small_cache} to {moved}, the same content" in output
    lineage = json.loads((four_steps / "final" / "lineage.json").read_text())
    assert lineage["cache"] == str(moved.resolve()) and lineage["config"]["cache"] == [str(moved)]
    assert any("moved" in c for change in lineage["config_changes"] for c in change["changes"])
    # Another cache at the moved path is still refused.
    other = tmp_path / "other"
    shutil.copytree(small_cache, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["shards"][-1]["sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    code, output = cli(student_config, other, four_steps, "--resume", "--max-steps", "6")
    assert code == 2 and "--cache:" in output and "start a new run" in output


# ------------------------------------------------------------------------------------ 14. verify on an incomplete cache
def test_verify_says_incomplete_with_its_own_exit_code(tmp_path, small_cache, teacher_dir, corpus_jsonl):
    half = tmp_path / "half"
    cache_teacher(cache_config(teacher_dir, corpus_jsonl, half, worker_index=0, num_workers=2, max_sequences=24))
    result = runner.invoke(app, ["verify", str(half)])
    assert result.exit_code == 3, result.output
    assert (
        result.output.splitlines()[-1].startswith("INCOMPLETE: ") and "no manifest from worker(s) [1]" in result.output
    )
    unfinished = Path(shutil.copytree(small_cache, tmp_path / "unfinished"))
    manifest = json.loads((unfinished / "manifest.json").read_text())
    manifest["complete"] = False
    (unfinished / "manifest.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, ["verify", "--quick", str(unfinished)])
    assert result.exit_code == 3 and "worker(s) [0] not finished" in result.output
    assert runner.invoke(app, ["verify", "--quick", str(small_cache)]).exit_code == 0
    assert "3 INCOMPLETE" in runner.invoke(app, ["verify", "--help"]).output
    assert (half / SHARD_DIR).exists()
