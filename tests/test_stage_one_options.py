"""cache-teacher's rules shared by both backends (launcher workers, context length) and the vLLM
backend's option handling and start-failure report, without vLLM."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kd_pipeline.cache.backends.vllm import _OutputTee, explain_start_failure, parse_vllm_args
from kd_pipeline.cache.build import CacheConfig, launcher_worker, with_workers
from kd_pipeline.pipeline import app


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, None),
        ({"SLURM_PROCID": "3", "SLURM_NTASKS": "8"}, (3, 8, "SLURM_PROCID/SLURM_NTASKS")),
        ({"RANK": "1", "WORLD_SIZE": "2"}, (1, 2, "RANK/WORLD_SIZE")),
        # srun torchrun: torchrun's variables name the process, SLURM's the node's task.
        ({"RANK": "5", "WORLD_SIZE": "16", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, (5, 16, "RANK/WORLD_SIZE")),
        ({"SLURM_PROCID": "3"}, None),  # an index without a count is no layout
    ],
)
def test_launcher_environment_mapping(env, expected):
    assert launcher_worker(env) == expected


def test_explicit_workers_win_and_defaults_apply():
    base = CacheConfig(teacher="t", data="d", out=Path("o"))
    env = {"SLURM_PROCID": "2", "SLURM_NTASKS": "4"}
    got = with_workers(base, env)
    assert (got.worker_index, got.num_workers) == (2, 4)
    got = with_workers(CacheConfig(teacher="t", data="d", out=Path("o"), worker_index=0, num_workers=1), env)
    assert (got.worker_index, got.num_workers) == (0, 1)
    got = with_workers(base, {})
    assert (got.worker_index, got.num_workers) == (0, 1)
    with pytest.raises(ValueError, match="RANK='x'"):
        launcher_worker({"RANK": "x", "WORLD_SIZE": "2"})


def test_srun_layout_writes_the_workers_manifests(tmp_path, teacher_dir, corpus_jsonl, monkeypatch):
    """Two processes as srun starts them (SLURM_PROCID 0 and 1 of 2) write one two-worker cache."""
    out = tmp_path / "cache"
    for rank in ("0", "1"):
        monkeypatch.setenv("SLURM_PROCID", rank)
        monkeypatch.setenv("SLURM_NTASKS", "2")
        result = CliRunner().invoke(
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
                "4",
                "--seq-len",
                "16",
                "--shard-tokens",
                "32",
                "--max-sequences",
                "8",
                "--no-progress",
                "--backend",
                "hf",
            ],
        )
        assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.glob("manifest*.json"))
    assert names == ["manifest.worker000-of-002.json", "manifest.worker001-of-002.json"]
    shards = {
        json.loads((out / n).read_text())["worker_index"]: json.loads((out / n).read_text())["shards"] for n in names
    }
    assert [s["block"] for s in shards[0]] == [0, 2] and [s["block"] for s in shards[1]] == [1, 3]


def test_seq_len_beyond_context_is_refused_before_loading(tmp_path, teacher_dir, corpus_jsonl):
    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_dir, teacher)
    config = json.loads((teacher / "config.json").read_text())
    config["max_position_embeddings"] = 16
    (teacher / "config.json").write_text(json.dumps(config))
    args = [
        "cache-teacher",
        "--teacher",
        str(teacher),
        "--data",
        str(corpus_jsonl),
        "--top-k",
        "4",
        "--max-sequences",
        "4",
        "--no-progress",
        "--backend",
        "hf",
    ]
    refused = CliRunner().invoke(app, args + ["--out", str(tmp_path / "a"), "--seq-len", "17"])
    assert refused.exit_code == 2
    assert refused.output.strip().splitlines()[-1] == (
        f"error: --seq-len 17 is longer than the context of teacher {teacher} (max_position_embeddings = 16): "
        "use --seq-len 16 or less"
    )
    assert not list((tmp_path / "a").glob("manifest*.json")) and not (tmp_path / "a" / "shards").exists()
    exact = CliRunner().invoke(app, args + ["--out", str(tmp_path / "b"), "--seq-len", "16"])
    assert exact.exit_code == 0, exact.output


def test_rope_scaling_stretches_the_context():
    from transformers import LlamaConfig

    from kd_pipeline.cache.backends import context_length

    assert context_length(LlamaConfig(max_position_embeddings=4096)) == (4096, "max_position_embeddings = 4096")
    linear = LlamaConfig(max_position_embeddings=4096, rope_scaling={"rope_type": "linear", "factor": 4.0})
    assert context_length(linear) == (16384, "max_position_embeddings = 4096 x rope factor 4.0")
    # YaRN configs already count the factor in max_position_embeddings (as vLLM 0.32 reads them).
    yarn = LlamaConfig(max_position_embeddings=4096, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    assert context_length(yarn)[0] == 4096


def test_vllm_args_parse_as_json_and_refuse_our_own():
    assert parse_vllm_args(["kv_cache_dtype=fp8", "swap-space=2", 'hf_overrides={"a": 1}', "x=true"]) == {
        "kv_cache_dtype": "fp8",
        "swap_space": 2,
        "hf_overrides": {"a": 1},
        "x": True,
    }
    with pytest.raises(ValueError, match="use --seq-len"):
        parse_vllm_args(["max_model_len=4096"])
    with pytest.raises(ValueError, match="only right with its value"):
        parse_vllm_args(["enable_prefix_caching=true"])
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        parse_vllm_args(["no-equals-sign"])


def test_start_failure_names_the_engine_root_cause_and_the_option():
    log = [
        "(EngineCore_DP0 pid=4242) Traceback (most recent call last):",
        '(EngineCore_DP0 pid=4242)   File "vllm/v1/worker/cpu_worker.py", line 80, in init_device',
        "(EngineCore_DP0 pid=4242) ValueError: Available memory on node 0 (11.5 GiB) is less than desired CPU "
        "memory utilization (0.9, 21.6 GiB)",
        "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}",
    ]
    error = RuntimeError("Engine core initialization failed. See root cause above. Failed core proc(s): {}")
    message = explain_start_failure(error, log, 0.9)
    assert message.splitlines() == [
        "the vLLM engine did not start: ValueError: Available memory on node 0 (11.5 GiB) is less than desired "
        "CPU memory utilization (0.9, 21.6 GiB)",
        "  what to change: change --gpu-memory-utilization (now 0.9) (on CPU the share of the node's RAM that "
        "vLLM reserves; VLLM_CPU_KVCACHE_SPACE=GiB sets its KV cache directly), or lower --max-num-seqs, "
        "--max-num-batched-tokens or --seq-len",
    ]


def test_output_tee_keeps_what_child_processes_print(capfd):
    code = "import sys; print('engine log line'); sys.stdout.flush(); print('ValueError: boom', file=sys.stderr)"
    tee = _OutputTee()
    with tee:
        subprocess.run([sys.executable, "-c", code], check=True)
    assert sorted(tee.recent()[-2:]) == ["ValueError: boom", "engine log line"]
    shown = capfd.readouterr()
    assert "engine log line" in shown.out and "ValueError: boom" in shown.err  # still shown to the user
