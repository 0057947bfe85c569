"""Stage two: train a student on a teacher cache, as a recipe over components.

:class:`Recipe` (``distill(cfg)`` runs one) puts together:

- setup: the student (:func:`load_student`), AdamW and the warmup + cosine schedule (:func:`schedule`, a pure
  function of the config and the step), the data (:class:`~train.reader.CacheReader`, one slice per rank), the loss
  (``losses.build_loss``: the recipe never names one) and where the teacher's side of the loss comes from
  (:class:`TeacherSignal`; the cache's columns by default, a live teacher in bench/quality.py), and how the
  cache's batches reach the student (``Recipe.tokens``: as read, or with ``--cross-tokenizer`` re-tokenized by the
  student's own tokenizer, train/cross_tokenizer.py, with :class:`ProjectedTeacher` as the signal);
- the step (:meth:`Recipe.train_step`): forward + loss per micro-batch, backward, clip, optimizer step; a
  non-finite loss or gradient norm stops the run (or is skipped, up to ``--skip-nonfinite-steps``);
- checkpoints (train/checkpoint.py) and the final ``save_pretrained`` folder;
- a parallelism strategy (train/parallel.py, ``--parallel none|ddp|fsdp``) that owns everything distributed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
import weakref
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from kd_pipeline.cache.format.layout import TOKENIZER_DIR
from kd_pipeline.cache.format.lock import hold_lock
from kd_pipeline.cache.format.manifest import LINEAGE_FILE, CacheInfo, load_cache
from kd_pipeline.config import option
from kd_pipeline.errors import CacheError, ConfigError, NonFiniteStep
from kd_pipeline.train import checkpoint, fused, losses, sources
from kd_pipeline.train import cross_tokenizer as xt
from kd_pipeline.train.checkpoint import CHECKPOINT_DIR, latest_checkpoint  # noqa: F401 - re-exported for the benches/tests
from kd_pipeline.train.parallel import PARALLEL_CHOICES, Dist, Strategy, init_processes, make_strategy
from kd_pipeline.train.reader import CacheReader

METRICS_FILE = "metrics.jsonl"
FINAL_DIR = "final"
MEMORY_FILE = "memory.json"
RUN_LOCK = ".distill.lock"


@dataclass
class RunOptions:
    """Stage two's own settings; each field with `option(...)` is also a `pipeline distill` option."""

    student: str = option(
        help="Student: a HF model dir/id with weights, or a config (config.json, or a dir with only a config) to "
        "train from scratch."
    )
    cache: list[str] = option(
        help="Teacher cache written by `pipeline cache-teacher`. Repeat for several teachers, each PATH or NAME=PATH "
        "(NAME names its metrics, e.g. eval_kl/NAME; default the folder's name); see --combine."
    )
    out: Path = option(help="Run directory: checkpoints/, metrics.jsonl, final/ (the student, save_pretrained).")
    cache_weights: str | None = option(
        None,
        "With several --cache: one weight per cache, e.g. 0.3,0.7 (normalized). mixture: the share of trained "
        "tokens drawn from each (default: each cache's share of all trained tokens, one pass each per epoch); "
        "ensemble: each teacher's weight in the combined target (default: equal).",
    )
    combine: str = option(
        "mixture",
        "How several --cache combine. mixture: caches over different data, each batch from one cache with its own "
        "teacher, drawn in proportion to --cache-weights | ensemble: teachers scored on the same token stream, "
        "combined position by position into one target, p = Σ w_i p_i on the union of their top-k "
        "(docs/multi-teacher.md).",
    )
    ensemble_temperature: float | None = option(
        None,
        "With --combine ensemble: per-position weights w_i ∝ weight_i · p_i(true token)^(1/T), trusting the teacher "
        "that knows the token (from each cache's target_logprob); unset: the static --cache-weights.",
    )
    loss: str = option(losses.DEFAULT_LOSS, losses.loss_help())
    batch_size: int = option(8, "Sequences per micro-batch per process.")
    grad_accum: int = option(1, "Micro-batches per optimizer step.")
    lr: float = option(1e-4, "Peak AdamW learning rate.")
    weight_decay: float = option(0.01, "AdamW weight decay (matrices only).")
    adam_betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = option(0, "Linear warmup steps before the cosine decay.")
    max_steps: int | None = option(None, "Optimizer steps to train (overrides --epochs).")
    epochs: float = option(1.0, "Passes over the cache when --max-steps is not given.")
    grad_clip: float = option(1.0, "Clip the global gradient norm (0 disables).")
    precision: str = option("auto", "auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32.")
    gradient_checkpointing: bool = option(False, "Recompute activations in backward to save memory.")
    seed: int = option(0, "Seed of the data order and of a from-scratch student's init.")
    shuffle_rows: int = option(1024, "Shuffle window in sequences (rows of consecutive row groups).")
    save_every: int = option(500, "Checkpoint every N optimizer steps (and at the end).")
    keep_checkpoints: int = option(2, "Complete checkpoints to keep.")
    eval_every: int = option(200, "Evaluate every N optimizer steps (and at the end).")
    eval_sequences: int = option(64, "Sequences held out from the end of the cache for eval (0: none).")
    eval_cache: list[str] | None = option(
        None,
        "Evaluate on this cache instead of a held-out part; repeatable as --cache (each reported as eval_kl/NAME ..., "
        "and pooled); with --combine ensemble, one per teacher over the same stream.",
    )
    eval_at_start: bool = option(True, "Also evaluate the untrained student (step 0): the 'before' of the summary.")
    log_every: int = option(10, "Write metrics every N steps.")
    resume: bool = option(False, "Continue from the latest complete checkpoint in --out.")
    allow_config_change: bool = option(
        False,
        "With --resume: accept options that change training (each difference is listed). The learning-rate "
        "schedule is rebuilt for the new options from the current step; distill_config.json and lineage.json "
        "record what runs.",
    )
    skip_nonfinite_steps: int = option(
        0, "Skip up to N optimizer steps whose loss or gradient norm is not finite (no update); 0: stop at the first."
    )
    allow_vocab_superset: bool = option(
        False, "Accept a student tokenizer that extends the teacher's with the same ids."
    )
    cross_tokenizer: bool = option(
        False,
        "The student keeps its own tokenizer (another vocabulary than the teacher's): each cached sequence's text is "
        "rebuilt from its ids and re-tokenized by the student; where the student's next token starts at the byte "
        "where a teacher token starts (see --cross-tokenizer-positions) the teacher's top-k, moved onto the student "
        "ids that stand for the same bytes (the rest to the tail bin), is the target of --loss; elsewhere the "
        "student gets CE on its own next token. The id map is built once per tokenizer pair, kept in the cache's "
        "vocab_maps/. Compare runs in eval_bpb (bits per byte), not eval_ce (README: A student of another tokenizer).",
    )
    cross_tokenizer_positions: str = option(
        "same-token",
        "With --cross-tokenizer, where the student distills: same-token: where its next token is the teacher's own "
        "next token (the same text from the same byte; better than CE alone in bench/RESULTS.md) | aligned: "
        "wherever the teacher starts a token at the same byte (more positions, but the teacher's alternatives land "
        "on student prefix ids; worse than CE alone in an earlier run).",
    )
    device: str = option("auto", "auto (cuda:LOCAL_RANK if available, else cpu) | cpu | cuda:N.")
    parallel: str = option(
        "auto",
        "auto: ddp under torchrun, else none | none: one process | ddp: every rank holds the whole model | fsdp: "
        "FSDP2, parameters, gradients and optimizer state sharded over the ranks (per decoder layer).",
    )
    progress: bool = option(True, "Show a progress bar.")
    fused_loss: bool = option(
        False,
        "Compute the KD loss from the student's final hidden states in vocabulary chunks, never forming the "
        "[tokens, vocab] logits: far less memory for large vocabularies, the same loss and gradients up to rounding, "
        "one extra hidden-by-vocabulary product per step. Heads that are not a plain linear layer (logit soft-capping "
        "or scaling) fall back to the full-logits loss with a message.",
    )
    trust_remote_code: bool = option(
        False,
        "Allow the student's own model code (auto_map) to run; without it such a student is refused, never asked.",
    )


@dataclass
class DistillConfig(losses.LossOptions, RunOptions):
    """Stage two's settings: the run's (RunOptions) and every registered loss's options (losses.LossOptions:
    temperature, ce_weight and each loss's own, declared by the losses). Bases in this order put the run's fields
    first (dataclass fields follow the reversed MRO), as `pipeline distill --help` lists them."""

    def __post_init__(self) -> None:
        # One path (code callers, configs from before several caches) is a list of one.
        self.cache = sources.cache_values(self.cache)
        self.eval_cache = sources.cache_values(self.eval_cache) or None

    def validate(self) -> None:
        losses.build_loss(self.loss, self)  # raises on an unknown name or an option out of range
        sources.check_options(self)
        for name in ("batch_size", "grad_accum", "save_every", "eval_every", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if self.max_steps is None and self.epochs <= 0:
            raise ConfigError("give --max-steps or a positive --epochs")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError("--precision must be auto, bf16 or fp32")
        if self.parallel not in PARALLEL_CHOICES:
            raise ConfigError(f"--parallel must be one of {', '.join(PARALLEL_CHOICES)}; got {self.parallel!r}")
        if self.skip_nonfinite_steps < 0:
            raise ConfigError("--skip-nonfinite-steps must be >= 0")
        if self.cross_tokenizer_positions not in xt.DISTILL_POSITIONS:
            raise ConfigError(f"--cross-tokenizer-positions must be one of {', '.join(xt.DISTILL_POSITIONS)}")
        if self.fused_loss and losses.LOSSES[self.loss].needs_logits:
            raise ConfigError(
                f"--loss {self.loss} ranks the student's whole distribution: it needs the logits; drop --fused-loss"
            )

    def record(self) -> dict:
        """The config as JSON values (what distill_config.json and each checkpoint hold)."""
        return json.loads(json.dumps(asdict(self), default=str))

    @classmethod
    def field_defaults(cls) -> dict:
        """Each field's default as JSON values (fields without one are left out)."""
        from dataclasses import MISSING

        found = {f.name: f.default for f in fields(cls) if f.default is not MISSING}
        return json.loads(json.dumps(found, default=str))


# -------------------------------------------------------------------------------------------- model
def load_student(spec: str, info: CacheInfo, seed: int, trust_remote_code: bool = False, vocab_size: int | None = None):
    """A pretrained student (dir/id with weights) or a fresh one from a config (dir or .json file); its output layer
    must cover ``vocab_size`` ids (default: the teacher's vocabulary, whose ids the cache holds)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from kd_pipeline.models import load_causal_lm, load_config, loading

    path = Path(spec)
    config = None
    if path.is_file() and path.suffix == ".json":
        raw = json.loads(path.read_text())
        config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    elif path.is_dir() and not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        config = load_config(spec, "--student", trust_remote_code=trust_remote_code)
    if config is None:
        model = load_causal_lm(spec, "--student", dtype=torch.float32, trust_remote_code=trust_remote_code)
    else:
        torch.manual_seed(seed)
        with loading(spec, "--student"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    vocab = model.get_output_embeddings().weight.shape[0]
    needed = info.manifest.tokenizer["vocab_size"] if vocab_size is None else vocab_size
    if vocab < needed:
        whose = "the teacher's" if vocab_size is None else "its tokenizer's"
        raise CacheError(f"student's output layer has {vocab} rows but {whose} vocabulary has {needed} tokens")
    return model


def load_student_tokenizer(spec: str, info: CacheInfo, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    from kd_pipeline.models import check_model_path

    check_model_path(spec, "--student")
    for candidate in (spec, Path(spec).parent if Path(spec).is_file() else None):
        if candidate is None:
            continue
        try:
            return AutoTokenizer.from_pretrained(candidate, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, TypeError) as e:
            if "trust_remote_code" in str(e):  # not "no tokenizer here": a refusal to run its code
                raise CacheError(
                    f"--student {spec}: its tokenizer contains custom code; pass --trust-remote-code to run it"
                ) from None
            continue
    # A student built from a bare config uses the teacher's tokenizer saved with the cache.
    return AutoTokenizer.from_pretrained(info.root / TOKENIZER_DIR)


def schedule(optimizer, cfg: DistillConfig, total_steps: int, step: int = 0):
    """Linear warmup then cosine decay to 0 at ``total_steps``, positioned after ``step`` optimizer steps.

    A pure function of (config, step): a resumed run rebuilds it rather than loading it, so the learning rate at
    step N is always the one the configuration in force says (what --allow-config-change relies on).
    """
    from transformers import get_cosine_schedule_with_warmup

    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.lr
    return get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, total_steps, last_epoch=step - 1)


def make_optimizer(model, cfg: DistillConfig, device: torch.device) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.ndim >= 2]  # matrices decay; norms and biases do not
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=cfg.adam_betas,
        fused=device.type == "cuda",
    )


# ----------------------------------------------------------------------------------- teacher signal
class StudentView(NamedTuple):
    """The student on one micro-batch, at its M trained positions, and what the batch holds there.

    ``logits`` [M, V] fp32, or with the fused loss ``bins`` (train/fused.py: no [M, V] tensor); exactly one is set.
    ``cached``: the cache's teacher columns at those positions (KDBatch; its ``target_ids`` are the true tokens).
    ``input_ids`` [B, L] and ``mask`` [B, L-1] locate the positions, for a teacher that runs on the tokens.
    """

    logits: torch.Tensor | None
    bins: losses.StudentBins | None
    cached: losses.KDBatch
    input_ids: torch.Tensor
    mask: torch.Tensor
    autocast: object


class TeacherSignal:
    """Where the teacher's side of the training loss comes from (eval always scores against the cache).

    The default reads the cache's top-k columns. Another source (a live teacher: bench/quality.py's online dense
    KD) subclasses this and passes itself to ``distill(cfg, teacher=...)``; it may refuse fused student bins with
    ``takes_fused_bins = False`` (it then gets logits).
    """

    takes_fused_bins = True

    def loss(self, loss: losses.DistillLoss, student: StudentView) -> losses.KDLossOutput:
        bins = _student_bins(loss, student)
        return loss(student.cached, student.logits if loss.needs_logits else None, student=bins)


def _student_bins(loss: losses.DistillLoss, student: StudentView) -> losses.StudentBins:
    """The student's bins on the cached support, the student's side of a repeated id emptied: a support that repeats
    an id in its empty columns (an ensemble's union, a projected support) has an empty bin there on both sides
    (:func:`~train.cross_tokenizer.empty_repeats`; a cache's own support has distinct ids and is unchanged)."""
    cached, bins = student.cached, student.bins
    if bins is None:
        bins = losses.student_bins(
            student.logits, cached.support_ids, cached.target_ids, include_target=loss.needs_target_column
        )
    return bins._replace(log_q_support=xt.empty_repeats(bins.log_q_support, cached.support_ids))


CACHED_TEACHER = TeacherSignal()


class ProjectedTeacher(TeacherSignal):
    """The cache's teacher for a student of another tokenizer (``--cross-tokenizer``; batches from
    :class:`train.cross_tokenizer.StudentBatches`): ``loss`` on the projected bins where the student distills
    (``cached.mask``), the student's CE on its own next token at the other trained positions, one mean over all
    (:func:`~train.cross_tokenizer.mixed_loss`). A projected support repeats an id in its empty columns: the
    student's side of those is emptied too (:func:`~train.cross_tokenizer.empty_repeats`)."""

    def loss(self, loss: losses.DistillLoss, student: StudentView) -> losses.KDLossOutput:
        cached = student.cached
        bins = _student_bins(loss, student)
        out = loss(cached, student.logits if loss.needs_logits else None, student=bins)
        ce = losses.cross_entropy(bins.log_q_target)
        total = xt.mixed_loss(out.total, cached.mask.sum(), ce, cached.mask)
        return out._replace(total=total, ce=ce.sum() / max(ce.numel(), 1))  # a batch may train no position


# ------------------------------------------------------------------------------------ the forward
def _teacher_at(batch: dict, input_ids: torch.Tensor, mask: torch.Tensor, device) -> losses.KDBatch:
    """The cache's teacher data at the M trained positions (``mask``) of the batch. A student of another tokenizer
    (train/cross_tokenizer.py's batches) distills only at ``distill_mask``, on bins whose tail is ``p_rest``, and
    has the teacher's own top-k in ``teacher_topk_logprobs``; a cache's batch distills at every trained position."""

    def at(key: str) -> torch.Tensor | None:
        return batch[key].to(device, non_blocking=True)[mask] if key in batch else None

    support_ids = at("topk_ids").long()  # the reader keeps int32
    distill = at("distill_mask")
    return losses.KDBatch(
        support_ids=support_ids,
        teacher_logprobs=at("topk_logprobs"),
        mask=torch.ones(support_ids.shape[0], dtype=torch.bool, device=device) if distill is None else distill,
        target_ids=input_ids[:, 1:][mask],
        teacher_target_logprob=at("target_logprob"),
        p_rest=at("p_rest"),
        teacher_own_logprobs=at("teacher_topk_logprobs"),
    )


def student_view(
    model, batch: dict, device, autocast, *, fused_bins: bool = False, include_target: bool = False
) -> StudentView:
    """Forward the student on one batch: :class:`StudentView` with logits, or fused bins (``fused_bins``; plus the
    true token as an extra column with ``include_target``, for losses that need it). A student whose head does not
    split off gets logits (with one message), see :func:`_on_fused_path`."""
    input_ids = batch["input_ids"].to(device, non_blocking=True)
    mask = batch["target_mask"].to(device, non_blocking=True)
    cached = _teacher_at(batch, input_ids, mask, device)
    if fused_bins:
        head = _on_fused_path(model, lambda verify: _head_inputs(model, input_ids, mask, autocast, verify))
        if head is not None:
            with autocast:  # the head's products then run in the autocast dtype, as the model's own head would
                bins = fused.fused_student_bins(
                    head.hidden,
                    head.weight,
                    cached.support_ids,
                    cached.target_ids,
                    bias=head.bias,
                    include_target=include_target,
                )
            return StudentView(None, bins, cached, input_ids, mask, autocast)
    with autocast:
        logits = model(input_ids=input_ids[:, :-1], use_cache=False).logits
    # Only trained positions enter the loss: padding and prompt tokens cost no loss compute.
    return StudentView(logits[mask].float(), None, cached, input_ids, mask, autocast)


def _head_inputs(model, input_ids, mask, autocast, verify: bool) -> fused.HeadInputs:
    """What the student's output layer sees at the M trained positions: (hidden [M, d], W, b)."""
    with autocast:
        head = fused.lm_head_inputs(model, verify=verify, input_ids=input_ids[:, :-1], use_cache=False)
    return head._replace(hidden=head.hidden[mask])


# Per student: whether its head splits off for the fused loss (absent: not tried yet). Decided on the first fused
# forward, which also checks the numbers; a refusal is printed once and the logits path serves from then on.
_FUSED_HEAD_OK: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _on_fused_path(model, run):
    """``run(verify_head)`` if the student's head splits off, else None (the caller takes the logits path)."""
    key = getattr(model, "module", model)
    ok = _FUSED_HEAD_OK.get(key)
    if ok is False:
        return None
    try:
        result = run(ok is None)
    except fused.UnsplittableHead as error:
        _FUSED_HEAD_OK[key] = False
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"--fused-loss: {error}; falling back to the full-logits loss", file=sys.stderr, flush=True)
        return None
    _FUSED_HEAD_OK[key] = True
    return result


def batch_losses(
    model,
    batch: dict,
    cfg: DistillConfig,
    loss: losses.DistillLoss,
    device,
    autocast,
    teacher: TeacherSignal = CACHED_TEACHER,
) -> losses.KDLossOutput:
    """Forward the student on one batch; return ``loss``'s training loss and its parts, against ``teacher``."""
    view = student_view(
        model,
        batch,
        device,
        autocast,
        fused_bins=cfg.fused_loss and teacher.takes_fused_bins,
        include_target=loss.needs_target_column,
    )
    return teacher.loss(loss, view)


# ------------------------------------------------------------------------------------------- eval
# Eval on the fused path forms logits for blocks of positions of at most this many floats (256 MB in fp32).
EVAL_BLOCK_ELEMENTS = 1 << 26


def _eval_blocks(model, batch: dict, device, autocast, fused_loss: bool):
    """``(logits, teacher, target_bytes)`` pieces of one eval batch: the whole batch, or with ``fused_loss`` blocks
    of positions whose logits are formed from the head's inputs one block at a time (eval then never holds [M, V]
    either). ``target_bytes`` [M] (None if the batch has none): the bytes of text each target stands for."""
    input_ids = batch["input_ids"].to(device, non_blocking=True)
    mask = batch["target_mask"].to(device, non_blocking=True)
    teacher = _teacher_at(batch, input_ids, mask, device)
    n_bytes = batch["target_bytes"].to(device)[mask] if "target_bytes" in batch else None
    head = None
    if fused_loss:
        head = _on_fused_path(model, lambda verify: _head_inputs(model, input_ids, mask, autocast, verify))
    if head is None:
        with autocast:
            logits = model(input_ids=input_ids[:, :-1], use_cache=False).logits
        yield logits[mask].float(), teacher, n_bytes
        return
    columns = {f.name: getattr(teacher, f.name) for f in fields(teacher)}
    rows = max(1, EVAL_BLOCK_ELEMENTS // head.weight.shape[0])
    for start in range(0, head.hidden.shape[0], rows):
        block = slice(start, start + rows)
        with autocast:  # the very product the model's head computes, for these positions only
            logits = torch.nn.functional.linear(head.hidden[block], head.weight, head.bias)
        in_block = replace(teacher, **{k: v[block] for k, v in columns.items() if v is not None})
        yield logits.float(), in_block, None if n_bytes is None else n_bytes[block]


@torch.no_grad()
def evaluate(
    model,
    reader: CacheReader,
    device,
    autocast,
    d: Dist,
    fused_loss: bool = False,
    lockstep: bool = False,
    tokens=xt.CachedTokens(None),
) -> dict:
    """Eval CE on the true tokens, bits per byte of the text they stand for, KL(teacher‖student) on the k+1 bins
    and its cross-entropy form (soft CE = KL + the teacher's entropy on the bins), top-1 agreement; token-weighted,
    whatever the training loss.

    ``tokens``: the reader's batches as the student sees them (:class:`train.cross_tokenizer.CachedTokens` or, for
    a student of another tokenizer, :class:`~train.cross_tokenizer.StudentBatches`); CE and bits per byte are over
    every trained target, KL, soft CE and top-1 over those with teacher signal (``eval_kd_tokens``; all of them
    with the teacher's tokenizer). ``eval_bpb``: total CE in bits over the bytes of text the targets stand for,
    the figure that compares students of different tokenizers (absent where ``tokens`` gives no bytes).
    ``fused_loss``: bound the memory as the fused training loss does (the same numbers, up to rounding).
    ``lockstep``: every rank runs as many forwards as the rank with the most eval batches (FSDP's forwards are
    collectives); the extra ones are on one dummy token and count nothing.
    """
    model.eval()
    totals = torch.zeros(7, dtype=torch.float64, device=device)  # nll, kl, soft_ce, agree, tokens, kd tokens, bytes
    has_bytes = True
    forwards = 0
    for batch in reader.iter_epoch(0):
        batch = tokens(batch)
        forwards += 1
        for logits, teacher, n_bytes in _eval_blocks(model, batch, device, autocast, fused_loss):
            n = logits.shape[0]
            if n == 0:
                continue
            bins = losses.student_bins(logits, teacher.support_ids, teacher.target_ids)
            # A cache's support has distinct ids (this changes nothing); a projected one repeats ids in empty columns.
            bins = bins._replace(log_q_support=xt.empty_repeats(bins.log_q_support, teacher.support_ids))
            fit = losses.fit_terms(bins, teacher)
            kd = teacher.mask.sum()
            agree = ((logits.argmax(-1) == teacher.support_ids[:, 0]) & teacher.mask).sum()
            has_bytes = has_bytes and n_bytes is not None
            totals += torch.stack(
                [
                    losses.cross_entropy(bins.log_q_target).sum(),
                    fit.kl * kd,
                    fit.soft_ce * kd,
                    agree,
                    torch.tensor(n, device=device),
                    kd,
                    n_bytes.sum() if n_bytes is not None else torch.tensor(0, device=device),
                ]
            ).double()
    if lockstep:
        most = d.all_reduce(torch.tensor([forwards], device=device), op=torch.distributed.ReduceOp.MAX)
        for _ in range(int(most.item()) - forwards):
            with autocast:
                model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=False)
    d.all_reduce(totals)
    model.train()
    nll, kl, soft_ce, agree, n, n_kd, n_bytes = totals.tolist()
    out = {
        "eval_ce": nll / max(n, 1.0),
        "eval_kl": kl / max(n_kd, 1.0),
        "eval_soft_ce": soft_ce / max(n_kd, 1.0),
        "eval_top1": agree / max(n_kd, 1.0),
        "eval_tokens": int(n),
        "eval_kd_tokens": int(n_kd),
    }
    if has_bytes:
        out["eval_bpb"] = xt.bits_per_byte(nll, n_bytes)
        out["eval_bytes"] = int(n_bytes)  # pooling several eval sets (train/sources.py) weighs bits per byte by it
    return out


# -------------------------------------------------------------------------------------- resuming
# Options that do not change what is trained (where output goes, how often to log, which machinery runs it).
RESUME_FREE = frozenset(
    {
        "out",
        "resume",
        "progress",
        "device",
        "log_every",
        "eval_every",
        "eval_cache",
        "eval_at_start",
        "save_every",
        "keep_checkpoints",
        "parallel",
        "fused_loss",
        "allow_config_change",
        "skip_nonfinite_steps",
        "allow_vocab_superset",
    }
)
# Options a run cannot change midway: they fix the student, the data or its order.
RESUME_FIXED = frozenset(
    {
        "student",
        "cache",
        "cache_weights",
        "combine",
        "seed",
        "batch_size",
        "shuffle_rows",
        "eval_sequences",
        "cross_tokenizer",
    }
)


def config_differences(saved: dict, now: dict) -> tuple[list[str], list[str]]:
    """(differences --allow-config-change may accept, differences no resume can take), one line each."""
    allowed, fixed = [], []
    defaults = DistillConfig.field_defaults()
    for name in sorted(set(saved) | set(now)):
        if name in RESUME_FREE:
            continue
        old, new = (
            saved.get(name, defaults.get(name)),
            now.get(name),
        )  # an option newer than the checkpoint: its default
        if name == "cache":
            old, new = sources.comparable(old), sources.comparable(new)
        elif name == "student" and old is not None and new is not None and Path(old).exists():
            old, new = str(Path(old).resolve()), str(Path(new).resolve())
        if old == new:
            continue
        line = f"--{name.replace('_', '-')}: {old} in the checkpoint, {new} now"
        if name in ("max_steps", "epochs"):
            line += (
                " (the cosine schedule was built for the checkpoint's length and reaches learning rate 0 at its end; "
                "--allow-config-change rebuilds it for the new length from the current step)"
            )
        (fixed if name in RESUME_FIXED else allowed).append(line)
    return allowed, fixed


# ------------------------------------------------------------------------------------------ recipe
class Recipe:
    """One distill run: :meth:`setup`, then :meth:`run` (the loop over :meth:`train_step`, evals, checkpoints)."""

    def __init__(self, cfg: DistillConfig, teacher: TeacherSignal | None = None):
        cfg.validate()
        self.cfg = cfg
        self.teacher = teacher or CACHED_TEACHER

    # ------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        _quiet_transformers()
        d, self.device = init_processes(cfg.device)
        self.strategy: Strategy = make_strategy(cfg.parallel, d, self.device)
        self.d = d
        self.info = info = load_cache(sources.parse_caches(cfg.cache)[0].path)  # the first cache's tokenizer and vocab
        self.tokenizer = load_student_tokenizer(cfg.student, info, cfg.trust_remote_code)
        self._setup_data()
        if self.reader.samples_per_rank < cfg.batch_size:
            _log(
                d,
                f"warning: --batch-size {cfg.batch_size} is more than the {self.reader.samples_per_rank} training "
                f"sequences per process in {cfg.cache}: every batch holds {self.reader.samples_per_rank} sequences "
                "(the metrics and tokens/s count the tokens actually trained)",
            )
        self.steps_per_epoch = max(1, self.reader.batches_per_epoch // cfg.grad_accum)
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.steps_per_epoch))

        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        student_vocab = len(self.tokenizer) if cfg.cross_tokenizer else None
        model = load_student(cfg.student, info, cfg.seed, cfg.trust_remote_code, student_vocab).to(self.device)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.config.use_cache = False
        model.train()
        use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        self.autocast = torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=use_bf16)
        self.model = self.strategy.wrap(model, bf16=use_bf16)
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        self.loss = losses.build_loss(cfg.loss, cfg)
        self.step, self.skipped, self.tokens_seen, self.config_changes = 0, 0, 0, []
        self.before: dict | None = None

    def _setup_data(self) -> None:
        """The batch source (``self.reader``: one cache, a mixture or an ensemble, train/sources.py, its batches as
        the student sees them), the eval sets, and where the teacher signal comes from: the cache's columns, or with
        --cross-tokenizer the projected teacher (each cache re-tokenized by the student through its own map)."""
        cfg, d = self.cfg, self.d
        if cfg.cross_tokenizer and self.teacher is not CACHED_TEACHER:
            raise CacheError(
                "--cross-tokenizer distills the cache's teacher; this run was given another teacher signal"
            )
        self.data = sources.open_run_data(cfg, self.tokenizer, d.rank, d.world_size, self.device, lambda m: _log(d, m))
        if self.data.projected:
            self.teacher = ProjectedTeacher()
        self.reader = self.data.train
        self.tokens = xt.CachedTokens(None)  # the batch source hands out batches as the student sees them
        self.eval_sets = self.data.eval_sets

    def resume(self) -> None:
        """Continue from the newest usable checkpoint, after comparing its configuration with this one."""
        cfg, d = self.cfg, self.d
        restored = checkpoint.load_latest(cfg.out, self.strategy, self.model, self.optimizer)
        if restored is None:
            _log(d, f"--resume: no complete checkpoint in {cfg.out / CHECKPOINT_DIR}; starting from scratch")
            return
        allowed, fixed = config_differences(restored.config, cfg.record())
        if fixed:
            raise CacheError(
                f"cannot resume {restored.path} with these changes: "
                + "; ".join(fixed + allowed)
                + ". They fix the student, the data or its order; start a new run (another --out)."
            )
        if allowed and not cfg.allow_config_change:
            raise CacheError(
                f"--resume: the configuration differs from {restored.path}'s, in ways that change training: "
                + "; ".join(allowed)
                + ". Resume with the checkpoint's options, or pass --allow-config-change."
            )
        state = restored.trainer_state
        self.step = int(state["step"])
        self.skipped = int(state.get("skipped", 0))
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.config_changes = list(state.get("config_changes", []))
        if allowed:
            self.config_changes.append({"step": self.step, "changes": allowed})
            _log(d, "warning: --allow-config-change: from step " + f"{self.step}: " + "; ".join(allowed))
        if restored.world_size != d.world_size:
            _log(
                d,
                f"warning: the checkpoint was written by {restored.world_size} ranks, this run has "
                f"{d.world_size}: parameters and optimizer state reshard exactly; the global batch is now "
                f"{cfg.batch_size * cfg.grad_accum * d.world_size} sequences, and the data continues at the same "
                "epoch after as many sequences as were consumed (each rank read a contiguous slice of the epoch's "
                "order, so the split of the rest differs)",
            )
        self.reader.load_state_dict(state["reader"], reshard=True)
        if state.get("loss_name", cfg.loss) == cfg.loss:
            self.loss.load_state_dict(state.get("loss") or {})
        self.before = state.get("before")
        _log(d, f"resumed from {restored.path} at step {self.step}")

    # -------------------------------------------------------------------------------------- step
    def train_step(self, batches) -> dict | None:
        """One optimizer step over ``grad_accum`` micro-batches; the rank-averaged numbers, or None if skipped."""
        cfg, d, strategy, model = self.cfg, self.d, self.strategy, self.model
        accum = cfg.grad_accum
        # total, kd, ce, kl, soft_ce; trained tokens; a non-finite loss per micro-batch; a non-finite gradient norm
        sums = torch.zeros(6 + accum + 1, dtype=torch.float64, device=self.device)
        for micro in range(accum):
            batch = self.tokens(next(batches))
            with strategy.accumulating(model, last=micro == accum - 1):
                parts = batch_losses(model, batch, cfg, self.loss, self.device, self.autocast, self.teacher)
                (parts.total / accum).backward()
            values = torch.stack([parts.total.detach(), parts.kd.detach(), parts.ce.detach(), parts.kl, parts.soft_ce])
            sums[:5] += values.double()
            sums[5] += batch["target_mask"].sum().item()
            sums[6 + micro] = (~torch.isfinite(values[0])).double()
        grad_norm = strategy.clip_grad_norm(model, cfg.grad_clip)
        sums[-1] = (~torch.isfinite(grad_norm)).double()
        d.all_reduce(sums)  # one collective per step: the losses, every rank's true token count and verdict
        if sums[6:].any():
            self._nonfinite(sums[6:-1], bool(sums[-1]), float(sums[0]))
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_value, kd, ce, kl, soft_ce = (float(x) for x in sums[:5] / (accum * d.world_size))
        # Once per optimizer step, on the rank-averaged value: every rank's loss state agrees.
        self.loss.optimizer_step(kd, self.step, self.total_steps)  # step = optimizer steps completed before this one
        self.step += 1
        tokens = int(sums[5])  # short batches and chat masks counted as they are
        self.tokens_seen += tokens
        return {
            "step": self.step,
            "loss": loss_value,
            "kd": kd,
            "ce": ce,
            "kl": kl,
            "soft_ce": soft_ce,
            **self.loss.metrics(),
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm),
            "epoch": self.reader.epoch,
            "tokens": tokens,
        }

    def _nonfinite(self, bad_micro: torch.Tensor, bad_norm: bool, loss_sum: float) -> None:
        cfg = self.cfg
        where = [str(i + 1) for i, bad in enumerate(bad_micro.tolist()) if bad]
        what = (
            f"non-finite loss ({loss_sum}) in micro-batch {', '.join(where)} of {cfg.grad_accum}"
            if where
            else "non-finite gradient norm"
        )
        if self.skipped < cfg.skip_nonfinite_steps:
            self.skipped += 1
            _log(
                self.d,
                f"warning: step {self.step + 1}: {what}; skipped without an update "
                f"({self.skipped} of --skip-nonfinite-steps {cfg.skip_nonfinite_steps})",
            )
            return
        last = latest_checkpoint(cfg.out)
        kept = (
            f"the last good checkpoint is {last} (--resume continues from it)"
            if last
            else "no checkpoint was written yet"
        )
        raise NonFiniteStep(
            f"step {self.step + 1}: {what}; stopped before the optimizer update, nothing saved past step {self.step}; "
            f"{kept}. Check the cache (`pipeline verify`) and the learning rate, or pass --skip-nonfinite-steps N."
        )

    # --------------------------------------------------------------------------------- evaluation
    def evaluate(self) -> dict:
        # The unwrapped student where its forward needs no collective (DDP's broadcasts buffers: ranks with unequal
        # eval batches would hang); FSDP's forward gathers parameters, so there every rank runs as many.
        # Several eval sets (one per cache; an ensemble's combined target too): per source and pooled.
        return sources.pooled(
            {
                ev.name: evaluate(
                    self.strategy.inner(self.model),
                    ev.reader,
                    self.device,
                    self.autocast,
                    self.d,
                    fused_loss=self.cfg.fused_loss,
                    lockstep=self.strategy.lockstep_forwards,
                    tokens=ev.tokens,
                )
                for ev in self.eval_sets
            }
        )

    # ----------------------------------------------------------------------------------- saving
    def trainer_state(self) -> dict:
        return {
            "step": self.step,
            "reader": self.reader.state_dict(),
            "loss_name": self.cfg.loss,
            "loss": self.loss.state_dict(),
            "total_steps": self.total_steps,
            "skipped": self.skipped,
            "tokens_seen": self.tokens_seen,
            "config_changes": self.config_changes,
            "before": self.before,
        }

    def save_checkpoint(self) -> Path:
        cfg = self.cfg
        return checkpoint.save(
            cfg.out,
            self.step,
            self.strategy,
            self.model,
            self.optimizer,
            self.trainer_state(),
            cfg.record(),
            cfg.keep_checkpoints,
        )

    def save_final(self) -> Path:
        """The student as a save_pretrained folder with its tokenizer and lineage, under final/ (atomically)."""
        cfg, d = self.cfg, self.d
        final, tmp = cfg.out / FINAL_DIR, cfg.out / f".{FINAL_DIR}.tmp"
        if d.main:
            shutil.rmtree(tmp, ignore_errors=True)
        self.strategy.save_pretrained(self.model, tmp)  # every rank: FSDP gathers the full weights
        if d.main:
            self.tokenizer.save_pretrained(tmp)
            lineage = {  # read by cache-teacher when this model teaches the next one (teacher-assistant chains)
                "student": cfg.student,
                "cache": str(self.data.teachers[0].spec.path.resolve()),
                "cache_fingerprint": self.info.fingerprint(),
                "cache_teacher": self.info.manifest.teacher,
                "cache_lineage": self.info.manifest.lineage,
                "teachers": self.data.lineage(),  # every cache and its weight (the fields above: the first's)
                "combine": cfg.combine,
                "loss": cfg.loss,
                "steps": self.step,
                "run_dir": str(Path(cfg.out).resolve()),
                "config": cfg.record(),
                "config_changes": self.config_changes,
            }
            (tmp / LINEAGE_FILE).write_text(json.dumps(lineage, indent=1, sort_keys=True) + "\n")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        d.barrier()
        return final

    def _record_memory(self) -> None:
        """Per-rank parameter and optimizer-state bytes (local shards under FSDP), to memory.json and the console."""
        ranks = self.d.all_gather_objects(self.strategy.local_bytes(self.model, self.optimizer))
        if not self.d.main:
            return
        record = {"strategy": self.strategy.name, "world_size": self.d.world_size, "ranks": ranks}
        (self.cfg.out / MEMORY_FILE).write_text(json.dumps(record, indent=1) + "\n")
        mb = max(r["parameter_bytes"] for r in ranks) / 2**20, max(r["optimizer_bytes"] for r in ranks) / 2**20
        _log(
            self.d,
            f"{self.strategy.name} on {self.d.world_size} process(es): {mb[0]:.2f} MiB of parameters and "
            f"{mb[1]:.2f} MiB of optimizer state per rank",
        )

    # ------------------------------------------------------------------------------------- the run
    def run(self) -> dict:
        cfg = self.cfg
        self.setup()
        d, out = self.d, cfg.out
        if cfg.resume:
            self.resume()
        elif d.main and out.exists() and (out / METRICS_FILE).exists():
            raise CacheError(f"{out} already holds a run; pass --resume to continue it or choose a new --out")
        self.scheduler = schedule(self.optimizer, cfg, self.total_steps, self.step)
        if d.main:
            out.mkdir(parents=True, exist_ok=True)
            _truncate_metrics(out / METRICS_FILE, self.step)  # drop what a killed run logged past its checkpoint
            (out / "distill_config.json").write_text(json.dumps(cfg.record(), indent=1))  # what runs from here
        d.barrier()

        metrics_file = open(out / METRICS_FILE, "a") if d.main else None
        batches = iter(self.reader)
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc=f"distill {cfg.loss}",
            unit="step",
            disable=not (cfg.progress and d.main),
            dynamic_ncols=True,
        )
        started, start_step = time.perf_counter(), self.step
        window_start, window_tokens, window_steps = started, 0, 0
        last: dict = {}
        try:
            if self.eval_sets and cfg.eval_at_start and self.step == 0:
                self.before = {"step": 0, **self.evaluate()}
                _write_metrics(metrics_file, self.before)
                _log(d, "step 0 (before training): " + _eval_line(self.before))
            while self.step < self.total_steps:
                record = self.train_step(batches)
                if record is None:
                    continue
                if self.step == start_step + 1:
                    self._record_memory()
                step = self.step
                bar.update(1)
                window_tokens += record["tokens"]
                window_steps += 1
                if step % cfg.log_every == 0 or step == self.total_steps:
                    elapsed = max(time.perf_counter() - window_start, 1e-9)
                    last = {
                        **record,
                        "tokens": window_tokens,
                        "tokens_seen": self.tokens_seen,
                        "tokens_per_s": window_tokens / elapsed,
                        "seconds_per_step": elapsed / window_steps,
                    }
                    window_start, window_tokens, window_steps = time.perf_counter(), 0, 0
                    shown = ("loss", *self.loss.metrics(), "tokens_per_s")
                    bar.set_postfix(
                        {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in last.items() if k in shown}
                    )
                    _write_metrics(metrics_file, last)
                if self.eval_sets and (step % cfg.eval_every == 0 or step == self.total_steps):
                    ev = {"step": step, **self.evaluate()}
                    last.update(ev)
                    _write_metrics(metrics_file, ev)
                    if d.main:
                        bar.write(f"step {step}: " + _eval_line(ev))
                if step % cfg.save_every == 0 and step < self.total_steps:
                    self.save_checkpoint()
        finally:
            batches.close()  # stops and joins the reader's prefetch thread before anything else can end the process
            bar.close()
            if metrics_file:
                metrics_file.close()
        self.save_checkpoint()
        final = self.save_final()
        _log(d, f"saved the student to {final}")
        _log(d, self.summary(last, time.perf_counter() - started, self.step - start_step))
        return last

    def summary(self, last: dict, seconds: float, steps_run: int) -> str:
        """The run's story in a few lines: before -> after on the eval set, tokens seen, time."""
        lines = [
            f"done: {self.step} steps ({steps_run} in this process), {self.tokens_seen:,} trained tokens seen, "
            f"{seconds:.1f} s" + (f", {self.skipped} non-finite steps skipped" if self.skipped else "")
        ]
        if "eval_kl" in last:
            names = (("eval_ce", "eval CE"), ("eval_bpb", "bits/byte"), ("eval_kl", "KL"), ("eval_top1", "top-1"))
            before = self.before or {}
            parts = [
                f"{label} {before[key]:.4f} -> {last[key]:.4f}" if key in before else f"{label} {last[key]:.4f}"
                for key, label in names
                if key in last
            ]
            lines.append("eval (before -> after): " + ", ".join(parts))
        return "\n".join(lines)


def distill(cfg: DistillConfig, teacher: TeacherSignal | None = None) -> dict:
    """Train the student; returns the last logged metrics. Writes checkpoints, metrics.jsonl and final/.

    ``teacher``: where the teacher's side of the training loss comes from (default: the cache's columns).
    One run per --out: a second is refused while the first runs (cache/format/lock.py).
    """
    main = int(os.environ.get("RANK", "0")) == 0
    with hold_lock(Path(cfg.out) / RUN_LOCK, f"run {cfg.out}") if main else contextlib.nullcontext():
        return Recipe(cfg, teacher).run()


# ------------------------------------------------------------------------------------------ helpers
def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its per-save "Writing model shards" bars would interleave with ours


def _eval_line(ev: dict) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in ev.items() if isinstance(v, float))


def _truncate_metrics(path: Path, step: int) -> None:
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _write_metrics(f, record: dict) -> None:
    if f is not None:
        f.write(json.dumps(record) + "\n")
        f.flush()


def _log(d: Dist, message: str) -> None:
    if d.main:
        print(message, file=sys.stderr, flush=True)
