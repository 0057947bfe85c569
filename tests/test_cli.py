"""The CLI is generated from the config dataclasses: every `option(...)` field is a flag (in its group's panel) and a
config-file key, and nothing else; `--help` reads at 80 columns and imports no torch."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from kd_pipeline import pipeline
from kd_pipeline.config import Group, cli_fields, flag_of, group_of, option


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
    command = pipeline._config_app("example", _Example, seen.append, "An example command.")
    result = CliRunner().invoke(command, args)
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
    with pytest.raises(ValueError, match="group"):
        option(1, "An option in no known panel.", group="Miscellany")


@pytest.mark.parametrize("name", list(pipeline.CONFIG_COMMANDS))
def test_every_config_field_is_in_help(name):
    config_of, _, _ = pipeline.CONFIG_COMMANDS[name]
    config_cls = config_of()
    result = CliRunner().invoke(pipeline.app, [name, "--help"], terminal_width=400, env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    for f in cli_fields(config_cls):
        assert flag_of(f) in result.output, f"{name}: {flag_of(f)} missing from --help"
        assert f.metadata["help"].split()[0] in result.output


# --------------------------------------------------------------------------------- help as a user reads it
COMMANDS = [*pipeline.CONFIG_COMMANDS, "verify", "inspect", "plot"]
HEAVY = ("torch", "numpy", "pyarrow", "transformers", "datasets")
_HELP_SCRIPT = """
import json, sys
from kd_pipeline.pipeline import main
args, heavy = json.loads(sys.argv[1]), json.loads(sys.argv[2])
sys.argv = ["pipeline", *args]
code = 0
try:
    main()
except SystemExit as e:
    code = e.code
print("\\n@@" + json.dumps({"code": code, "loaded": [m for m in heavy if m in sys.modules]}))
"""


def _help(args: list[str]) -> tuple[str, dict]:
    """`pipeline ARGS` in a fresh interpreter, stdout a pipe (not a terminal), COLUMNS=80: (its output, what it
    imported of HEAVY)."""
    env = {**os.environ, "COLUMNS": "80", "TERM": "dumb"}
    env.pop("TERMINAL_WIDTH", None)
    result = subprocess.run(
        [sys.executable, "-c", _HELP_SCRIPT, json.dumps(args), json.dumps(HEAVY)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    text, _, tail = result.stdout.rpartition("\n@@")
    assert tail, result.stdout + result.stderr
    return text, json.loads(tail)


@pytest.fixture(scope="module")
def helps() -> dict[str, tuple[str, dict]]:
    return {name: _help([name, "--help"]) for name in COMMANDS} | {"": _help(["--help"])}


def _option_names(command: str) -> list[str]:
    click_command = typer.main.get_command(pipeline.app).get_command(None, command)
    return [o for p in click_command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_at_80_columns_outside_a_terminal_keeps_every_option_name_whole(helps, command):
    text, status = helps[command]
    assert status["code"] == 0, text
    too_wide = [line for line in text.splitlines() if len(line) > 80]
    assert not too_wide, too_wide
    names = _option_names(command)
    assert names and "--help" in text
    for name in names:
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text), f"{command}: {name} cut or missing"
    assert "…" not in text


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_imports_no_torch(helps, command):
    text, status = helps[command]
    assert status["code"] == 0, text
    assert status["loaded"] == [], f"`pipeline {command} --help` imported {status['loaded']}"


def test_top_level_help_lists_every_command(helps):
    text, _ = helps[""]
    for command in COMMANDS:
        assert re.search(rf"^\s+{command}\s", text, re.M), command


def _panels(text: str) -> dict[str, str]:
    """--help's sections: {title: body}."""
    found, title = {}, None
    for line in text.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            title = line[:-1]
            found[title] = ""
        elif title is not None:
            found[title] += line + "\n"
    return found


@pytest.mark.parametrize("command", list(pipeline.CONFIG_COMMANDS))
def test_options_sit_in_their_fields_panels(helps, command):
    panels = _panels(helps[command][0])
    config_cls = pipeline.CONFIG_COMMANDS[command][0]()
    for f in cli_fields(config_cls):
        flag = rf"^  {re.escape(flag_of(f))}[ \n]"
        holding = [title for title, body in panels.items() if re.search(flag, body, re.M)]
        assert holding == [group_of(f)], f"{command}: {flag_of(f)} in {holding}, declared in {group_of(f)}"


def test_the_vllm_only_options_have_their_own_panel(helps):
    from kd_pipeline.cache.config import CacheConfig, VLLMOptions

    panels = _panels(helps["cache-teacher"][0])
    vllm = {f.name for f in dataclasses.fields(VLLMOptions)}
    assert len(vllm) == 7
    assert {f.name for f in cli_fields(CacheConfig) if group_of(f) == Group.VLLM} == vllm
    assert set(re.findall(r"^  (--[\w-]+)", panels[Group.VLLM], re.M)) == {
        flag_of(f) for f in dataclasses.fields(VLLMOptions)
    }


def test_loss_lists_its_choices_and_flags_show_no_metavar(helps):
    from kd_pipeline.train.losses import LOSS_NAMES

    text = helps["distill"][0]
    assert f"--loss <{'|'.join(LOSS_NAMES)}>" in text
    assert re.search(r"^  --resume / --no-resume\s", text, re.M)
    assert "<bool>" not in text and "<bool>" not in helps["cache-teacher"][0]
    result = CliRunner().invoke(
        pipeline.app, ["distill", "--student", "s", "--cache", "c", "--out", "o", "--loss", "fkll"]
    )
    assert result.exit_code == 2 and "fkll" in result.output
