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
    support: str = typer.Option(
        "topk", help="topk: the teacher's k most likely tokens. sampled: RS-KD importance samples (unbiased; HF backend)."
    ),
    num_samples: int = typer.Option(64, help="--support sampled: draws per position (distinct ids kept, at most --top-k)."),
    sample_temperature: float = typer.Option(1.0, help="--support sampled: proposal r ∝ p^temperature (1: sample from p)."),
    sample_seed: int = typer.Option(0, help="--support sampled: seed (draws depend only on it and the position)."),
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
        num_workers=num_workers, overwrite=overwrite, progress=progress, support=support,
        num_samples=num_samples, sample_temperature=sample_temperature, sample_seed=sample_seed,
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


@app.command("distill")
def distill_cmd(
    student: str = typer.Option(
        ..., help="Student: a HF model dir/id with weights, or a config (config.json, or a dir with only a config) to train from scratch."
    ),
    cache: Path = typer.Option(..., help="Teacher cache written by `pipeline cache-teacher`."),
    out: Path = typer.Option(..., help="Run directory: checkpoints/, metrics.jsonl, final/ (the student, save_pretrained)."),
    loss: str = typer.Option("fkl", help="KD loss over the teacher's top-k + tail: taid | fkl | rkl | js | sfkl | srkl | atkd."),
    ce_weight: float = typer.Option(0.0, help="Weight of cross-entropy on the true next token added to the KD loss."),
    skew_alpha: float = typer.Option(0.1, help="Skew KL mixing α (DistiLLM) for sfkl/srkl."),
    js_beta: float = typer.Option(0.5, help="Mixture weight of the JS divergence."),
    atkd_alpha: float = typer.Option(0.2, help="ATKD weight of the easy tokens' diversity term."),
    taid_t_start: float = typer.Option(0.4, help="TAID initial interpolation t."),
    taid_t_end: float = typer.Option(1.0, help="TAID final t."),
    taid_alpha: float = typer.Option(5e-4, help="TAID adaptive step size α."),
    taid_beta: float = typer.Option(0.99, help="TAID momentum β of the relative loss change."),
    batch_size: int = typer.Option(8, help="Sequences per micro-batch per process."),
    grad_accum: int = typer.Option(1, help="Micro-batches per optimizer step."),
    lr: float = typer.Option(1e-4, help="Peak AdamW learning rate."),
    weight_decay: float = typer.Option(0.01, help="AdamW weight decay (matrices only)."),
    warmup_steps: int = typer.Option(0, help="Linear warmup steps before the cosine decay."),
    max_steps: Optional[int] = typer.Option(None, help="Optimizer steps to train (overrides --epochs)."),
    epochs: float = typer.Option(1.0, help="Passes over the cache when --max-steps is not given."),
    grad_clip: float = typer.Option(1.0, help="Clip the global gradient norm (0 disables)."),
    precision: str = typer.Option("auto", help="auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32."),
    gradient_checkpointing: bool = typer.Option(False, help="Recompute activations in backward to save memory."),
    seed: int = typer.Option(0, help="Seed of the data order and of a from-scratch student's init."),
    shuffle_rows: int = typer.Option(1024, help="Shuffle window in sequences (rows of consecutive row groups)."),
    save_every: int = typer.Option(500, help="Checkpoint every N optimizer steps (and at the end)."),
    keep_checkpoints: int = typer.Option(2, help="Complete checkpoints to keep."),
    eval_every: int = typer.Option(200, help="Evaluate every N optimizer steps (and at the end)."),
    eval_sequences: int = typer.Option(64, help="Sequences held out from the end of the cache for eval (0: none)."),
    eval_cache: Optional[Path] = typer.Option(None, help="Evaluate on this cache instead of a held-out part."),
    eval_at_start: bool = typer.Option(False, help="Also evaluate the untrained student (step 0)."),
    log_every: int = typer.Option(10, help="Write metrics every N steps."),
    resume: bool = typer.Option(False, help="Continue from the latest complete checkpoint in --out."),
    allow_vocab_superset: bool = typer.Option(
        False, help="Accept a student tokenizer that extends the teacher's with the same ids."
    ),
    device: str = typer.Option("auto", help="auto (cuda:LOCAL_RANK if available, else cpu) | cpu | cuda:N."),
    fused_loss: bool = typer.Option(
        False,
        help="Compute the KD loss from the student's final hidden states in vocabulary chunks, never forming the "
        "[tokens, vocab] logits: far less memory for large vocabularies, the same loss and gradients up to rounding, "
        "one extra hidden-by-vocabulary product per step. Heads that are not a plain linear layer (logit soft-capping "
        "or scaling) fall back to the full-logits loss with a message.",
    ),
    progress: bool = typer.Option(True, help="Show a progress bar."),
):
    """Train a student on a teacher cache. Multi-GPU: `torchrun --nproc-per-node N -m pipeline distill ...`."""
    from cache.manifest import CacheError
    from train.trainer import DistillConfig, distill

    config = DistillConfig(
        student=student, cache=cache, out=out, loss=loss, ce_weight=ce_weight, skew_alpha=skew_alpha,
        js_beta=js_beta, atkd_alpha=atkd_alpha, taid_t_start=taid_t_start, taid_t_end=taid_t_end,
        taid_alpha=taid_alpha, taid_beta=taid_beta, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
        weight_decay=weight_decay, warmup_steps=warmup_steps, max_steps=max_steps, epochs=epochs,
        grad_clip=grad_clip, precision=precision, gradient_checkpointing=gradient_checkpointing, seed=seed,
        shuffle_rows=shuffle_rows, save_every=save_every, keep_checkpoints=keep_checkpoints,
        eval_every=eval_every, eval_sequences=eval_sequences, eval_cache=eval_cache, eval_at_start=eval_at_start, log_every=log_every,
        resume=resume, allow_vocab_superset=allow_vocab_superset, device=device, fused_loss=fused_loss,
        progress=progress,
    )  # fmt: skip
    try:
        distill(config)
    except (CacheError, ValueError, FileNotFoundError) as e:
        _fail(e)


@app.command("plot")
def plot_cmd(
    runs: list[Path] = typer.Argument(..., help="One or more `pipeline distill` run directories."),
    out: Optional[Path] = typer.Option(None, help="PNG to write (default: RUN/curves.png of the first run)."),
):
    """Plot training loss and eval CE / KL / top-1 agreement against steps (needs matplotlib)."""
    from train.plot import plot_runs

    try:
        path = plot_runs(runs, out or runs[0] / "curves.png")
    except (FileNotFoundError, ImportError) as e:
        _fail(e)
    typer.echo(f"wrote {path}")


@app.command("generate")
def generate_cmd(
    prompts: str = typer.Option(
        ..., help="Prompts: any source cache-teacher reads (.jsonl, .parquet, ...) with a prompt field or chat messages."
    ),
    out: Path = typer.Option(..., help="Output .jsonl (resumable: rerun to continue); OUT.meta.json records its settings."),
    teacher: Optional[str] = typer.Option(None, help="Teacher: a local HF directory or a hub id (switch and teacher modes)."),
    student: Optional[str] = typer.Option(None, help="Student: a local HF directory or a hub id (switch and student modes)."),
    mode: str = typer.Option(
        "switch", help="switch: the student writes, the teacher steps in where JSD > tau_t | student | teacher."
    ),
    tau0: float = typer.Option(
        0.5, help="SWITCH threshold at the first response token, in nats (JSD <= ln 2 = 0.693). Our default: "
        "the paper's value was not found.",
    ),
    decay: float = typer.Option(
        0.1, help="lambda in tau_t = tau0*exp(-lambda*t), t = 0 at the first response token (0.1: the paper's "
        "decay factor 1/10 as reported by summaries of it).",
    ),
    max_new_tokens: int = typer.Option(256, help="Stop a response after this many tokens (or at EOS)."),
    temperature: float = typer.Option(0.0, help="Sampling temperature; 0 is greedy."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling: keep the most likely tokens holding this mass."),
    seed: int = typer.Option(0, help="Seed; each prompt gets its own generator from (seed, prompt index)."),
    batch_size: int = typer.Option(8, help="Prompts per batch (one batch is the unit of resume)."),
    prompt_field: str = typer.Option("prompt", help="Record field holding a plain-text prompt."),
    messages_field: str = typer.Option(
        "messages", help="Record field holding chat messages (rendered with the chat template; trailing assistant turns dropped)."
    ),
    chat: bool = typer.Option(False, help="Render plain prompts as a single user turn with the chat template."),
    split: str = typer.Option("train", help="Split to read from a DatasetDict directory."),
    max_prompts: Optional[int] = typer.Option(None, help="Use only the first N prompts."),
    dtype: str = typer.Option("auto", help="auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16."),
    device: str = typer.Option("auto", help="Device of both models: auto | cpu | cuda | cuda:N."),
    trust_remote_code: bool = typer.Option(False, help="Allow custom model code from the hub."),
    overwrite: bool = typer.Option(False, help="Delete an existing --out instead of resuming it."),
    progress: bool = typer.Option(True, help="Show a progress bar (prompts, tokens/s, teacher share)."),
):
    """Write responses for cache-teacher: SWITCH (Koo et al. 2024), or student- or teacher-only. HF backend (no vLLM)."""
    from cache.generate import GenerateConfig, GenerateError, generate

    config = GenerateConfig(
        prompts=prompts, out=out, teacher=teacher, student=student, mode=mode, tau0=tau0, decay=decay,
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size,
        prompt_field=prompt_field, messages_field=messages_field, chat=chat, split=split, max_prompts=max_prompts,
        dtype=dtype, device=device, trust_remote_code=trust_remote_code, overwrite=overwrite, progress=progress,
    )  # fmt: skip
    try:
        generate(config)
    except (GenerateError, ValueError, FileNotFoundError) as e:
        _fail(e)


@app.command("plan-teacher")
def plan_teacher_cmd(
    student: str = typer.Option(..., help="Student: a model dir / hub id / config.json, or a size such as 1B."),
    candidate: Optional[list[str]] = typer.Option(
        None, help="A possible teacher (repeat): model dir / hub id / config.json, NAME=SIZE, or a size such as 7B."
    ),
    ratio: float = typer.Option(2.5, help="Optimal teacher / student size (law of capacity gap, arXiv 2311.07052)."),
    assistants: Optional[Path] = typer.Option(
        None, help="CSV/JSON of trained assistants (name, params, metric or eval_loss) to rank with MiniDisc."
    ),
    teacher: Optional[str] = typer.Option(
        None, help="The teacher the assistants come from (their sparsity is relative to it); default: the largest candidate."
    ),
    lam: float = typer.Option(0.2, help="MiniDisc lambda: score = metric + lambda * sparsity."),
    json_output: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
    trust_remote_code: bool = typer.Option(False, help="Allow custom model code from the hub (to count parameters)."),
):
    """Recommend a teacher by the law of capacity gap, a teacher-assistant chain for large gaps, rank assistants (MiniDisc)."""
    import json

    from train.capacity import PlanConfig, plan_teacher

    config = PlanConfig(
        student=student, candidates=list(candidate or []), ratio=ratio, assistants=assistants, teacher=teacher,
        lam=lam, trust_remote_code=trust_remote_code,
    )  # fmt: skip
    try:
        plan = plan_teacher(config)
    except (ValueError, FileNotFoundError) as e:
        _fail(e)
    typer.echo(json.dumps(plan.to_dict(), indent=1) if json_output else plan.render())


if __name__ == "__main__":
    app()
