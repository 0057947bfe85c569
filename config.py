"""One declaration per config field: its default, its `--help` text and its help panel live on the stage's config
dataclass.

The CLI (`pipeline.py`) generates each command's options from these fields, and a config file (``--config
FILE.yaml``, :mod:`kd_pipeline.config_file`) takes the same fields as keys, so a new option is a new field here and
nothing else. A field declared with a plain default (no `option(...)`) is configuration for code callers only and
gets no CLI option and no config-file key.

This module and the config dataclasses' modules (cache/config.py, train/config.py, train/losses/options.py,
train/capacity.py) import no torch: ``pipeline --help`` reads them.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kd_pipeline.errors import ConfigError

HELP = "help"
FLAG = "flag"
GROUP = "group"
CHOICES = "choices"
CONFIG_FILE = "config.yaml"  # the resolved config a run saves in its output directory


class Group:
    """The help panels of the commands' options, in the order `--help` shows them."""

    DATA = "Data"
    TEACHER = "Teacher"
    STUDENT = "Student"
    LORA = "LoRA"
    VLLM = "vLLM engine"
    GENERATION = "Generation"
    STORAGE = "Storage"
    LOSS = "Loss"
    OPTIMIZER = "Optimizer and schedule"
    EVAL = "Eval"
    CHECKPOINTS = "Checkpoints"
    PARALLEL = "Parallel"
    LOGGING = "Logging"
    OPTIONS = "Options"  # --config, --help, and what fits no group below

    ORDER = (OPTIONS, DATA, TEACHER, STUDENT, LORA, VLLM, GENERATION, STORAGE, LOSS, OPTIMIZER, EVAL, CHECKPOINTS)
    ORDER += (PARALLEL, LOGGING)


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    group: str = Group.OPTIONS,
    flag: str | None = None,
    choices: tuple[str, ...] | None = None,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
) -> Any:
    """A config field exposed as `--field-name` (or `flag`), with `help` as its --help text, shown in the panel
    `group` (one of :class:`Group`). `choices`: the only values a string field takes (listed by --help, checked
    for flags and config files alike).

    Leave `default` out for a required option.
    """
    if not help:
        raise ValueError("every CLI option needs its help text")
    if group not in Group.ORDER:
        raise ValueError(f"unknown option group {group!r}; the groups are {', '.join(Group.ORDER)}")
    metadata = {HELP: help, FLAG: flag, GROUP: group, CHOICES: tuple(choices) if choices else None}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def cli_fields(config_cls: type) -> list[dataclasses.Field]:
    """The fields of `config_cls` that are CLI options (and config-file keys), in declaration order."""
    return [f for f in dataclasses.fields(config_cls) if f.init and HELP in f.metadata]


def flag_of(f: dataclasses.Field) -> str:
    """The command-line spelling of a field: `--top-k` for `top_k` unless the field names its own."""
    return f.metadata.get(FLAG) or "--" + f.name.replace("_", "-")


def group_of(f: dataclasses.Field) -> str:
    return f.metadata.get(GROUP) or Group.OPTIONS


def choices_of(f: dataclasses.Field) -> tuple[str, ...] | None:
    return f.metadata.get(CHOICES)


def is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


# ------------------------------------------------------------------------------------------- config files
# `--config FILE.yaml`: the file's keys are the option fields' names (`top_k`, as in the dataclass), its values
# YAML scalars or lists. Read strictly: a wrong key or type is refused with the file and the key, never guessed.


_EXPONENT_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _type_name(tp: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false", Path: "a path"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _check_value(where: str, f: dataclasses.Field, tp: Any, value: Any) -> Any:
    """``value`` (as YAML gave it) for field ``f`` of type ``tp``, as the field holds it."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in args if a is not type(None)]
        if value is None and len(inner) < len(args):
            return None
        tp = inner[0] if len(inner) == 1 else tp
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            value = [value]  # one value of a repeatable option, as one flag gives it on the command line
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_check_value(f"{where}[{i}]", f, args[0], v) for i, v in enumerate(value)]
    if tp is float and isinstance(value, str) and _EXPONENT_FLOAT.match(value):
        value = float(value)  # `1e-4`: YAML 1.1 (PyYAML) reads an exponent without a dot as a string
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        Path: lambda v: isinstance(v, str),
    }.get(tp)
    if ok is None:
        raise TypeError(f"option {f.name}: type {tp} cannot be read from a config file")
    if not ok(value):
        hint = " (quote it to make it a string)" if tp in (str, Path) and value is not None else ""
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}{hint}")
    choices = choices_of(f)
    if choices and value not in choices:
        raise ConfigError(f"{where}: expected one of {', '.join(choices)}, got {value!r}")
    return float(value) if tp is float else Path(value) if tp is Path else value


def read_config_file(path: Path, config_cls: type) -> dict[str, Any]:
    """The options a YAML file sets for ``config_cls``, checked against their fields' types: ``{field name: value}``,
    ready for ``config_cls(**values)``. Raises ConfigError naming the file and the key."""
    import yaml  # only a run with --config pays for it

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror or e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}:{at}: not valid YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option names to values, got {type(data).__name__}")
    fields = {f.name: f for f in cli_fields(config_cls)}
    hints = typing.get_type_hints(config_cls)
    values = {}
    for key, value in data.items():
        f = fields.get(key) if isinstance(key, str) else None
        if f is None:
            near = difflib.get_close_matches(str(key).replace("-", "_").lstrip("_"), list(fields), n=1)
            hint = f"; did you mean `{near[0]}`?" if near else ""
            raise ConfigError(f"{path}: unknown key `{key}`{hint} (the keys are the options' names, as `top_k`)")
        values[key] = _check_value(f"{path}: key `{key}`", f, hints[key], value)
    return values


def config_values(config: Any) -> dict[str, Any]:
    """The option fields of a config instance as YAML-ready values (paths as strings, tuples as lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return {f.name: plain(getattr(config, f.name)) for f in cli_fields(type(config))}


def config_yaml(config: Any, command: str) -> str:
    """``config`` as the YAML a ``--config`` file holds: every option field, grouped as ``--help`` shows them."""
    import yaml

    values = config_values(config)
    by_group: dict[str, list[str]] = {}
    for f in cli_fields(type(config)):
        by_group.setdefault(group_of(f), []).append(f.name)
    lines = [f"# pipeline {command} --config THIS_FILE (flags given on the command line override these values)"]
    for group in Group.ORDER:
        if group in by_group:
            lines.append(f"\n# {group}")
            for name in by_group[group]:
                dumped = yaml.safe_dump({name: values[name]}, allow_unicode=True, sort_keys=False, width=1000)
                lines.append(dumped.rstrip("\n"))
    return "\n".join(lines) + "\n"


def save_config(config: Any, path: Path, command: str) -> None:
    """Write ``config`` to ``path`` as a ``--config`` file (atomically: a crash leaves the old file or the new)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(config_yaml(config, command), encoding="utf-8")
    os.replace(tmp, path)
