"""One declaration per config field: its default and its `--help` text live on the stage's config dataclass.

The CLI (`pipeline.py`) generates each command's options from these fields, so a new option is a new field here
and nothing else. A field declared with a plain default (no `option(...)`) is configuration for code callers only
and gets no CLI option.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

HELP = "help"
FLAG = "flag"


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    flag: str | None = None,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
) -> Any:
    """A config field exposed as `--field-name` (or `flag`), with `help` as its --help text.

    Leave `default` out for a required option.
    """
    if not help:
        raise ValueError("every CLI option needs its help text")
    metadata = {HELP: help, FLAG: flag}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def cli_fields(config_cls: type) -> list[dataclasses.Field]:
    """The fields of `config_cls` that are CLI options, in declaration order."""
    return [f for f in dataclasses.fields(config_cls) if f.init and HELP in f.metadata]


def flag_of(f: dataclasses.Field) -> str:
    """The command-line spelling of a field: `--top-k` for `top_k` unless the field names its own."""
    return f.metadata.get(FLAG) or "--" + f.name.replace("_", "-")
