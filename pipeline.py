"""`pipeline`: the command line. It only turns options into config dataclasses and calls the stages."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import get_type_hints

import typer
from typer.core import TyperGroup


class _Commands(TyperGroup):
    """The hand-written commands plus CONFIG_COMMANDS (below), built on demand."""

    def list_commands(self, ctx) -> list[str]:
        return [*CONFIG_COMMANDS, *super().list_commands(ctx)]

    def get_command(self, ctx, name: str):
        if name in CONFIG_COMMANDS:
            config, run, doc = CONFIG_COMMANDS[name]
            return _config_command(name, config(), run, doc)
        return super().get_command(ctx, name)


app = typer.Typer(
    cls=_Commands,
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

    try:
        yield
    except PipelineError as e:
        _fail(e)


def _run_cache_teacher(config) -> None:
    from kd_pipeline.cache.build import cache_teacher

    with _user_errors():
        cache_teacher(config)


@app.command("verify")
def verify_cmd(
    cache: Path = typer.Argument(..., help="Cache directory."),
    quick: bool = typer.Option(False, help="Checksums, sizes and manifests only; skip decoding values."),
):
    """Check every shard: sha256, schema, row counts, seq_id ranges, sorted log-probs <= 0, tail mass in [0, 1], and
    that the cache trains something. Exit status: 0 OK (complete, every check passed); 1 FAILED (a damaged, missing
    or inconsistent file: the lines marked BAD name it); 3 INCOMPLETE (what is there checks out, but a worker has
    not finished or its manifest is missing: rerun its cache-teacher command; distill refuses it until then)."""
    from kd_pipeline.cache.format.verify import verify_cache

    report = verify_cache(cache, check_values=not quick)
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
    cache: Path = typer.Argument(..., help="Cache directory."),
    seq: int = typer.Option(0, help="Sequence id to show."),
    position: int | None = typer.Option(None, help="Position in the sequence (default: a trained one mid-way)."),
    show: int = typer.Option(10, help="How many of the top-k entries to print."),
    tokenizer: str | None = typer.Option(
        None, help="Tokenizer to decode with (default: the teacher's, saved with the cache)."
    ),
    trust_remote_code: bool = typer.Option(False, help="Allow a tokenizer's custom code (auto_map) to run."),
):
    """Summarize a cache and show one position's teacher distribution as decoded tokens."""
    from kd_pipeline.cache.format.layout import TOKENIZER_DIR
    from kd_pipeline.cache.format.manifest import load_cache
    from kd_pipeline.cache.format.verify import inspect_cache
    from kd_pipeline.errors import ModelLoadError
    from kd_pipeline.models import load_tokenizer

    with _user_errors():
        tok = None
        info = load_cache(cache, require_complete=False)
        saved = info.root / TOKENIZER_DIR
        name = tokenizer or (str(saved) if saved.is_dir() else info.manifest.teacher.get("name_or_path"))
        try:
            tok = load_tokenizer(name, "--tokenizer", trust_remote_code=trust_remote_code)
        except ModelLoadError as e:  # a missing tokenizer only costs the decoding: show ids instead
            typer.secho(f"note: {e}; showing token ids", err=True)
        typer.echo(inspect_cache(cache, seq=seq, position=position, show=show, tokenizer=tok))


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


@app.command("plan-teacher")
def plan_teacher_cmd(
    student: str = typer.Option(..., help="Student: a model dir / hub id / config.json, or a size such as 1B."),
    candidate: list[str] | None = typer.Option(
        None, help="A possible teacher (repeat): model dir / hub id / config.json, NAME=SIZE, or a size such as 7B."
    ),
    ratio: float = typer.Option(2.5, help="Optimal teacher / student size (law of capacity gap, arXiv 2311.07052)."),
    assistants: Path | None = typer.Option(
        None, help="CSV/JSON of trained assistants (name, params, metric or eval_loss) to rank with MiniDisc."
    ),
    teacher: str | None = typer.Option(
        None,
        help="The teacher the assistants come from (their sparsity is relative to it); default: the largest candidate.",
    ),
    lam: float = typer.Option(0.2, help="MiniDisc lambda: score = metric + lambda * sparsity."),
    json_output: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
    trust_remote_code: bool = typer.Option(False, help="Allow custom model code from the hub (to count parameters)."),
):
    """Recommend a teacher by the law of capacity gap, a teacher-assistant chain for large gaps, rank assistants (MiniDisc)."""
    import json

    from kd_pipeline.train.capacity import PlanConfig, plan_teacher

    config = PlanConfig(
        student=student,
        candidates=list(candidate or []),
        ratio=ratio,
        assistants=assistants,
        teacher=teacher,
        lam=lam,
        trust_remote_code=trust_remote_code,
    )
    with _user_errors():
        plan = plan_teacher(config)
    typer.echo(json.dumps(plan.to_dict(), indent=1) if json_output else plan.render())


def _config_command(name: str, config_cls: type, run: Callable, doc: str):
    """`pipeline NAME` as a click command whose options are generated from `config_cls`'s `option(...)` fields."""
    from kd_pipeline.config import cli_fields, flag_of

    hints = get_type_hints(config_cls)
    parameters = []
    for f in cli_fields(config_cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = ... if required else f.default if f.default is not dataclasses.MISSING else f.default_factory()
        # Booleans get typer's --x/--no-x pair unless the field names its own flag.
        declarations = [flag_of(f)] if f.metadata.get("flag") else []
        parameters.append(
            inspect.Parameter(
                f.name,
                inspect.Parameter.KEYWORD_ONLY,
                annotation=hints[f.name],
                default=typer.Option(default, *declarations, help=f.metadata["help"]),
            )
        )

    def command(**options) -> None:
        run(config_cls(**options))

    command.__signature__ = inspect.Signature(parameters)
    command.__annotations__ = {p.name: p.annotation for p in parameters}
    command.__doc__ = doc
    single = typer.Typer(add_completion=False)
    single.command(name)(command)
    return typer.main.get_command(single)


def _cache_teacher_config():
    from kd_pipeline.cache.build import CacheConfig

    return CacheConfig


def _distill_config():
    from kd_pipeline.train.trainer import DistillConfig

    return DistillConfig


def _generate_config():
    from kd_pipeline.cache.generate import GenerateConfig

    return GenerateConfig


# Commands whose options come from a config dataclass. They are built when invoked: their modules import torch,
# which would otherwise cost every `pipeline verify` or `plot` seconds of start-up.
CONFIG_COMMANDS: dict[str, tuple[Callable[[], type], Callable, str]] = {
    "cache-teacher": (
        _cache_teacher_config,
        _run_cache_teacher,
        "Run the teacher over a dataset and write its top-k log-probabilities (resumable: rerun to continue).",
    ),
    "distill": (
        _distill_config,
        _run_distill,
        "Train a student on a teacher cache. Several GPUs or nodes: `torchrun --nproc-per-node N --no-python pipeline distill ... [--parallel fsdp]`.",
    ),
    "generate": (
        _generate_config,
        _run_generate,
        "Write responses for cache-teacher: SWITCH (Koo et al. 2024), or student- or teacher-only. HF backend (no vLLM).",
    ),
}


def main() -> None:
    """The `pipeline` console command and `python -m kd_pipeline`."""
    app()


if __name__ == "__main__":
    main()
