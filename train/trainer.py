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
from dataclasses import fields, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from kd_pipeline.cache.format.layout import TOKENIZER_DIR
from kd_pipeline.cache.format.lock import hold_lock
from kd_pipeline.cache.format.manifest import LINEAGE_FILE, CacheInfo, load_cache
from kd_pipeline.cache.format.storage import is_url, parse_storage_options
from kd_pipeline.config import CONFIG_FILE, save_config
from kd_pipeline.errors import CacheError, NonFiniteStep, TrainingError
from kd_pipeline.signals import command_line, launcher_prefix
from kd_pipeline.train import checkpoint, fused, lora, losses, preemption, sources, tracking
from kd_pipeline.train import cross_tokenizer as xt
from kd_pipeline.train.checkpoint import CHECKPOINT_DIR, latest_checkpoint  # noqa: F401 - re-exported for the benches/tests
from kd_pipeline.train.config import DistillConfig, RunOptions  # noqa: F401 - RunOptions re-exported
from kd_pipeline.train.metrics import METRICS_FILE, read_metrics
from kd_pipeline.train.parallel import Dist, Strategy, init_processes, make_strategy
from kd_pipeline.train.reader import CacheReader

FINAL_DIR = "final"
MEMORY_FILE = "memory.json"
RUN_LOCK = ".distill.lock"


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
    return AutoTokenizer.from_pretrained(info.store.local_dir(TOKENIZER_DIR))


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
    trained = [p for p in model.parameters() if p.requires_grad]  # a LoRA student's base weights are frozen
    decay = [p for p in trained if p.ndim >= 2]  # matrices decay; norms and biases do not
    no_decay = [p for p in trained if p.ndim < 2]
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
        "allow_eval_teacher_mismatch",
        "merge_lora",
        "save_on_signal_timeout",
        "report_to",
        "run_name",
        "tracker_dir",
        "storage_options",
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
    | lora.PARAMETER_OPTIONS
    | {"lora_alpha"}
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
        elif name == "student" and old is not None and new is not None and not is_url(old) and Path(old).exists():
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
        # the first cache's tokenizer and vocabulary (every cache is loaded and checked by sources.open_run_data)
        first = sources.parse_caches(cfg.cache)[0].path
        self.info = info = load_cache(first, storage_options=parse_storage_options(cfg.storage_options))
        self.tokenizer = load_student_tokenizer(cfg.student, info, cfg.trust_remote_code)
        self._setup_data()
        if self.reader.samples_per_rank < cfg.batch_size:
            _log(
                d,
                f"warning: --batch-size {cfg.batch_size} is more than the {self.reader.samples_per_rank} training "
                f"sequences per process in {', '.join(cfg.cache)}: every batch holds {self.reader.samples_per_rank} sequences "
                "(the metrics and tokens/s count the tokens actually trained)",
            )
        self.steps_per_epoch = max(1, self.reader.batches_per_epoch // cfg.grad_accum)
        self.total_steps = (
            cfg.max_steps if cfg.max_steps is not None else max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        )

        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        student_vocab = len(self.tokenizer) if cfg.cross_tokenizer else None
        model = load_student(cfg.student, info, cfg.seed, cfg.trust_remote_code, student_vocab).to(self.device)
        model = lora.wrap_student(model, cfg, lambda message: _log(d, message))
        if cfg.gradient_checkpointing:
            # transformers 5 renamed it (the old name warns); the new one also lets a frozen base pass gradients on
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
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
        self.data = sources.open_run_data(
            cfg, self.tokenizer, d.rank, d.world_size, self.device, lambda m: _log(d, m), loaded=[self.info]
        )
        if self.data.projected:
            self.teacher = ProjectedTeacher()
        self.reader = self.data.train
        self.tokens = xt.CachedTokens(None)  # the batch source hands out batches as the student sees them
        self.eval_sets = self.data.eval_sets

    def resume(self) -> None:
        """Continue from the newest usable checkpoint, after comparing its configuration with this one."""
        cfg, d = self.cfg, self.d
        self._refuse_other_parameters(latest_checkpoint(cfg.out))
        restored = checkpoint.load_latest(cfg.out, self.strategy, self.model, self.optimizer)
        if restored is None:
            _log(d, f"--resume: no complete checkpoint in {cfg.out / CHECKPOINT_DIR}; starting from scratch")
            return
        saved, moved = self._moved_cache(restored)
        allowed, fixed = config_differences(saved, cfg.record())
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
        if moved:
            self.config_changes.append({"step": self.step, "changes": [moved]})
            _log(d, f"note: {moved}")
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

    def _moved_cache(self, restored) -> tuple[dict, str | None]:
        """The checkpoint's config to compare with this run's, and a line if ``--cache`` moved: a cache at another
        path whose content fingerprint (identity and shard checksums) is the checkpoint's is the same cache."""
        saved, now = restored.config, self.cfg.record()
        old = saved.get("cache")
        if old is None or sources.comparable(old) == sources.comparable(now["cache"]):
            return saved, None
        reader = restored.trainer_state.get("reader", {})
        # A run of one cache records its reader's fingerprint (a mixture: each reader's, in --cache order).
        recorded = [r.get("cache_fingerprint") for r in reader.get("readers", [reader])]
        if recorded != [t.info.fingerprint() for t in self.data.teachers]:
            return saved, None  # other caches: the config comparison refuses them
        where = ", ".join(sources.cache_values(old)), ", ".join(now["cache"])
        moved = f"--cache moved from {where[0]} to {where[1]}, the same content (fingerprint {', '.join(recorded)})"
        return {**saved, "cache": now["cache"]}, moved

    def _refuse_other_parameters(self, newest: Path | None) -> None:
        """Name the options before loading when the newest checkpoint holds another set of parameters (full
        fine-tuning against LoRA, other adapters): its state would not load, and DCP's error names no option."""
        if newest is None:
            return
        try:
            saved = checkpoint.read_config(newest)
        except (OSError, ValueError):
            return  # a damaged checkpoint: load_latest says so and falls back
        now = self.cfg.record()
        changed = [
            f for f in sorted(lora.PARAMETER_OPTIONS) if saved.get(f, DistillConfig.field_defaults().get(f)) != now[f]
        ]
        if changed:
            raise CacheError(
                f"cannot resume {newest}: "
                + "; ".join(f"--{f.replace('_', '-')}: {saved.get(f)} in the checkpoint, {now[f]} now" for f in changed)
                + ". These options decide which parameters the student trains; start a new run (another --out)."
            )

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
        ev = sources.pooled(
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
        if ev["eval_tokens"] == 0:  # summed over the ranks: every rank stops here together
            source = (
                ", ".join(self.cfg.eval_cache or [])
                or f"the last {self.cfg.eval_sequences} sequences of {', '.join(self.cfg.cache)}"
            )
            raise TrainingError(
                f"the eval set ({source}) holds no trained target: its numbers would all read 0. Give "
                "--eval-sequences more sequences, another --eval-cache, or --eval-sequences 0 for no eval."
            )
        return ev

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
        folders = [tmp, *lora.save_merged(self.strategy, self.model, tmp, cfg)]
        if d.main:
            for folder in folders:
                self.tokenizer.save_pretrained(folder)
            lineage = {  # read by cache-teacher when this model teaches the next one (teacher-assistant chains)
                "student": cfg.student,
                "cache": sources.located(self.data.teachers[0].spec.path),
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
            for folder in folders:
                (folder / LINEAGE_FILE).write_text(json.dumps(lineage, indent=1, sort_keys=True) + "\n")
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
            save_config(
                replace(cfg, resume=False, storage_options=[]), out / CONFIG_FILE, "distill"
            )  # --config file that reruns it
        d.barrier()

        metrics_file = None
        if d.main:  # metrics.jsonl and the trackers (rank 0 only)
            metrics_file = tracking.MetricsLog(
                out / METRICS_FILE,
                cfg.report_to,
                cfg.run_name or out.resolve().name,
                cfg.record(),
                cfg.tracker_dir or out,
                resume_step=self.step if self.step > 0 else None,
            )
        stop = preemption.TrainingStop(d, self.device, cfg.save_on_signal_timeout, self._kept).start()
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
        trained_here = 0  # targets this process trained on: a stream that trains none is an error, not a zero
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
                trained_here += record["tokens"]
                if not trained_here and step - start_step >= min(self.steps_per_epoch, self.total_steps - start_step):
                    raise TrainingError(
                        f"{step - start_step} steps (an epoch, or the whole run) trained no target: the batches from "
                        f"{', '.join(cfg.cache)} have no trained position."
                    )
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
                    if not cfg.progress:  # batch jobs: a line per --log-every steps instead of the bar
                        _log(d, f"step {step}/{self.total_steps}: " + _train_line(last, shown))
                if stop.requested():  # every rank, once per step: the same answer on all of them
                    saved = self.save_checkpoint()
                    resume = launcher_prefix() + command_line("distill", cfg, resume=True)
                    raise stop.stopped(saved, step, self.total_steps, resume)
                if self.eval_sets and (step % cfg.eval_every == 0 or step == self.total_steps):
                    ev = {"step": step, **self.evaluate()}
                    last.update(ev)
                    _write_metrics(metrics_file, ev)
                    if d.main:
                        bar.write(f"step {step}: " + _eval_line(ev))
                if step % cfg.save_every == 0 and step < self.total_steps:
                    self.save_checkpoint()
        finally:
            stop.close()
            batches.close()  # stops and joins the reader's prefetch thread before anything else can end the process
            bar.close()
            if metrics_file:
                metrics_file.close()
        self.save_checkpoint()
        final = self.save_final()
        _log(d, f"saved the student to {final}")
        _log(d, self.summary(last, time.perf_counter() - started, self.step - start_step))
        return last

    def _kept(self) -> str:
        """Which checkpoint a --resume would continue from now (for the exits that write none)."""
        last = latest_checkpoint(self.cfg.out)
        return f"the last complete checkpoint is {last} (--resume continues from it)" if last else "no checkpoint yet"

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
    recipe = Recipe(cfg, teacher)  # checks the options before anything is created
    main = int(os.environ.get("RANK", "0")) == 0
    created = _missing_dirs(Path(cfg.out)) if main else []
    try:
        with hold_lock(Path(cfg.out) / RUN_LOCK, f"run {cfg.out}") if main else contextlib.nullcontext():
            return recipe.run()
    except BaseException:
        _remove_unused(created)  # a refused start (tokenizer mismatch, bad cache, ...) leaves nothing behind
        raise


# ------------------------------------------------------------------------------------------ helpers
def _missing_dirs(path: Path) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _remove_unused(created: list[Path]) -> None:
    """Remove the directories this run created if it wrote nothing into them but its lock file."""
    for directory in created:
        if not directory.is_dir() or {p.name for p in directory.iterdir()} - {RUN_LOCK}:
            return
        (directory / RUN_LOCK).unlink(missing_ok=True)
        directory.rmdir()


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its per-save "Writing model shards" bars would interleave with ours


def _train_line(record: dict, keys) -> str:
    return "  ".join(f"{k} {record[k]:.4g}" for k in dict.fromkeys((*keys, "lr", "grad_norm")) if k in record)


def _eval_line(ev: dict) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in ev.items() if isinstance(v, float))


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the records of steps up to ``step`` (what a killed run logged past its checkpoint goes). A torn last
    line (a crash or a full disk mid-write) is dropped with a warning; damage anywhere else names the file and line."""
    if not path.exists():
        return
    kept = [record for record in read_metrics(path) if record["step"] <= step]
    path.write_text("".join(json.dumps(record) + "\n" for record in kept))


def _write_metrics(f: tracking.MetricsLog | None, record: dict) -> None:
    if f is not None:
        f.write(record)


def _log(d: Dist, message: str) -> None:
    if d.main:
        print(message, file=sys.stderr, flush=True)
