"""Stage two's settings: :class:`DistillConfig` (``pipeline distill``) = the run's :class:`RunOptions` + every
declared loss's options (train/losses/options.py).

Torch-free, so that ``--help`` and ``--config`` files read them; the code that runs them is train/trainer.py.
:class:`~kd_pipeline.train.capacity.PlanConfig` (``pipeline plan-teacher``) stays in train/capacity.py, which
imports no torch either.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from kd_pipeline.config import Group, option
from kd_pipeline.errors import ConfigError
from kd_pipeline.train.losses.options import DEFAULT_LOSS, LOSS_NAMES, LossOptions, loss_help

PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class RunOptions:
    """Stage two's own settings; each field with `option(...)` is also a `pipeline distill` option."""

    student: str = option(
        help="Student: a HF model dir/id with weights, or a config (config.json, or a dir with only a config) to "
        "train from scratch.",
        group=Group.STUDENT,
    )
    cache: list[str] = option(
        help="Teacher cache written by `pipeline cache-teacher`: a directory or a URL (s3://, gs://). Repeat for "
        "several teachers, each PATH or NAME=PATH (NAME names its metrics, e.g. eval_kl/NAME; default the folder's "
        "name); see --combine.",
        group=Group.DATA,
    )
    out: Path = option(
        help="Run directory: checkpoints/, metrics.jsonl, final/ (the student, save_pretrained).",
        group=Group.CHECKPOINTS,
    )
    cache_weights: str | None = option(
        None,
        "With several --cache: one weight per cache, e.g. 0.3,0.7 (normalized). mixture: the share of trained "
        "tokens drawn from each (default: each cache's share of all trained tokens, one pass each per epoch); "
        "ensemble: each teacher's weight in the combined target (default: equal).",
        group=Group.DATA,
    )
    combine: str = option(
        "mixture",
        "How several --cache combine. mixture: caches over different data, each batch from one cache with its own "
        "teacher, drawn in proportion to --cache-weights | ensemble: teachers scored on the same token stream, "
        "combined position by position into one target, p = sum_i w_i p_i on the union of their top-k "
        "(docs/multi-teacher.md).",
        group=Group.DATA,
        choices=("mixture", "ensemble"),
    )
    ensemble_temperature: float | None = option(
        None,
        "With --combine ensemble: per-position weights w_i proportional to weight_i * p_i(true token)^(1/T), "
        "trusting the teacher that knows the token (from each cache's target_logprob); unset: the static "
        "--cache-weights.",
        group=Group.DATA,
    )
    loss: str = option(DEFAULT_LOSS, loss_help(), group=Group.LOSS, choices=LOSS_NAMES)
    batch_size: int = option(8, "Sequences per micro-batch per process.", group=Group.OPTIMIZER)
    grad_accum: int = option(1, "Micro-batches per optimizer step.", group=Group.OPTIMIZER)
    lr: float = option(1e-4, "Peak AdamW learning rate.", group=Group.OPTIMIZER)
    weight_decay: float = option(0.01, "AdamW weight decay (matrices only).", group=Group.OPTIMIZER)
    adam_betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = option(0, "Linear warmup steps before the cosine decay.", group=Group.OPTIMIZER)
    max_steps: int | None = option(None, "Optimizer steps to train (overrides --epochs).", group=Group.OPTIMIZER)
    epochs: float = option(1.0, "Passes over the cache when --max-steps is not given.", group=Group.OPTIMIZER)
    grad_clip: float = option(1.0, "Clip the global gradient norm (0 disables).", group=Group.OPTIMIZER)
    precision: str = option(
        "auto", "auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32.", group=Group.STUDENT, choices=PRECISIONS
    )
    gradient_checkpointing: bool = option(
        False, "Recompute activations in backward to save memory.", group=Group.STUDENT
    )
    seed: int = option(0, "Seed of the data order and of a from-scratch student's init.", group=Group.DATA)
    shuffle_rows: int = option(1024, "Shuffle window in sequences (rows of consecutive row groups).", group=Group.DATA)
    save_every: int = option(500, "Checkpoint every N optimizer steps (and at the end).", group=Group.CHECKPOINTS)
    keep_checkpoints: int = option(2, "Complete checkpoints to keep.", group=Group.CHECKPOINTS)
    eval_every: int = option(200, "Evaluate every N optimizer steps (and at the end).", group=Group.EVAL)
    eval_sequences: int = option(
        64, "Sequences held out from the end of the cache for eval (0: none).", group=Group.EVAL
    )
    eval_cache: list[str] | None = option(
        None,
        "Evaluate on this cache (directory or URL) instead of a held-out part; repeatable as --cache (each reported "
        "as eval_kl/NAME ..., and pooled); with --combine ensemble, one per teacher over the same stream.",
        group=Group.EVAL,
    )
    eval_at_start: bool = option(
        True, "Also evaluate the untrained student (step 0): the 'before' of the summary.", group=Group.EVAL
    )
    log_every: int = option(10, "Write metrics every N steps.", group=Group.LOGGING)
    resume: bool = option(False, "Continue from the latest complete checkpoint in --out.", group=Group.CHECKPOINTS)
    allow_config_change: bool = option(
        False,
        "With --resume: accept options that change training (each difference is listed). The learning-rate "
        "schedule is rebuilt for the new options from the current step; distill_config.json and lineage.json "
        "record what runs.",
        group=Group.CHECKPOINTS,
    )
    skip_nonfinite_steps: int = option(
        0,
        "Skip up to N optimizer steps whose loss or gradient norm is not finite (no update); 0: stop at the first.",
        group=Group.OPTIMIZER,
    )
    allow_vocab_superset: bool = option(
        False,
        "Accept a student tokenizer that extends the teacher's with the same ids.",
        group=Group.STUDENT,
    )
    cross_tokenizer: bool = option(
        False,
        "The student keeps its own tokenizer (another vocabulary than the teacher's): each cached sequence's text is "
        "rebuilt from its ids and re-tokenized by the student; where the student's next token starts at the byte "
        "where a teacher token starts (see --cross-tokenizer-positions) the teacher's top-k, moved onto the student "
        "ids that stand for the same bytes (the rest to the tail bin), is the target of --loss; elsewhere the "
        "student gets CE on its own next token. The id map is built once per tokenizer pair, kept in the cache's "
        "vocab_maps/. Compare runs in eval_bpb (bits per byte), not eval_ce (docs/cross-tokenizer.md).",
        group=Group.STUDENT,
    )
    cross_tokenizer_positions: str = option(
        "same-token",
        "With --cross-tokenizer, where the student distills: same-token: where its next token is the teacher's own "
        "next token (the same text from the same byte; better than CE alone in bench/RESULTS.md) | aligned: "
        "wherever the teacher starts a token at the same byte (more positions, but the teacher's alternatives land "
        "on student prefix ids; worse than CE alone in an earlier run).",
        group=Group.STUDENT,
    )
    device: str = option("auto", "auto (cuda:LOCAL_RANK if available, else cpu) | cpu | cuda:N.", group=Group.PARALLEL)
    parallel: str = option(
        "auto",
        "auto: ddp under torchrun, else none | none: one process | ddp: every rank holds the whole model | fsdp: "
        "FSDP2, parameters, gradients and optimizer state sharded over the ranks (per decoder layer).",
        group=Group.PARALLEL,
    )
    progress: bool = option(True, "Show a progress bar.", group=Group.LOGGING)
    fused_loss: bool = option(
        False,
        "Compute the KD loss from the student's final hidden states in vocabulary chunks, never forming the "
        "[tokens, vocab] logits: far less memory for large vocabularies, the same loss and gradients up to rounding, "
        "one extra hidden-by-vocabulary product per step. Heads that are not a plain linear layer (logit soft-capping "
        "or scaling) fall back to the full-logits loss with a message.",
        group=Group.LOSS,
    )
    trust_remote_code: bool = option(
        False,
        "Allow the student's own model code (auto_map) to run; without it such a student is refused, never asked.",
        group=Group.STUDENT,
    )
    allow_eval_teacher_mismatch: bool = option(
        False,
        "Accept an --eval-cache made by another teacher than --cache (same tokenizer): its KL and top-1 then measure "
        "agreement with that other teacher.",
        group=Group.EVAL,
    )
    lora_r: int = option(
        0,
        "Train LoRA adapters of this rank on the frozen student (peft) instead of all its weights; 0: full "
        "fine-tuning. final/ then holds the adapter (docs/integrations.md).",
        group=Group.LORA,
    )
    lora_alpha: float = option(16.0, "With --lora-r: the adapters' update is scaled by alpha / r.", group=Group.LORA)
    lora_dropout: float = option(0.0, "With --lora-r: dropout on the adapters' input.", group=Group.LORA)
    lora_target_modules: str = option(
        "",
        "With --lora-r: comma-separated module names to adapt, or all-linear (every linear layer but the output "
        "layer); empty: PEFT's default for the architecture (Llama: q_proj,v_proj).",
        group=Group.LORA,
    )
    peft_config: Path | None = option(
        None,
        "A PEFT config JSON (keys as in an adapter_config.json; any PEFT method) instead of the --lora-* options.",
        group=Group.LORA,
    )
    merge_lora: bool = option(
        False,
        "Also write the student with its adapters merged into the weights, a plain model, to final/merged/.",
        group=Group.LORA,
    )
    save_on_signal_timeout: float = option(
        60.0,
        "On SIGTERM or SIGINT the run stops at the next step boundary, checkpoints (every rank) and exits 143 or "
        "130; if that takes longer than this many seconds it exits without the new checkpoint (a second signal: at "
        "once). Keep it below the scheduler's grace period (and torchrun's --shutdown-timeout).",
        group=Group.CHECKPOINTS,
    )
    report_to: list[str] = option(
        help="Also log every metrics.jsonl record and the config to this experiment tracker (repeat for several): "
        "tensorboard | wandb (offline unless WANDB_MODE says otherwise) | mlflow (a local SQLite store unless "
        "MLFLOW_TRACKING_URI says otherwise). Each is an extra: pip install 'kd-pipeline[NAME]'.",
        default_factory=list,
        group=Group.LOGGING,
    )
    run_name: str | None = option(
        None, "The run's name in the trackers (default: the --out directory's name).", group=Group.LOGGING
    )
    tracker_dir: Path | None = option(
        None,
        "Where the trackers write locally (tensorboard/, wandb/, mlflow/); default: the --out directory.",
        group=Group.LOGGING,
    )
    storage_options: list[str] = option(
        help="KEY=VALUE for the filesystem of a URL --cache / --eval-cache (repeat; VALUE read as JSON if it "
        "parses). Never saved: a resumed run gives them again.",
        flag="--storage-option",
        default_factory=list,
        group=Group.DATA,
    )


@dataclass
class DistillConfig(LossOptions, RunOptions):
    """Stage two's settings: the run's (RunOptions) and every registered loss's options (LossOptions:
    temperature, ce_weight and each loss's own, declared by the losses). Bases in this order put the run's fields
    first (dataclass fields follow the reversed MRO), as `pipeline distill --help` lists them."""

    def __post_init__(self) -> None:
        # One path (code callers, configs from before several caches) is a list of one.
        self.cache = cache_values(self.cache)
        self.eval_cache = cache_values(self.eval_cache) or None

    def validate(self) -> None:
        # What the checks need lives with the code that runs (torch): imported by a run, never by --help.
        from kd_pipeline.train import cross_tokenizer as xt
        from kd_pipeline.train import lora, losses, sources
        from kd_pipeline.train.parallel import PARALLEL_CHOICES

        losses.build_loss(self.loss, self)  # raises on an unknown name or an option out of range
        sources.check_options(self)
        for name in ("batch_size", "grad_accum", "save_every", "eval_every", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:  # 0 once meant "unset" and trained a full epoch
            raise ConfigError(f"--max-steps must be >= 1 (leave it out to train --epochs), got {self.max_steps}")
        for name in ("lr", "weight_decay", "epochs", "grad_clip"):  # nan passes every comparison below
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"--{name.replace('_', '-')} must be a finite number, got {getattr(self, name)}")
        if self.max_steps is None and self.epochs <= 0:
            raise ConfigError("give --max-steps or a positive --epochs")
        for name, low, meaning in (
            ("warmup_steps", 0, ""),
            ("eval_sequences", 0, " (0: no held-out eval)"),
            ("shuffle_rows", 1, " (1: rows shuffled within each row group only)"),
            ("keep_checkpoints", 1, ""),
        ):
            if getattr(self, name) < low:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= {low}{meaning}, got {getattr(self, name)}")
        if self.grad_clip < 0 or self.lr < 0 or self.weight_decay < 0:
            raise ConfigError("--lr, --weight-decay and --grad-clip must be >= 0 (--grad-clip 0: no clipping)")
        if self.precision not in PRECISIONS:
            raise ConfigError("--precision must be auto, bf16 or fp32")
        if self.parallel not in PARALLEL_CHOICES:
            raise ConfigError(f"--parallel must be one of {', '.join(PARALLEL_CHOICES)}; got {self.parallel!r}")
        if self.skip_nonfinite_steps < 0:
            raise ConfigError("--skip-nonfinite-steps must be >= 0")
        from kd_pipeline.train import tracking  # torch-free, as this module

        tracking.check(self.report_to)  # a missing tracker package is refused before anything runs
        if not self.save_on_signal_timeout > 0:
            raise ConfigError(f"--save-on-signal-timeout must be > 0 seconds, got {self.save_on_signal_timeout}")
        if self.cross_tokenizer_positions not in xt.DISTILL_POSITIONS:
            raise ConfigError(f"--cross-tokenizer-positions must be one of {', '.join(xt.DISTILL_POSITIONS)}")
        if self.fused_loss and losses.LOSSES[self.loss].needs_logits:
            raise ConfigError(
                f"--loss {self.loss} ranks the student's whole distribution: it needs the logits; drop --fused-loss"
            )
        lora.validate(self)

    def record(self) -> dict:
        """The config as JSON values (what distill_config.json and each checkpoint hold)."""
        record = json.loads(json.dumps(asdict(self), default=str))
        # Storage options may carry credentials: only their keys are recorded.
        record["storage_options"] = [item.split("=", 1)[0] + "=..." for item in self.storage_options]
        return record

    @classmethod
    def field_defaults(cls) -> dict:
        """Each field's default as JSON values (fields without one are left out)."""
        from dataclasses import MISSING

        found = {f.name: f.default for f in fields(cls) if f.default is not MISSING}
        return json.loads(json.dumps(found, default=str))


def cache_values(value) -> list[str]:
    """The ``--cache`` / ``--eval-cache`` config value as a list of strings (one path, URL or ``NAME=PATH`` each); a
    single path (the form before several caches, and what code callers pass) becomes a list of one."""
    if value is None:
        return []
    if isinstance(value, (str, Path)):
        return [str(value)]
    return [str(v) for v in value]
