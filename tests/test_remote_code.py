"""Custom model code (auto_map) runs only with --trust-remote-code, in every command, and nothing ever asks on stdin.

The model directory's code records its own import in a marker file, so each test sees whether it ran. The runner
feeds "y" on stdin (as `yes y | pipeline ...` would): an answer to a prompt would run the code.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kd_pipeline.pipeline import app

YES = "y\n" * 50

CONFIG_CODE = """
from pathlib import Path
from transformers import LlamaConfig

Path({marker!r}).open("a").write("config code ran\\n")


class TinyCustomConfig(LlamaConfig):
    model_type = "tiny-custom"
"""

MODEL_CODE = """
from transformers import LlamaForCausalLM

from .configuration_tiny import TinyCustomConfig


class TinyCustomForCausalLM(LlamaForCausalLM):
    config_class = TinyCustomConfig
"""


@pytest.fixture
def custom_model(tmp_path, teacher_dir) -> tuple[Path, Path]:
    """(model dir whose config and model classes are its own code, marker file that code writes on import)."""
    directory, marker = tmp_path / "custom_model", tmp_path / "code_ran.txt"
    shutil.copytree(teacher_dir, directory)
    (directory / "configuration_tiny.py").write_text(CONFIG_CODE.format(marker=str(marker)))
    (directory / "modeling_tiny.py").write_text(MODEL_CODE)
    config = json.loads((directory / "config.json").read_text())
    config.update(
        model_type="tiny-custom",
        architectures=["TinyCustomForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_tiny.TinyCustomConfig",
            "AutoModelForCausalLM": "modeling_tiny.TinyCustomForCausalLM",
        },
    )
    (directory / "config.json").write_text(json.dumps(config))
    return directory, marker


def _invoke(args: list[str]):
    return CliRunner().invoke(app, args, input=YES)


def _refused(result, marker: Path) -> None:
    assert result.exit_code == 2, result.output
    assert "--trust-remote-code" in result.output and "custom code" in result.output
    assert "Traceback" not in result.output and "[y/N]" not in result.output
    assert not marker.exists()  # the directory's code never ran


def _cache_args(teacher: Path, data: Path, out: Path) -> list[str]:
    return [
        "cache-teacher",
        "--teacher",
        str(teacher),
        "--data",
        str(data),
        "--out",
        str(out),
        "--top-k",
        "4",
        "--seq-len",
        "16",
        "--max-sequences",
        "8",
        "--no-progress",
    ]


def test_cache_teacher_refuses_custom_code_without_the_flag_and_runs_it_with(tmp_path, custom_model, corpus_jsonl):
    model, marker = custom_model
    _refused(_invoke(_cache_args(model, corpus_jsonl, tmp_path / "cache")), marker)
    ok = _invoke(_cache_args(model, corpus_jsonl, tmp_path / "cache") + ["--trust-remote-code"])
    assert ok.exit_code == 0, ok.output
    assert marker.exists()


def test_distill_refuses_a_custom_student_without_the_flag_and_trains_it_with(tmp_path, custom_model, small_cache):
    model, marker = custom_model
    args = [
        "distill",
        "--student",
        str(model),
        "--cache",
        str(small_cache),
        "--out",
        str(tmp_path / "run"),
        "--max-steps",
        "1",
        "--eval-sequences",
        "0",
        "--batch-size",
        "4",
        "--no-progress",
    ]
    _refused(_invoke(args), marker)
    shutil.rmtree(tmp_path / "run", ignore_errors=True)
    ok = _invoke(args + ["--trust-remote-code"])
    assert ok.exit_code == 0, ok.output
    assert marker.exists()
    assert json.loads((tmp_path / "run" / "final" / "config.json").read_text())["model_type"] == "tiny-custom"


def test_generate_refuses_custom_code_without_the_flag_and_runs_it_with(tmp_path, custom_model):
    model, marker = custom_model
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "The whale"}) + "\n")
    args = [
        "generate",
        "--prompts",
        str(prompts),
        "--out",
        str(tmp_path / "out.jsonl"),
        "--mode",
        "teacher",
        "--teacher",
        str(model),
        "--max-new-tokens",
        "3",
        "--no-progress",
    ]
    _refused(_invoke(args), marker)
    ok = _invoke(args + ["--trust-remote-code", "--overwrite"])
    assert ok.exit_code == 0, ok.output
    assert marker.exists() and len((tmp_path / "out.jsonl").read_text().splitlines()) == 1


def test_plan_teacher_refuses_custom_code_without_the_flag_and_counts_with(tmp_path, custom_model, teacher_dir):
    from transformers import AutoModelForCausalLM

    model, marker = custom_model
    config_only = tmp_path / "config_only"  # nothing to count but what the code builds
    config_only.mkdir()
    for name in ("config.json", "configuration_tiny.py", "modeling_tiny.py"):
        shutil.copy(model / name, config_only / name)
    args = ["plan-teacher", "--student", str(config_only), "--candidate", "1B", "--json"]
    _refused(_invoke(args), marker)
    ok = _invoke(args + ["--trust-remote-code"])
    assert ok.exit_code == 0, ok.output
    expected = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(teacher_dir).parameters())
    assert marker.exists()
    assert json.loads(ok.output[ok.output.index("{") :])["student"]["params"] == expected


TOKENIZER_CODE = """
from pathlib import Path
from transformers import PreTrainedTokenizerFast

Path({marker!r}).open("a").write("tokenizer code ran\\n")


class TinyCustomTokenizerFast(PreTrainedTokenizerFast):
    pass
"""


def test_inspect_decodes_with_a_custom_tokenizer_only_with_the_flag(tmp_path, tokenizer_dir, small_cache):
    tokenizer, marker = tmp_path / "custom_tokenizer", tmp_path / "code_ran.txt"
    shutil.copytree(tokenizer_dir, tokenizer)
    (tokenizer / "tokenization_tiny.py").write_text(TOKENIZER_CODE.format(marker=str(marker)))
    settings = json.loads((tokenizer / "tokenizer_config.json").read_text())
    settings.update(
        tokenizer_class="TinyCustomTokenizerFast",
        auto_map={"AutoTokenizer": [None, "tokenization_tiny.TinyCustomTokenizerFast"]},
    )
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(settings))
    args = ["inspect", str(small_cache), "--tokenizer", str(tokenizer)]
    shown = _invoke(args)  # the summary still prints, with token ids instead of text
    assert shown.exit_code == 0, shown.output
    assert (
        "contains custom code" in shown.output and "--trust-remote-code" in shown.output and "[y/N]" not in shown.output
    )
    assert "showing token ids" in shown.output and not marker.exists()
    decoded = _invoke(args + ["--trust-remote-code"])
    assert decoded.exit_code == 0, decoded.output
    assert marker.exists() and "showing token ids" not in decoded.output
