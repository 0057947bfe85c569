"""The vLLM backend against the real vLLM engine (its CPU build in CI: `.venv-vllm`, see README).

Skipped where vllm is not importable. Every engine start costs tens of seconds on 2 cores, so the caches
are built once per module and shared; all runs pass --enforce-eager (no torch.compile) except the one
plain command, which shows the defaults work on a CPU machine with no environment variables set.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (see README: the .venv-vllm command)")

from kd_pipeline.cache.format.encodings import encoding_for  # noqa: E402
from kd_pipeline.cache.format.layout import SHARD_DIR  # noqa: E402
from kd_pipeline.cache.format.manifest import load_cache  # noqa: E402
from kd_pipeline.cache.format.verify import verify_cache  # noqa: E402

pytestmark = pytest.mark.vllm

K, SEQ_LEN = 8, 32
SEQUENCES = 120
ROWS_PER_SHARD = 8  # 15 shards, one generate() call each: a kill lands between commits


def _repo() -> Path:
    return Path(__file__).resolve().parents[1]


def _gpu_check():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", _repo() / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def short_context_teacher(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny Llama with heads of 32 (vLLM's CPU attention has no kernel for the 16 of conftest's teacher)
    and its context set to SEQ_LEN, so every run below also shows that --seq-len equal to the model's
    context works."""
    from conftest import build_llama
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("teacher_ctx") / "teacher"
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.save_pretrained(d)
    build_llama(d, len(tok), layers=2, hidden=128, seed=1)
    config = json.loads((d / "config.json").read_text())
    config["max_position_embeddings"] = SEQ_LEN
    (d / "config.json").write_text(json.dumps(config, indent=2))
    return d


def command(teacher: Path, data: Path, out: Path, backend: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipeline",
        "cache-teacher",
        "--teacher",
        str(teacher),
        "--data",
        str(data),
        "--out",
        str(out),
        "--top-k",
        str(K),
        "--seq-len",
        str(SEQ_LEN),
        "--backend",
        backend,
        "--shard-tokens",
        str(SEQ_LEN * ROWS_PER_SHARD),
        "--row-group-tokens",
        str(SEQ_LEN * ROWS_PER_SHARD),
        "--max-sequences",
        str(SEQUENCES),
        "--no-progress",
        *extra,
    ]


def run(cmd: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}  # "no environment variables set"
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=_repo(), env=env)


def cache_bytes(cache_dir: Path) -> dict[str, bytes]:
    files = sorted((cache_dir / SHARD_DIR).glob("*.parquet")) + sorted(cache_dir.glob("manifest*.json"))
    return {f.relative_to(cache_dir).as_posix(): f.read_bytes() for f in files}


def read_rows(cache_dir: Path):
    return _gpu_check().read_cache(cache_dir)[1]


@pytest.fixture(scope="module")
def vllm_plain(tmp_path_factory, short_context_teacher, corpus_jsonl) -> tuple[Path, subprocess.CompletedProcess]:
    """The plain command: only the options every cache needs, vLLM's defaults (torch.compile included)."""
    out = tmp_path_factory.mktemp("vllm_plain") / "cache"
    plain = [arg for arg in command(short_context_teacher, corpus_jsonl, out, "vllm") if arg != "--no-progress"]
    done = run(plain)
    assert done.returncode == 0, done.stderr[-4000:]
    return out, done


@pytest.fixture(scope="module")
def vllm_eager(tmp_path_factory, short_context_teacher, corpus_jsonl) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("vllm_eager") / "cache"
    done = run(command(short_context_teacher, corpus_jsonl, out, "vllm", "--enforce-eager"))
    assert done.returncode == 0, done.stderr[-4000:]
    return out, done


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory, short_context_teacher, corpus_jsonl) -> Path:
    out = tmp_path_factory.mktemp("hf") / "cache"
    done = run(command(short_context_teacher, corpus_jsonl, out, "hf", "--batch-size", "8"))
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def test_plain_command_works_and_reports_load_apart(vllm_plain):
    out, done = vllm_plain
    manifest = load_cache(out).manifest
    assert manifest.complete and manifest.teacher["backend"] == "vllm"
    assert manifest.teacher["dtype"] == "float32"  # the one dtype rule: auto is float32 on CPU
    backend = manifest.backend
    assert backend["name"] == "vllm" and backend["version"].startswith("0.")
    assert backend["enforce_eager"] is False and backend["gpu_memory_utilization"] == "auto"
    assert "vLLM: gpu_memory_utilization 0." in done.stderr
    assert "loading teacher" in done.stderr and "teacher ready in" in done.stderr
    assert "teacher load" in done.stderr and "of teacher time" in done.stderr
    # The engine is shut down by us, not force-killed at interpreter exit.
    log = done.stdout + done.stderr  # vLLM logs to stdout
    assert "force killing" not in log.lower(), log[-3000:]
    assert verify_cache(out).ok


def test_vllm_matches_hf(vllm_eager, hf_cache):
    """The issue's parity at float32 (|Δ log-prob| <= 0.01 on shared ids), read through each cache's
    encoding: each stored value is within the encoding's error bound of its backend's number."""
    a, b = read_rows(hf_cache), read_rows(vllm_eager[0])
    np.testing.assert_array_equal(a.seq_ids, b.seq_ids)
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    np.testing.assert_array_equal(a.loss_mask, b.loss_mask)
    parity = _gpu_check().compare(
        a.topk_ids, a.topk_logprobs, a.target_logprob, b.topk_ids, b.topk_logprobs, b.target_logprob
    )
    assert parity["positions"] == SEQUENCES * (SEQ_LEN - 1)
    assert parity["top1_agreement"] >= 0.999, parity
    assert parity["topk_overlap"] >= 0.999, parity
    stored = [encoding_for(load_cache(out).manifest).error_bound() for out in (hf_cache, vllm_eager[0])]
    assert parity["logprob_abs_diff_max"] <= 0.01 + sum(stored), parity
    assert parity["logprob_abs_diff_mean"] <= 1e-3, parity
    assert verify_cache(vllm_eager[0]).ok and verify_cache(hf_cache).ok


def _count_shards(out: Path) -> int:
    try:
        return len(json.loads((out / "manifest.json").read_text())["shards"])
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def test_kill_9_then_rerun_gives_identical_bytes(tmp_path, vllm_eager, short_context_teacher, corpus_jsonl):
    """Also two runs byte-identical: the shards the killed run committed equal the uninterrupted run's."""
    out = tmp_path / "cache"
    cmd = command(short_context_teacher, corpus_jsonl, out, "vllm", "--enforce-eager")
    # Its own session, so the kill reaches the engine's processes too, as a crashed node would. Its output
    # goes to a file: an unread pipe could fill and stall it. The deadline covers engine starts of up to
    # ~8 min seen on 2 loaded cores.
    log_path = tmp_path / "killed_run.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=_repo(), start_new_session=True)
        deadline = time.time() + 1200
        while _count_shards(out) < 2 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        finished = proc.poll() is not None
        if not finished:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert not finished, f"finished before the kill: {log_path.read_text()[-3000:]}"
    done = _count_shards(out)
    assert 2 <= done < SEQUENCES // ROWS_PER_SHARD, f"{done} shards at the kill: {log_path.read_text()[-3000:]}"
    assert not load_cache(out, require_complete=False).complete
    reference = cache_bytes(vllm_eager[0])
    before = {name: data for name, data in cache_bytes(out).items() if name.startswith(SHARD_DIR)}
    assert len(before) >= 2 and all(reference[name] == data for name, data in before.items())
    rerun = run(cmd)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert cache_bytes(out) == reference


def test_resuming_a_vllm_cache_with_hf_is_refused(tmp_path, vllm_eager, short_context_teacher, corpus_jsonl):
    out = tmp_path / "cache"
    shutil.copytree(vllm_eager[0], out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["complete"] = False
    manifest["shards"] = manifest["shards"][:2]
    (out / "manifest.json").write_text(json.dumps(manifest))
    for shard in sorted((out / SHARD_DIR).glob("*.parquet"))[2:]:
        shard.unlink()
    done = run(command(short_context_teacher, corpus_jsonl, out, "hf"))
    assert done.returncode == 2
    assert "refusing to resume" in done.stderr and "teacher.backend: 'vllm' != 'hf'" in done.stderr
    assert "Traceback" not in done.stderr


def test_engine_that_cannot_start_gives_root_cause_and_option(tmp_path, short_context_teacher, corpus_jsonl):
    # On CPU, vLLM refuses to reserve more RAM than is free: ask for all of it.
    done = run(
        command(
            short_context_teacher,
            corpus_jsonl,
            tmp_path / "c",
            "vllm",
            "--enforce-eager",
            "--gpu-memory-utilization",
            "1.0",
        )
    )
    assert done.returncode == 2, done.stderr[-3000:]
    last = [line for line in done.stderr.splitlines() if line.strip()][-2:]
    assert last[0].startswith("error: the vLLM engine did not start: "), done.stderr[-3000:]
    assert "memory" in last[0].lower()
    assert "--gpu-memory-utilization (now 1.0)" in last[1]
    assert "Traceback" not in "\n".join(done.stderr.splitlines()[-5:])


@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_seq_len_beyond_the_context_is_refused_the_same_way(tmp_path, short_context_teacher, corpus_jsonl, backend):
    cmd = command(short_context_teacher, corpus_jsonl, tmp_path / "c", backend)
    cmd[cmd.index("--seq-len") + 1] = str(SEQ_LEN + 1)
    done = run(cmd)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: --seq-len {SEQ_LEN + 1} is longer than the context of teacher {short_context_teacher} "
        f"(max_position_embeddings = {SEQ_LEN}): use --seq-len {SEQ_LEN} or less"
    )


def test_kept_engine_arrays_equal_vllms_own_lists(short_context_teacher):
    """In this process, on the real engine: VLLMTeacher.score keeps the engine's prompt-logprob tensors
    (no FlatLogprobs lists), and they convert to exactly what vLLM's own FlatLogprobs convert to."""
    from vllm.inputs import TokensPrompt
    from vllm.v1.engine.logprobs import LogprobsProcessor

    from kd_pipeline.cache.backends.vllm import (
        PromptLogprobArrays,
        VLLMTeacher,
        keep_prompt_logprob_arrays,
        prompt_logprobs_to_scores,
    )

    vocab = json.loads((short_context_teacher / "config.json").read_text())["vocab_size"]
    ids = np.random.default_rng(0).integers(0, vocab, size=(4, SEQ_LEN))
    prompts = [TokensPrompt(prompt_token_ids=row.tolist()) for row in ids]
    original = LogprobsProcessor._update_prompt_logprobs
    with VLLMTeacher(str(short_context_teacher), k=K, seq_len=SEQ_LEN, dtype="float32", enforce_eager=True) as teacher:
        scored = teacher.score(ids)
        lists = teacher.llm.generate(prompts, teacher.sampling_params, use_tqdm=False)
        with keep_prompt_logprob_arrays(LogprobsProcessor, K):
            arrays = teacher.llm.generate(prompts, teacher.sampling_params, use_tqdm=False)
    assert LogprobsProcessor._update_prompt_logprobs is original
    assert all(type(out.prompt_logprobs).__name__ == "FlatLogprobs" for out in lists)
    assert all(isinstance(out.prompt_logprobs, PromptLogprobArrays) for out in arrays)
    from_lists = prompt_logprobs_to_scores([out.prompt_logprobs for out in lists], ids, K)
    from_arrays = prompt_logprobs_to_scores([out.prompt_logprobs for out in arrays], ids, K)
    for got in (from_arrays, scored):
        np.testing.assert_array_equal(got.topk_ids, from_lists.topk_ids)
        np.testing.assert_array_equal(got.topk_logprobs, from_lists.topk_logprobs)
        np.testing.assert_array_equal(got.target_logprob, from_lists.target_logprob)
