"""`pipeline`: the command line. It only turns options into config dataclasses and calls the stages."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Distill causal LMs from an offline teacher cache: `cache-teacher` once, `distill` many times.",
)


def _fail(error: Exception) -> None:
    typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command("cache-teacher")
def cache_teacher_cmd(
    teacher: str = typer.Option(..., help="Teacher model: a local HF directory or a hub id."),
    data: str = typer.Option(
        ..., help="Dataset: .jsonl, .jsonl.zst, .parquet, .txt, a datasets.save_to_disk directory, or a folder/glob of files."
    ),
    out: Path = typer.Option(..., help="Cache directory to create (or resume)."),
    top_k: int = typer.Option(64, "--top-k", help="Teacher log-probabilities kept per position (the support)."),
    seq_len: int = typer.Option(1024, help="Tokens per packed sequence (documents joined with EOS)."),
    text_field: str = typer.Option("text", help="Record field holding plain text."),
    messages_field: str = typer.Option(
        "messages", help="Record field holding chat messages; only assistant tokens are trained."
    ),
    split: str = typer.Option("train", help="Split to read from a DatasetDict directory."),
    backend: str = typer.Option("auto", help="hf | vllm | auto (vLLM when CUDA and vllm are present, else HF)."),
    batch_size: int = typer.Option(8, help="Sequences per teacher forward (HF backend)."),
    dtype: str = typer.Option("auto", help="auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16."),
    device: str = typer.Option("auto", help="HF backend device: auto | cpu | cuda | cuda:N."),
    tensor_parallel_size: int = typer.Option(1, help="vLLM tensor parallel size (GPUs per teacher)."),
    revision: Optional[str] = typer.Option(None, help="Hub revision of the teacher."),
    trust_remote_code: bool = typer.Option(False, help="Allow custom model code from the hub."),
    shard_tokens: int = typer.Option(1 << 20, help="Tokens per shard file: the unit of crash-safety and resume."),
    row_group_tokens: int = typer.Option(1 << 16, help="Tokens per Parquet row group: bounds reader memory."),
    max_tokens: Optional[int] = typer.Option(None, help="Stop after this many tokens of the stream."),
    max_sequences: Optional[int] = typer.Option(None, help="Stop after this many sequences."),
    worker_index: int = typer.Option(0, help="This writer's index when several write one cache (one per GPU/node)."),
    num_workers: int = typer.Option(1, help="Number of writers sharing the cache; each takes every n-th shard."),
    overwrite: bool = typer.Option(False, help="Delete an existing cache at --out instead of resuming it."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
):
    """Run the teacher over a dataset and write its top-k log-probabilities (resumable: rerun to continue)."""
    from cache.build import CacheConfig, cache_teacher
    from cache.manifest import CacheError

    config = CacheConfig(
        teacher=teacher, data=data, out=out, top_k=top_k, seq_len=seq_len, text_field=text_field,
        messages_field=messages_field, split=split, backend=backend, batch_size=batch_size, dtype=dtype,
        device=device, tensor_parallel_size=tensor_parallel_size, revision=revision,
        trust_remote_code=trust_remote_code, shard_tokens=shard_tokens, row_group_tokens=row_group_tokens,
        max_tokens=max_tokens, max_sequences=max_sequences, worker_index=worker_index,
        num_workers=num_workers, overwrite=overwrite, progress=progress,
    )  # fmt: skip
    try:
        cache_teacher(config)
    except (CacheError, ValueError, FileNotFoundError) as e:
        _fail(e)


@app.command("verify")
def verify_cmd(
    cache: Path = typer.Argument(..., help="Cache directory."),
    quick: bool = typer.Option(False, help="Checksums, sizes and manifests only; skip decoding values."),
):
    """Check every shard: sha256, schema, row counts, seq_id ranges, sorted log-probs <= 0, tail mass in [0, 1]."""
    from cache.verify import verify_cache

    report = verify_cache(cache, check_values=not quick)
    for warning in report.warnings:
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)
    for problem in report.problems:
        typer.secho(f"BAD: {problem}", fg=typer.colors.RED, err=True)
    summary = f"{report.shards_checked} shards, {report.rows:,} sequences, {report.tokens:,} tokens checked"
    if not report.ok:
        typer.echo(f"FAILED: {len(report.problems)} problem(s); {summary}")
        raise typer.Exit(1)
    typer.echo(f"OK: {summary}")


@app.command("inspect")
def inspect_cmd(
    cache: Path = typer.Argument(..., help="Cache directory."),
    seq: int = typer.Option(0, help="Sequence id to show."),
    position: Optional[int] = typer.Option(None, help="Position in the sequence (default: a trained one mid-way)."),
    show: int = typer.Option(10, help="How many of the top-k entries to print."),
    tokenizer: Optional[str] = typer.Option(None, help="Tokenizer to decode with (default: the cache's teacher)."),
):
    """Summarize a cache and show one position's teacher distribution as decoded tokens."""
    from cache.manifest import CacheError, load_cache
    from cache.verify import inspect_cache

    try:
        tok = None
        name = tokenizer or load_cache(cache, require_complete=False).manifest.teacher.get("name_or_path")
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(name)
        except Exception as e:  # the teacher may live on another machine: show ids instead
            typer.secho(f"note: cannot load tokenizer {name!r} ({type(e).__name__}); showing token ids", err=True)
        typer.echo(inspect_cache(cache, seq=seq, position=position, show=show, tokenizer=tok))
    except CacheError as e:
        _fail(e)


if __name__ == "__main__":
    app()
