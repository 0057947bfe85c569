"""`pipeline`: the command line. It only turns options into config dataclasses and calls the stages."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import inspect
import textwrap
import typing
from collections.abc import Callable
from pathlib import Path
from typing import get_type_hints

import typer
from typer.core import TyperCommand, TyperGroup


class _Commands(TyperGroup):
    """The hand-written commands plus CONFIG_COMMANDS (below), built on demand."""

    def list_commands(self, ctx) -> list[str]:
        return [*CONFIG_COMMANDS, *super().list_commands(ctx)]

    def get_command(self, ctx, name: str):
        if name in CONFIG_COMMANDS:
            config, run, doc = CONFIG_COMMANDS[name]
            return _config_command(name, config(), run, doc)
        return super().get_command(ctx, name)

    def format_commands(self, ctx, formatter) -> None:
        """Each command with its whole first paragraph, wrapped (click would cut it to one line with "...")."""
        rows = []
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, " ".join((command.short_help or command.help or "").split("\n\n")[0].split())))
        if rows:
            with formatter.section("Commands"):
                _write_options(formatter, rows)


class _GroupedHelp(TyperCommand):
    """A config command's --help: its options in panels (the fields' groups, kd_pipeline.config.Group) in click's
    plain layout, which wraps the help text and never cuts an option name, at any width and outside a terminal."""

    def format_options(self, ctx, formatter) -> None:
        from kd_pipeline.config import Group

        panels: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                panels.setdefault(getattr(param, "rich_help_panel", None) or Group.OPTIONS, []).append(record)
        for panel in sorted(panels, key=lambda p: Group.ORDER.index(p) if p in Group.ORDER else len(Group.ORDER)):
            with formatter.section(panel):
                _write_options(formatter, panels[panel])


def _write_options(formatter, rows: list[tuple[str, str]], name_width: int = 30) -> None:
    """click's two-column layout (`write_dl`), except that words are never broken at hyphens: an option named in
    a help text stays whole for `--help | grep`."""
    indent = " " * formatter.current_indent
    first = min(max(len(name) for name, _ in rows), name_width)
    width = max(formatter.width - len(indent) - first - 2, 20)
    for name, text in rows:
        lines = textwrap.wrap(text, width, break_on_hyphens=False, break_long_words=False) or [""]
        if len(name) <= first:
            formatter.write(f"{indent}{name:<{first}}  {lines.pop(0)}".rstrip() + "\n")
        else:  # a long name keeps its own line
            formatter.write(f"{indent}{name}\n")
        for line in lines:
            formatter.write(f"{indent}{'':<{first}}  {line}\n")


# Plain (not rich) help everywhere: rich's option tables cut long option names at 80 columns.
app = typer.Typer(
    cls=_Commands,
    rich_markup_mode=None,
    add_completion=False,
    no_args_is_help=True,
    help="Distill causal LMs from an offline teacher cache: `cache-teacher` once, `distill` many times.",
)


def _fail(error: Exception) -> None:
    typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@contextlib.contextmanager
def _user_errors():
    """A PipelineError (bad input, a mismatch, a damaged file) is one line and exit 2; anything else is a bug in
    this tool and keeps its traceback (docs/reliability.md)."""
    from kd_pipeline.errors import PipelineError
    from kd_pipeline.signals import Interrupted

    try:
        yield
    except PipelineError as e:
        _fail(e)
    except Interrupted as stop:  # SIGTERM / SIGINT: what was kept and how to resume, then 128 + the signal
        if stop.message:
            typer.echo(stop.message, err=True)
        raise typer.Exit(stop.exit_code) from None


def _run_cache_teacher(config) -> None:
    from kd_pipeline.cache.build import cache_teacher

    with _user_errors():
        cache_teacher(config)


_STORAGE_OPTION_HELP = "KEY=VALUE for the filesystem of a URL cache (repeat; VALUE read as JSON if it parses)."


@app.command("verify")
def verify_cmd(
    cache: str = typer.Argument(..., help="Cache directory, or a URL (s3://bucket/prefix, gs://...)."),
    quick: bool = typer.Option(False, help="Checksums, sizes and manifests only; skip decoding values."),
    storage_option: list[str] | None = typer.Option(None, help=_STORAGE_OPTION_HELP),
):
    """Check every shard: sha256, schema, row counts, seq_id ranges, sorted log-probs <= 0, tail mass in [0, 1], and
    that the cache trains something. Exit status: 0 OK (complete, every check passed); 1 FAILED (a damaged, missing
    or inconsistent file: the lines marked BAD name it); 3 INCOMPLETE (what is there checks out, but a worker has
    not finished or its manifest is missing: rerun its cache-teacher command; distill refuses it until then)."""
    from kd_pipeline.cache.format.storage import parse_storage_options
    from kd_pipeline.cache.format.verify import verify_cache

    with _user_errors():
        options = parse_storage_options(storage_option)
    report = verify_cache(cache, check_values=not quick, storage_options=options)
    for warning in report.warnings:
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)
    for problem in report.problems:
        typer.secho(f"BAD: {problem}", fg=typer.colors.RED, err=True)
    summary = f"{report.shards_checked} shards, {report.rows:,} sequences, {report.tokens:,} tokens checked"
    if not report.ok:
        typer.echo(f"FAILED: {len(report.problems)} problem(s); {summary}")
    elif report.incomplete:
        typer.echo(f"INCOMPLETE: {report.incomplete}; {summary}")
    else:
        typer.echo(f"OK: {summary}")
    raise typer.Exit(report.exit_code)


@app.command("inspect")
def inspect_cmd(
    cache: str = typer.Argument(..., help="Cache directory, or a URL (s3://bucket/prefix, gs://...)."),
    seq: int = typer.Option(0, help="Sequence id to show."),
    position: int | None = typer.Option(None, help="Position in the sequence (default: a trained one mid-way)."),
    show: int = typer.Option(10, help="How many of the top-k entries to print."),
    tokenizer: str | None = typer.Option(
        None, help="Tokenizer to decode with (default: the teacher's, saved with the cache)."
    ),
    trust_remote_code: bool = typer.Option(False, help="Allow a tokenizer's custom code (auto_map) to run."),
    storage_option: list[str] | None = typer.Option(None, help=_STORAGE_OPTION_HELP),
):
    """Summarize a cache and show one position's teacher distribution as decoded tokens."""
    from kd_pipeline.cache.format.layout import TOKENIZER_DIR
    from kd_pipeline.cache.format.manifest import load_cache
    from kd_pipeline.cache.format.storage import parse_storage_options
    from kd_pipeline.cache.format.verify import inspect_cache
    from kd_pipeline.errors import ModelLoadError
    from kd_pipeline.models import load_tokenizer

    with _user_errors():
        tok = None
        info = load_cache(cache, require_complete=False, storage_options=parse_storage_options(storage_option))
        saved = info.store.local_dir(TOKENIZER_DIR) if info.store.is_folder(TOKENIZER_DIR) else None
        name = tokenizer or (str(saved) if saved is not None else info.manifest.teacher.get("name_or_path"))
        try:
            tok = load_tokenizer(name, "--tokenizer", trust_remote_code=trust_remote_code)
        except ModelLoadError as e:  # a missing tokenizer only costs the decoding: show ids instead
            typer.secho(f"note: {e}; showing token ids", err=True)
        typer.echo(inspect_cache(info, seq=seq, position=position, show=show, tokenizer=tok))


def _run_distill(config) -> None:
    from kd_pipeline.train.trainer import distill

    with _user_errors():
        distill(config)


@app.command("plot")
def plot_cmd(
    runs: list[Path] = typer.Argument(..., help="One or more `pipeline distill` run directories."),
    out: Path | None = typer.Option(None, help="PNG to write (default: RUN/curves.png of the first run)."),
    x: str = typer.Option(
        "steps", "--x", help="x-axis: steps | tokens (tokens seen: runs of other batch sizes line up)."
    ),
):
    """Plot the figures that compare across losses (KL, soft CE, eval KL / bits per byte / top-1) (needs matplotlib)."""
    from kd_pipeline.train.plot import plot_runs

    with _user_errors():
        path = plot_runs(runs, out or runs[0] / "curves.png", x=x)
    typer.echo(f"wrote {path}")


def _run_generate(config) -> None:
    from kd_pipeline.cache.generate import generate

    with _user_errors():
        generate(config)


def _run_plan_teacher(config) -> None:
    import json

    from kd_pipeline.train.capacity import plan_teacher

    with _user_errors():
        plan = plan_teacher(config)
    typer.echo(json.dumps(plan.to_dict(), indent=1) if config.json_output else plan.render())


def _read_config_file(config_cls: type):
    """The eager ``--config`` option's callback: the file's values become the command's defaults (click's
    ``default_map``), so a flag given on the command line wins over the file, the file over the dataclass
    default (click's parameter source: COMMANDLINE > DEFAULT_MAP > DEFAULT)."""

    def callback(ctx, param, path: Path | None):
        if path is None or ctx.resilient_parsing:
            return path
        from kd_pipeline.config import read_config_file
        from kd_pipeline.errors import ConfigError

        try:
            values = read_config_file(path, config_cls)
        except ConfigError as e:
            _fail(e)
        ctx.default_map = {**(ctx.default_map or {}), **values}
        return path

    return callback


def _choice_type(f: dataclasses.Field, choices: tuple[str, ...]) -> type[enum.Enum]:
    # typer lists an Enum's values as the option's choices (`[fkl|rkl|...]`) and refuses any other value.
    return enum.Enum(f"{f.name.title().replace('_', '')}Choice", {c: c for c in choices}, type=str)


def _config_command(name: str, config_cls: type, run: Callable, doc: str):
    """`pipeline NAME` as a click command (see :func:`_config_app`)."""
    return typer.main.get_command(_config_app(name, config_cls, run, doc))


def _config_app(name: str, config_cls: type, run: Callable, doc: str) -> typer.Typer:
    """`pipeline NAME` as a one-command app whose options are generated from `config_cls`'s `option(...)` fields,
    grouped in help panels as the fields declare, plus ``--config FILE.yaml`` (same keys as the fields)."""
    from kd_pipeline.config import Group, choices_of, cli_fields, flag_of, group_of, is_required

    hints = get_type_hints(config_cls)
    fields = sorted(cli_fields(config_cls), key=lambda f: Group.ORDER.index(group_of(f)))
    parameters = []
    for f in fields:
        default = ... if is_required(f) else f.default if f.default is not dataclasses.MISSING else f.default_factory()
        # Booleans get typer's --x/--no-x pair unless the field names its own flag.
        declarations = [flag_of(f)] if f.metadata.get("flag") else []
        annotation = hints[f.name]
        metavar = None
        if typing.get_origin(annotation) is list:  # a repeatable option: one value per flag
            metavar = f"<{typing.get_args(annotation)[0].__name__}>"
        choices = choices_of(f)
        if choices:
            annotation = _choice_type(f, choices)
            default = default if default is ... else annotation(default)
        parameters.append(
            inspect.Parameter(
                f.name,
                inspect.Parameter.KEYWORD_ONLY,
                annotation=annotation,
                default=typer.Option(
                    default, *declarations, help=f.metadata["help"], metavar=metavar, rich_help_panel=group_of(f)
                ),
            )
        )
    if any(p.name == CONFIG_PARAMETER for p in parameters):
        raise TypeError(f"{config_cls.__name__} has a field named {CONFIG_PARAMETER!r}: it would shadow --config")
    parameters.append(
        inspect.Parameter(
            CONFIG_PARAMETER,
            inspect.Parameter.KEYWORD_ONLY,
            annotation=Path | None,
            default=typer.Option(
                None,
                "--config",
                help="YAML file of this command's options, keyed by field name (top_k for --top-k); flags given "
                "here override it (docs/configuration.md).",
                is_eager=True,
                callback=_read_config_file(config_cls),
                rich_help_panel=Group.OPTIONS,
            ),
        )
    )

    def command(**options) -> None:
        options.pop(CONFIG_PARAMETER)
        values = {k: v.value if isinstance(v, enum.Enum) else v for k, v in options.items()}
        run(config_cls(**values))

    command.__signature__ = inspect.Signature(parameters)
    command.__annotations__ = {p.name: p.annotation for p in parameters}
    command.__doc__ = doc
    single = typer.Typer(add_completion=False, rich_markup_mode=None)
    single.command(name, cls=_GroupedHelp)(command)
    return single


def _cache_teacher_config():
    from kd_pipeline.cache.config import CacheConfig

    return CacheConfig


def _distill_config():
    from kd_pipeline.train.config import DistillConfig

    return DistillConfig


def _generate_config():
    from kd_pipeline.cache.config import GenerateConfig

    return GenerateConfig


def _plan_config():
    from kd_pipeline.train.capacity import PlanConfig

    return PlanConfig


CONFIG_PARAMETER = "config_file"  # --config's parameter name: no config field may take it

# Commands whose options come from a config dataclass, built when invoked. The dataclasses' modules import no
# torch (their runs do, inside `run`), so `pipeline COMMAND --help` starts in a fraction of a second.
CONFIG_COMMANDS: dict[str, tuple[Callable[[], type], Callable, str]] = {
    "cache-teacher": (
        _cache_teacher_config,
        _run_cache_teacher,
        "Run the teacher over a dataset and write its top-k log-probabilities (resumable: rerun to continue).",
    ),
    "distill": (
        _distill_config,
        _run_distill,
        "Train a student on a teacher cache. Several GPUs or nodes: `torchrun --nproc-per-node N --no-python "
        "pipeline distill ... [--parallel fsdp]`.",
    ),
    "generate": (
        _generate_config,
        _run_generate,
        "Write responses for cache-teacher: SWITCH (Koo et al. 2024), or student- or teacher-only. HF backend "
        "(no vLLM).",
    ),
    "plan-teacher": (
        _plan_config,
        _run_plan_teacher,
        "Recommend a teacher by the law of capacity gap, a teacher-assistant chain for large gaps, rank assistants "
        "(MiniDisc).",
    ),
}


def main() -> None:
    """The `pipeline` console command and `python -m kd_pipeline`."""
    app()


if __name__ == "__main__":
    main()
