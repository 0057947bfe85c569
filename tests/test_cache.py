"""Stage one end to end: values against a float64 reference, crash/resume, mismatches, verify, workers."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from kd_pipeline import read_all as read_rows
from kd_pipeline.cache.build import CacheConfig, cache_teacher
from kd_pipeline.cache.format.layout import SHARD_DIR
from kd_pipeline.cache.format.manifest import load_cache
from kd_pipeline.cache.format.rows import tail_mass
from kd_pipeline.cache.format.verify import verify_cache
from kd_pipeline.errors import CacheError
from kd_pipeline.pipeline import app

K, SEQ_LEN = 8, 32


def config(teacher, data, out, **kw) -> CacheConfig:
    base = dict(
        teacher=str(teacher),
        data=str(data),
        out=Path(out),
        top_k=K,
        seq_len=SEQ_LEN,
        batch_size=4,
        shard_tokens=SEQ_LEN * 6,
        row_group_tokens=SEQ_LEN * 4,
        max_sequences=40,
        progress=False,
    )
    base.update(kw)
    return CacheConfig(**base)


def read_all(cache_dir: Path):
    info = load_cache(cache_dir)
    return info, read_rows(info)


def cache_bytes(cache_dir: Path) -> dict[str, bytes]:
    files = sorted((cache_dir / SHARD_DIR).glob("*.parquet")) + sorted(cache_dir.glob("manifest*.json"))
    return {f.relative_to(cache_dir).as_posix(): f.read_bytes() for f in files}


@pytest.fixture(scope="module")
def reference_cache(tmp_path_factory, teacher_dir, corpus_jsonl) -> Path:
    out = tmp_path_factory.mktemp("ref") / "cache"
    cache_teacher(config(teacher_dir, corpus_jsonl, out))
    return out


def test_cache_matches_float64_dense_reference(reference_cache, teacher_dir):
    from transformers import AutoModelForCausalLM

    info, rows = read_all(reference_cache)
    assert rows.num_rows == 40 and info.complete
    assert np.array_equal(rows.seq_ids, np.arange(40))
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float64).eval()
    with torch.no_grad():
        ids = torch.from_numpy(rows.input_ids.astype(np.int64))
        lp = torch.log_softmax(model(input_ids=ids[:, :-1]).logits, -1)
    ref_lp, ref_ids = torch.topk(lp, K, dim=-1)
    ref_target = lp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    # The cache ran in fp32 and stored fp16: ids agree except where two candidates are within fp32 noise.
    ids_agree = (torch.from_numpy(rows.topk_ids.astype(np.int64)) == ref_ids).float().mean().item()
    assert ids_agree > 0.999
    # Within the cache encoding's bound of the teacher's fp32 values, plus fp32-vs-float64 noise.
    from kd_pipeline.cache.format.encodings import encoding_for

    bound = encoding_for(info.manifest).error_bound() + 2e-3
    np.testing.assert_allclose(rows.topk_logprobs.astype(np.float64), ref_lp.numpy(), atol=bound, rtol=2e-3)
    np.testing.assert_allclose(rows.target_logprob.astype(np.float64), ref_target.numpy(), atol=2e-2, rtol=2e-3)
    # Sorted, normalized over the full vocab: tail mass equals the reference's mass outside the top-k.
    assert (np.diff(rows.topk_logprobs.astype(np.float32), axis=-1) <= 0).all()
    ref_rest = (1 - ref_lp.exp().sum(-1)).numpy()
    np.testing.assert_allclose(tail_mass(rows.topk_logprobs), ref_rest, atol=5e-3)
    assert ref_rest.mean() > 0.05  # the test teacher is not so peaked that the tail is trivially empty


def test_loss_mask_and_packing(reference_cache):
    _, rows = read_all(reference_cache)
    assert not rows.loss_mask[:, 0].any()
    assert rows.loss_mask[:, 1:].all()  # 40 full sequences of plain text: every target trained


def test_rerun_of_a_complete_cache_is_a_no_op(reference_cache, teacher_dir, corpus_jsonl, capsys):
    before = cache_bytes(reference_cache)
    cache_teacher(config(teacher_dir, corpus_jsonl, reference_cache))
    assert cache_bytes(reference_cache) == before
    assert "already complete" in capsys.readouterr().err


@pytest.mark.parametrize(
    "change, expected",
    [({"top_k": 4}, "k: 8 != 4"), ({"seq_len": 16}, "seq_len"), ({"max_sequences": 30}, "max_sequences")],
)
def test_mismatched_resume_is_refused(tmp_path, reference_cache, teacher_dir, corpus_jsonl, change, expected):
    out = tmp_path / "cache"
    cache_teacher(config(teacher_dir, corpus_jsonl, out, max_sequences=12))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["complete"] = False
    (out / "manifest.json").write_text(json.dumps(manifest))
    before = cache_bytes(out)
    base = {"max_sequences": 12, **change}
    with pytest.raises(CacheError, match=expected.split(":")[0]):
        cache_teacher(config(teacher_dir, corpus_jsonl, out, **base))
    assert cache_bytes(out) == before  # nothing overwritten
    cache_teacher(config(teacher_dir, corpus_jsonl, out, overwrite=True, **base))
    assert load_cache(out).manifest.k == base.get("top_k", K)


def test_other_data_or_teacher_is_refused(tmp_path, teacher_dir, corpus_jsonl, tokenizer_dir):
    from tests.conftest import build_llama

    out = tmp_path / "cache"
    cache_teacher(config(teacher_dir, corpus_jsonl, out, max_sequences=12))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["complete"] = False
    (out / "manifest.json").write_text(json.dumps(manifest))
    other_data = tmp_path / "other.jsonl"
    other_data.write_text(json.dumps({"text": "a different whale"}) + "\n" + corpus_jsonl.read_text())
    with pytest.raises(CacheError, match="data.source.sha256"):
        cache_teacher(config(teacher_dir, other_data, out, max_sequences=12))
    other_teacher = tmp_path / "teacher2"
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(other_teacher)
    build_llama(other_teacher, 320, layers=2, hidden=64, seed=99)
    with pytest.raises(CacheError, match="teacher.weights_sha256"):
        cache_teacher(config(other_teacher, corpus_jsonl, out, max_sequences=12))


def test_simulated_crash_states_resume_to_identical_bytes(tmp_path, reference_cache, teacher_dir, corpus_jsonl):
    """Each state a kill can leave behind, made by hand, resumes to the uninterrupted bytes."""
    expected = cache_bytes(reference_cache)
    out = tmp_path / "cache"
    cache_teacher(config(teacher_dir, corpus_jsonl, out))
    manifest = json.loads((out / "manifest.json").read_text())
    shards = manifest["shards"]
    # Killed after shard 3 was renamed but before the manifest listed it, with shard 4 half-written
    # under its temporary name, and nothing after.
    manifest["shards"] = shards[:3]
    manifest["complete"] = False
    manifest["stream"] = {}
    (out / "manifest.json").write_text(json.dumps(manifest))
    for s in shards[4:]:
        (out / s["name"]).unlink()
    tmp = out / SHARD_DIR / f".{Path(shards[4]['name']).name}.tmp-12345"
    tmp.write_bytes(b"PAR1 half a shard")
    (out / ".manifest.json.tmp-12345").write_text("{")
    cache_teacher(config(teacher_dir, corpus_jsonl, out))
    assert cache_bytes(out) == expected
    assert not list(out.rglob("*.tmp-*"))


def test_a_manifest_holding_the_legacy_logprob_dtype_loads_and_resumes(
    tmp_path, reference_cache, teacher_dir, corpus_jsonl
):
    """Earlier versions wrote ``"logprob_dtype": "float16"`` into every manifest and never read it: such a cache
    still loads, and resuming it gives today's bytes (the key gone from the rewritten manifest)."""
    expected = cache_bytes(reference_cache)
    assert "logprob_dtype" not in json.loads(expected["manifest.json"])
    out = tmp_path / "cache"
    shutil.copytree(reference_cache, out)
    manifest = json.loads((out / "manifest.json").read_text())
    for shard in manifest["shards"][3:]:
        (out / shard["name"]).unlink()
    manifest.update(logprob_dtype="float16", shards=manifest["shards"][:3], complete=False, stream={})
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert [s.block for s in load_cache(out, require_complete=False).shards] == [0, 1, 2]
    cache_teacher(config(teacher_dir, corpus_jsonl, out))
    assert cache_bytes(out) == expected


def _count_shards(out: Path) -> int:
    path = out / "manifest.json"
    try:
        return len(json.loads(path.read_text())["shards"])
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


KILL_SEQUENCES = 240  # 40 shards: enough time between shard commits to kill in the middle


@pytest.fixture(scope="module")
def kill_reference(tmp_path_factory, teacher_dir, corpus_jsonl) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("kill_ref") / "cache"
    cache_teacher(config(teacher_dir, corpus_jsonl, out, max_sequences=KILL_SEQUENCES))
    return cache_bytes(out)


@pytest.mark.parametrize("kill_after_shards", [1, 20])
def test_kill_9_and_rerun_gives_identical_bytes(tmp_path, kill_reference, teacher_dir, corpus_jsonl, kill_after_shards):
    out = tmp_path / "cache"
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "cache-teacher",
        "--teacher",
        str(teacher_dir),
        "--data",
        str(corpus_jsonl),
        "--out",
        str(out),
        "--top-k",
        str(K),
        "--seq-len",
        str(SEQ_LEN),
        "--batch-size",
        "4",
        "--shard-tokens",
        str(SEQ_LEN * 6),
        "--row-group-tokens",
        str(SEQ_LEN * 4),
        "--max-sequences",
        str(KILL_SEQUENCES),
        "--no-progress",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600  # a loaded machine takes minutes to import torch and reach the first shard
    while _count_shards(out) < kill_after_shards and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None, f"finished before the kill: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = _count_shards(out)
    assert kill_after_shards <= done < KILL_SEQUENCES // 6
    assert not load_cache(out, require_complete=False).complete
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert cache_bytes(out) == kill_reference


def test_verify_detects_corruption_and_names_the_file(tmp_path, teacher_dir, corpus_jsonl):
    out = tmp_path / "cache"
    cache_teacher(config(teacher_dir, corpus_jsonl, out, max_sequences=12))
    runner = CliRunner()
    ok = runner.invoke(app, ["verify", str(out)])
    assert ok.exit_code == 0 and "OK: 2 shards, 12 sequences" in ok.output
    victim = out / "shards" / "00000001.parquet"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    bad = runner.invoke(app, ["verify", str(out)])
    assert bad.exit_code == 1
    assert "00000001.parquet: sha256 mismatch" in bad.output
    assert verify_cache(out).problems == [f"{victim}: sha256 mismatch (file corrupted or replaced)"]


def test_verify_checks_values_not_just_checksums(tmp_path, teacher_dir, corpus_jsonl):
    """A shard rewritten with unsorted log-probs and a matching manifest checksum is still caught (the
    exact encoding stores any values; the compact one cannot even encode them)."""
    from kd_pipeline.cache.format.encodings import encoding_for
    from kd_pipeline.cache.format.files import sha256_file, write_shard

    out = tmp_path / "cache"
    cache_teacher(config(teacher_dir, corpus_jsonl, out, max_sequences=6, encoding="exact"))
    info, rows = read_all(out)
    rows.topk_logprobs = rows.topk_logprobs[..., ::-1].copy()  # ascending: broken
    path = out / info.shards[0].name
    write_shard(rows, path, info.manifest.row_group_rows, encoding_for(info.manifest))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][0].update(sha256=sha256_file(path), bytes=path.stat().st_size)
    (out / "manifest.json").write_text(json.dumps(manifest))
    problems = verify_cache(out).problems
    assert any("not sorted descending" in p and "00000000.parquet" in p for p in problems)


def test_two_workers_make_the_same_cache(tmp_path, reference_cache, teacher_dir, corpus_jsonl):
    out = tmp_path / "cache"
    for i in (1, 0):
        cache_teacher(config(teacher_dir, corpus_jsonl, out, worker_index=i, num_workers=2))
    with pytest.raises(CacheError):
        cache_teacher(config(teacher_dir, corpus_jsonl, out))  # a single writer over a 2-worker layout
    ref = cache_bytes(reference_cache)
    got = cache_bytes(out)
    assert {k: v for k, v in got.items() if k.startswith("shards/")} == {
        k: v for k, v in ref.items() if k.startswith("shards/")
    }
    info = load_cache(out)
    assert info.complete and info.num_sequences == 40
    assert set(got) == {k for k in ref if k.startswith("shards/")} | {
        "manifest.worker000-of-002.json",
        "manifest.worker001-of-002.json",
    }


def test_incomplete_multi_worker_cache_is_refused(tmp_path, teacher_dir, corpus_jsonl):
    out = tmp_path / "cache"
    cache_teacher(config(teacher_dir, corpus_jsonl, out, worker_index=0, num_workers=2, max_sequences=12))
    with pytest.raises(CacheError, match=r"no manifest from worker\(s\) \[1\]"):
        load_cache(out)


def test_cli_cache_teacher_inspect_and_errors(tmp_path, teacher_dir, corpus_jsonl):
    runner = CliRunner()
    out = tmp_path / "cache"
    args = [
        "cache-teacher",
        "--teacher",
        str(teacher_dir),
        "--data",
        str(corpus_jsonl),
        "--out",
        str(out),
        "--top-k",
        "4",
        "--seq-len",
        "16",
        "--max-tokens",
        "160",
        "--no-progress",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    info = load_cache(out)
    assert info.num_sequences == 10 and info.manifest.k == 4
    shown = runner.invoke(app, ["inspect", str(out), "--show", "3"])
    assert shown.exit_code == 0
    assert "k=4  seq_len=16" in shown.output and "#3" in shown.output and "#4" not in shown.output
    assert "tail mass over" in shown.output
    missing = runner.invoke(app, args[:4] + [str(tmp_path / "nope.jsonl")] + args[5:])
    assert missing.exit_code == 2 and "nope.jsonl" in missing.output
    bad_k = runner.invoke(app, args[:-1] + ["--top-k", "0"])
    assert bad_k.exit_code == 2 and "--top-k" in bad_k.output


@pytest.mark.parametrize("version", [1, 2])
def test_format_v1_and_v2_caches_still_read_verify_and_train(tmp_path, teacher_dir, corpus_jsonl, version):
    """v2 only made the list elements non-nullable and v3 named the encoding: a v1/v2 cache (version in its
    manifest, no encoding entry) decodes to the arrays of a v3 ``exact`` cache, verifies, and feeds the
    reader; resuming it is refused."""
    from kd_pipeline.cache.format.encodings.exact import PARQUET_WRITE_OPTIONS, shard_schema
    from kd_pipeline.cache.format.files import sha256_file
    from kd_pipeline.train.reader import CacheReader

    exact = tmp_path / "exact"
    cache_teacher(config(teacher_dir, corpus_jsonl, exact, max_sequences=12, encoding="exact"))
    info, rows = read_all(exact)
    assert info.manifest.format_version == 3 and info.manifest.encoding == {"name": "exact"}
    old = tmp_path / f"v{version}"
    (old / SHARD_DIR).mkdir(parents=True)
    manifest = json.loads((exact / "manifest.json").read_text())
    manifest["format_version"] = version
    manifest["logprob_dtype"] = "float16"  # what every manifest of those versions held
    del manifest["encoding"]
    for entry in manifest["shards"]:
        table = pq.read_table(exact / entry["name"]).cast(shard_schema(version))
        pq.write_table(table, old / entry["name"], row_group_size=info.manifest.row_group_rows, **PARQUET_WRITE_OPTIONS)
        entry.update(sha256=sha256_file(old / entry["name"]), bytes=(old / entry["name"]).stat().st_size)
    (old / "manifest.json").write_text(json.dumps(manifest))
    shutil.copytree(exact / "tokenizer", old / "tokenizer")
    nullable = pq.read_schema(old / manifest["shards"][0]["name"]).field("topk_ids").type.value_field.nullable
    assert nullable == (version == 1)

    got, got_rows = read_all(old)
    assert got.manifest.format_version == version and got.manifest.encoding == {"name": "exact"}
    for name in ("input_ids", "loss_mask", "topk_ids", "topk_logprobs", "target_logprob"):
        np.testing.assert_array_equal(getattr(got_rows, name), getattr(rows, name))
    assert verify_cache(old).ok
    batch = next(iter(CacheReader(old, batch_size=4, shuffle=False)))
    np.testing.assert_array_equal(batch["topk_ids"].numpy(), rows.topk_ids[:4])
    with pytest.raises(CacheError, match="format_version"):
        cache_teacher(config(teacher_dir, corpus_jsonl, old, max_sequences=12, encoding="exact"))

    manifest["format_version"] = 4
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="reads versions 1, 2, 3"):
        load_cache(old)
