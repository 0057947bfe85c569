"""`--config FILE.yaml`: the config dataclass's fields as keys, flags over the file over the defaults, strict types,
and the OUT/config.yaml a run saves reruns it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from kd_pipeline import pipeline
from kd_pipeline.cache.config import CacheConfig, GenerateConfig
from kd_pipeline.config import CONFIG_FILE, config_values, config_yaml, option, read_config_file
from kd_pipeline.errors import ConfigError
from kd_pipeline.train.capacity import PlanConfig
from kd_pipeline.train.config import DistillConfig

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------- reading
@pytest.mark.parametrize(
    "text, message",
    [
        ("lr: fast\n", "run.yaml: key `lr`: expected a number, got 'fast'"),
        ("batch_size: 8.5\n", "run.yaml: key `batch_size`: expected an integer, got 8.5"),
        ("batch_size: null\n", "run.yaml: key `batch_size`: expected an integer, got None"),
        ("resume: 1\n", "run.yaml: key `resume`: expected true or false, got 1"),
        ("student: 7\n", "run.yaml: key `student`: expected a string, got 7 (quote it to make it a string)"),
        ("loss: fkll\n", "run.yaml: key `loss`: expected one of taid, fkl, rkl, js, sfkl, srkl, tvd, atkd, uld, ce"),
        ("eval_evry: 5\n", "run.yaml: unknown key `eval_evry`; did you mean `eval_every`?"),
        ("top-k: 5\n", "run.yaml: unknown key `top-k`"),
        ("adam_betas: [0.9, 0.99]\n", "run.yaml: unknown key `adam_betas`"),  # not an option: code callers only
        ("- lr\n", "run.yaml: expected a mapping of option names to values, got list"),
        ("lr: [1\n", "run.yaml: line 2: not valid YAML"),
    ],
)
def test_a_wrong_key_or_type_is_refused_naming_the_file_and_the_key(tmp_path, monkeypatch, text, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as error:
        read_config_file(_write(Path("run.yaml"), text), DistillConfig)
    assert str(error.value).startswith(message), str(error.value)


def test_values_come_back_typed_as_their_fields(tmp_path):
    path = _write(
        tmp_path / "c.yaml",
        "teacher: t\ndata: d.jsonl\nout: cache\ntop_k: 8\ngpu_memory_utilization: 1\nvllm_args: [a=1, b=2]\n"
        "min_logprob: -1e-1\n",
    )
    values = read_config_file(path, CacheConfig)
    assert values == {
        "teacher": "t",
        "data": "d.jsonl",
        "out": "cache",  # a str: a cache may be a URL (docs/object-storage.md)
        "top_k": 8,
        "gpu_memory_utilization": 1.0,
        "vllm_args": ["a=1", "b=2"],
        "min_logprob": -0.1,
    }
    assert isinstance(values["gpu_memory_utilization"], float)
    with pytest.raises(ConfigError, match=r"key `vllm_args`\[1\]: expected a string, got 2"):
        read_config_file(_write(tmp_path / "c.yaml", "vllm_args: [a=1, 2]\n"), CacheConfig)
    # One value of a repeatable option is a list of one, as one flag on the command line gives it.
    assert read_config_file(_write(tmp_path / "p.yaml", "candidates: 7B\n"), PlanConfig) == {"candidates": ["7B"]}
    with pytest.raises(ConfigError, match=r"key `candidates`: expected a list, got \{'a': 1\}"):
        read_config_file(_write(tmp_path / "p.yaml", "candidates: {a: 1}\n"), PlanConfig)
    assert read_config_file(_write(tmp_path / "empty.yaml", ""), PlanConfig) == {}
    assert read_config_file(_write(tmp_path / "n.yaml", "min_logprob: null\n"), CacheConfig) == {"min_logprob": None}
    with pytest.raises(ConfigError, match="key `top_k`: expected an integer, got '1e3'"):
        read_config_file(_write(tmp_path / "i.yaml", "top_k: 1e3\n"), CacheConfig)


CONFIGS = [
    CacheConfig(teacher="t", data="d.jsonl", out="c", top_k=5, vllm_args=["x=1"], min_logprob=-9.5),
    DistillConfig(student="s", cache="c", out=Path("o"), loss="taid", taid_alpha=0.01, max_steps=7, lr=3e-3),
    GenerateConfig(prompts="p.jsonl", out=Path("g.jsonl"), student="s", mode="student", top_p=0.9),
    PlanConfig(student="1B", candidates=["a=7B", "b=70B"], json_output=True),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
def test_a_saved_config_reads_back_equal(tmp_path, config):
    path = _write(tmp_path / CONFIG_FILE, config_yaml(config, "cmd"))
    assert type(config)(**read_config_file(path, type(config))) == config
    # every option is written, grouped under its panel's heading
    assert set(yaml.safe_load(path.read_text())) == set(config_values(config))


# -------------------------------------------------------------------------------------- on the command line
@dataclasses.dataclass
class _Example:
    name: str = option(help="A required string.")
    count: int = option(3, "An int with a default.")
    ratio: float = option(0.5, "A float with a default.")
    fast: bool = option(False, "A boolean switch.")
    tags: list[str] = option(help="Repeatable.", flag="--tag", default_factory=list)


def _invoke(args: list[str]):
    seen = []
    result = CliRunner().invoke(pipeline._config_app("example", _Example, seen.append, "Example."), args)
    return result, seen


def test_flags_given_override_the_file_and_the_file_overrides_the_defaults(tmp_path):
    path = _write(tmp_path / "e.yaml", "name: from-file\ncount: 5\nfast: true\ntags: [a, b]\n")
    result, seen = _invoke(["--config", str(path)])
    assert result.exit_code == 0, result.output
    assert seen == [_Example(name="from-file", count=5, ratio=0.5, fast=True, tags=["a", "b"])]
    # flags anywhere on the line, before or after --config; a flag at its default value still wins
    result, seen = _invoke(["--count", "3", "--config", str(path), "--no-fast", "--tag", "c", "--ratio", "2"])
    assert result.exit_code == 0, result.output
    assert seen == [_Example(name="from-file", count=3, ratio=2.0, fast=False, tags=["c"])]


def test_a_bad_file_is_one_line_and_exit_2(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "run.yaml", "student: s\ncache: c\nout: o\nlr: fast\n")
    result = CliRunner().invoke(pipeline.app, ["distill", "--config", "run.yaml"])
    assert result.exit_code == 2
    assert result.output == "error: run.yaml: key `lr`: expected a number, got 'fast'\n"
    missing = CliRunner().invoke(pipeline.app, ["distill", "--config", "nothing.yaml"])
    assert missing.exit_code == 2 and missing.output.startswith("error: nothing.yaml: cannot read the config file")
    assert not (tmp_path / "o").exists()


def test_required_options_may_come_from_the_file_or_are_missing(tmp_path):
    result, seen = _invoke(["--config", str(_write(tmp_path / "e.yaml", "count: 4\n"))])
    assert result.exit_code == 2 and not seen and "--name" in result.output


# ------------------------------------------------------------------------------------------------ examples
def _command_of(example: Path) -> str:
    """The command an example config is for: its name starts with the command's (distill-taid.yaml)."""
    found = [c for c in sorted(pipeline.CONFIG_COMMANDS, key=len, reverse=True) if example.stem.startswith(c)]
    assert found, f"{example.name}: name a config example after its command ({', '.join(pipeline.CONFIG_COMMANDS)})"
    return found[0]


EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))


def test_every_command_with_a_config_has_an_example():
    assert {_command_of(p) for p in EXAMPLE_FILES} == set(pipeline.CONFIG_COMMANDS)


@pytest.mark.parametrize("example", EXAMPLE_FILES, ids=lambda p: p.name)
def test_each_example_is_a_complete_valid_config(example):
    command = _command_of(example)
    config_cls = pipeline.CONFIG_COMMANDS[command][0]()
    config = config_cls(**read_config_file(example, config_cls))  # every required option present
    if isinstance(config, (DistillConfig, GenerateConfig)):
        config.validate()
    if isinstance(config, CacheConfig):
        dataclasses.replace(config, worker_index=0, num_workers=1).validate()
    assert example.read_text().startswith(f"# pipeline {command} --config examples/{example.name}\n")


def test_the_plan_teacher_example_runs():
    example = EXAMPLES / "plan-teacher.yaml"
    result = CliRunner().invoke(pipeline.app, ["plan-teacher", "--config", str(example), "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["recommended"]["name"] == "llama-8b"  # 8x the student is nearer 2.5x than 70x
    assert [c["name"] for c in plan["chain"]] == ["llama-70b", "llama-8b", "1B"]


# ------------------------------------------------------------------------------ a run, and its saved config
def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _deterministic(record: dict) -> dict:
    """A metrics record without wall-clock figures."""
    return {k: v for k, v in record.items() if k not in ("tokens_per_s", "seconds_per_step") and "time" not in k}


def test_a_run_from_its_saved_config_equals_the_run_from_flags(tmp_path, teacher_dir, corpus_jsonl, student_config):
    runner = CliRunner()
    cache = tmp_path / "cache"
    flags = [
        "cache-teacher",
        *("--teacher", str(teacher_dir), "--data", str(corpus_jsonl), "--out", str(cache)),
        *("--top-k", "8", "--seq-len", "32", "--max-sequences", "40", "--shard-tokens", "320", "--no-progress"),
    ]
    result = runner.invoke(pipeline.app, flags)
    assert result.exit_code == 0, result.output
    saved = read_config_file(cache / CONFIG_FILE, CacheConfig)
    assert saved["top_k"] == 8 and saved["max_sequences"] == 40 and saved["worker_index"] is None
    again = tmp_path / "cache-again"
    result = runner.invoke(pipeline.app, ["cache-teacher", "--config", str(cache / CONFIG_FILE), "--out", str(again)])
    assert result.exit_code == 0, result.output
    manifests = [json.loads((c / "manifest.json").read_text()) for c in (cache, again)]
    assert [s["sha256"] for s in manifests[0]["shards"]] == [s["sha256"] for s in manifests[1]["shards"]]

    run = tmp_path / "run"
    flags = [
        "distill",
        *("--student", str(student_config), "--cache", str(cache), "--out", str(run), "--loss", "taid"),
        *("--batch-size", "4", "--max-steps", "6", "--lr", "3e-3", "--eval-every", "3", "--eval-sequences", "8"),
        *("--log-every", "1", "--taid-alpha", "0.01", "--no-progress"),
    ]
    result = runner.invoke(pipeline.app, flags)
    assert result.exit_code == 0, result.output
    rerun = tmp_path / "rerun"
    result = runner.invoke(pipeline.app, ["distill", "--config", str(run / CONFIG_FILE), "--out", str(rerun)])
    assert result.exit_code == 0, result.output

    first, second = (json.loads((r / "distill_config.json").read_text()) for r in (run, rerun))
    assert {**first, "out": None} == {**second, "out": None} and first["loss"] == "taid"
    # the saved file starts a run; --resume on top of it continues one (here: already at --max-steps)
    result = runner.invoke(pipeline.app, ["distill", "--config", str(run / CONFIG_FILE), "--resume"])
    assert result.exit_code == 0, result.output
    assert read_config_file(run / CONFIG_FILE, DistillConfig)["resume"] is False
    assert json.loads((run / "distill_config.json").read_text())["resume"] is True
    one, two = _metrics(run), _metrics(rerun)
    train = [r for r in one if "kl" in r and "eval_kl" not in r]
    assert len(train) == 6 and any("eval_kl" in r for r in one)
    assert [_deterministic(r) for r in one] == [_deterministic(r) for r in two]
