"""The teacher-assistant chain with the ordinary commands: teacher → cache → assistant → cache → student,
each manifest and each final/ model recording where it came from."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from kd_pipeline.cache.format.manifest import LINEAGE_FILE, load_cache
from kd_pipeline.pipeline import app


def config_dir(root: Path, hidden: int, layers: int) -> Path:
    from transformers import LlamaConfig

    LlamaConfig(
        vocab_size=320,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    ).save_pretrained(root)
    return root


def invoke(*args: str) -> None:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output


def test_teacher_assistant_chain_records_lineage(tmp_path, teacher_dir, corpus_jsonl):
    cache_opts = [
        "--data",
        corpus_jsonl,
        "--top-k",
        "8",
        "--seq-len",
        "32",
        "--max-sequences",
        "24",
        "--shard-tokens",
        "192",
        "--row-group-tokens",
        "128",
        "--no-progress",
    ]
    distill_opts = [
        "--max-steps",
        "5",
        "--batch-size",
        "4",
        "--eval-sequences",
        "4",
        "--eval-every",
        "5",
        "--save-every",
        "5",
        "--log-every",
        "5",
        "--no-progress",
    ]
    cache1, cache2 = tmp_path / "cache-teacher", tmp_path / "cache-assistant"
    assistant_run, student_run = tmp_path / "assistant", tmp_path / "student"

    assistant_config = config_dir(tmp_path / "assistant-config", 48, 2)
    student_config = config_dir(tmp_path / "student-config", 32, 1)

    # The recipe of docs/stage-one.md: every hop is cache-teacher with the bigger model, distill the smaller one.
    invoke("cache-teacher", "--teacher", teacher_dir, "--out", cache1, *cache_opts)
    invoke("distill", "--student", assistant_config, "--cache", cache1, "--out", assistant_run, *distill_opts)
    invoke("cache-teacher", "--teacher", assistant_run / "final", "--out", cache2, *cache_opts)
    invoke("distill", "--student", student_config, "--cache", cache2, "--out", student_run, *distill_opts)

    first, second = load_cache(cache1), load_cache(cache2)
    assert first.manifest.lineage == {}  # an ordinary teacher has no lineage
    assistant = json.loads((assistant_run / "final" / LINEAGE_FILE).read_text())
    assert second.manifest.lineage == assistant
    assert assistant["cache_fingerprint"] == first.fingerprint()
    assert assistant["cache"] == str(cache1.resolve()) and assistant["run_dir"] == str(assistant_run.resolve())
    assert assistant["cache_teacher"]["name_or_path"] == str(teacher_dir)
    assert (assistant["loss"], assistant["steps"], assistant["cache_lineage"]) == ("fkl", 5, {})
    assert second.manifest.teacher["name_or_path"] == str(assistant_run / "final")
    assert second.manifest.identity()["tokenizer"] == first.manifest.identity()["tokenizer"]

    student = json.loads((student_run / "final" / LINEAGE_FILE).read_text())
    assert student["cache_fingerprint"] == second.fingerprint()
    assert student["cache_lineage"]["cache_fingerprint"] == first.fingerprint()  # the whole chain, back to the teacher
