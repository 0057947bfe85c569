"""The CLI is generated from the config dataclasses: every `option(...)` field is a flag, and nothing else."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from click.testing import CliRunner as ClickRunner
from typer.testing import CliRunner

from kd_pipeline import pipeline
from kd_pipeline.config import cli_fields, flag_of, option


@dataclasses.dataclass
class _Example:
    name: str = option(help="A required string.")
    out: Path = option(help="A path.")
    count: int = option(3, "An int with a default.")
    limit: int | None = option(None, "An optional int.")
    fast: bool = option(False, "A boolean switch.")
    json_output: bool = option(False, "A custom flag.", flag="--json")
    internal: tuple[int, int] = (1, 2)  # no option(...): configuration for code callers only


def _invoke(args: list[str]):
    seen = []
    command = pipeline._config_command("example", _Example, seen.append, "An example command.")
    result = ClickRunner().invoke(command, args)
    return result, seen


def test_options_reach_the_config_with_their_types():
    result, seen = _invoke(["--name", "x", "--out", "/tmp/o", "--count", "5", "--limit", "7", "--fast", "--json"])
    assert result.exit_code == 0, result.output
    assert seen == [_Example(name="x", out=Path("/tmp/o"), count=5, limit=7, fast=True, json_output=True)]


def test_defaults_come_from_the_dataclass():
    result, seen = _invoke(["--name", "x", "--out", "o"])
    assert result.exit_code == 0, result.output
    assert seen == [_Example(name="x", out=Path("o"))]
    assert seen[0].limit is None and seen[0].internal == (1, 2)


def test_required_option_missing_is_a_usage_error():
    result, seen = _invoke(["--out", "o"])
    assert result.exit_code == 2 and not seen
    assert "--name" in result.output


def test_fields_without_help_are_not_options():
    result, _ = _invoke(["--name", "x", "--out", "o", "--internal", "1", "2"])
    assert result.exit_code == 2
    with pytest.raises(ValueError, match="help"):
        option(1)


@pytest.mark.parametrize("name", list(pipeline.CONFIG_COMMANDS))
def test_every_config_field_is_in_help(name):
    config_of, _, _ = pipeline.CONFIG_COMMANDS[name]
    config_cls = config_of()
    result = CliRunner().invoke(pipeline.app, [name, "--help"], terminal_width=400, env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    for f in cli_fields(config_cls):
        assert flag_of(f) in result.output, f"{name}: {flag_of(f)} missing from --help"
        assert f.metadata["help"].split()[0] in result.output
