"""Stage two: train a student on a teacher cache (single process or torchrun DDP)."""

from __future__ import annotations

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

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from cache.format import TOKENIZER_DIR, fsync_dir
from cache.manifest import LINEAGE_FILE, CacheError, CacheInfo, load_cache
from cache.options import option
from train import fused, losses
from train.reader import CacheReader, check_tokenizer, plan_chunks, split_holdout

CHECKPOINT_DIR = "checkpoints"
COMPLETE_MARKER = "COMPLETE"  # written last: a checkpoint without it is ignored
METRICS_FILE = "metrics.jsonl"
FINAL_DIR = "final"


@dataclass
class RunOptions:
    """Stage two's own settings; each field with `option(...)` is also a `pipeline distill` option."""

    student: str = option(
        help="Student: a HF model dir/id with weights, or a config (config.json, or a dir with only a config) to "
        "train from scratch."
    )
    cache: Path = option(help="Teacher cache written by `pipeline cache-teacher`.")
    out: Path = option(help="Run directory: checkpoints/, metrics.jsonl, final/ (the student, save_pretrained).")
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
    eval_cache: Path | None = option(None, "Evaluate on this cache instead of a held-out part.")
    eval_at_start: bool = option(False, "Also evaluate the untrained student (step 0).")
    log_every: int = option(10, "Write metrics every N steps.")
    resume: bool = option(False, "Continue from the latest complete checkpoint in --out.")
    allow_vocab_superset: bool = option(False, "Accept a student tokenizer that extends the teacher's with the same ids.")
    device: str = option("auto", "auto (cuda:LOCAL_RANK if available, else cpu) | cpu | cuda:N.")
    progress: bool = option(True, "Show a progress bar.")
    fused_loss: bool = option(
        False,
        "Compute the KD loss from the student's final hidden states in vocabulary chunks, never forming the "
        "[tokens, vocab] logits: far less memory for large vocabularies, the same loss and gradients up to rounding, "
        "one extra hidden-by-vocabulary product per step. Heads that are not a plain linear layer (logit soft-capping "
        "or scaling) fall back to the full-logits loss with a message.",
    )


@dataclass
class DistillConfig(losses.LossOptions, RunOptions):
    """Stage two's settings: the run's (RunOptions) and every registered loss's options (losses.LossOptions:
    temperature, ce_weight and each loss's own, declared by the losses). Bases in this order put the run's fields
    first (dataclass fields follow the reversed MRO), as `pipeline distill --help` lists them."""

    def validate(self) -> None:
        losses.build_loss(self.loss, self)  # raises on an unknown name or an option out of range
        for name in ("batch_size", "grad_accum", "save_every", "eval_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.max_steps is None and self.epochs <= 0:
            raise ValueError("give --max-steps or a positive --epochs")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError("--precision must be auto, bf16 or fp32")


# --------------------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values


def init_distributed(device_pref: str) -> tuple[Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and device_pref != "cpu" else "gloo"
        dist.init_process_group(backend=backend)
    d = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device_pref == "auto":
        device = torch.device(f"cuda:{d.local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(device_pref)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return d, device


# -------------------------------------------------------------------------------------------- model
def load_student(spec: str, info: CacheInfo, seed: int):
    """A pretrained student (dir/id with weights) or a fresh one from a config (dir or .json file)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(spec)
    config = None
    if path.is_file() and path.suffix == ".json":
        raw = json.loads(path.read_text())
        config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    elif path.is_dir() and not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        config = AutoConfig.from_pretrained(path)
    if config is None:
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32)
    else:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    vocab = model.get_output_embeddings().weight.shape[0]
    teacher_vocab = info.manifest.tokenizer["vocab_size"]
    if vocab < teacher_vocab:
        raise CacheError(
            f"student's output layer has {vocab} rows but the teacher's vocabulary has {teacher_vocab} tokens"
        )
    return model


def load_student_tokenizer(spec: str, info: CacheInfo):
    from transformers import AutoTokenizer

    for candidate in (spec, Path(spec).parent if Path(spec).is_file() else None):
        if candidate is None:
            continue
        try:
            return AutoTokenizer.from_pretrained(candidate)
        except (OSError, ValueError, TypeError):
            continue
    # A student built from a bare config uses the teacher's tokenizer saved with the cache.
    return AutoTokenizer.from_pretrained(info.root / TOKENIZER_DIR)


# ------------------------------------------------------------------------------------------- losses
def _teacher_at(batch: dict, input_ids: torch.Tensor, mask: torch.Tensor, device) -> losses.KDBatch:
    """The teacher data at the M trained positions (``mask``) of the batch."""
    support_ids = batch["topk_ids"].to(device, non_blocking=True)[mask].long()  # the reader keeps int32
    return losses.KDBatch(
        support_ids=support_ids,
        teacher_logprobs=batch["topk_logprobs"].to(device, non_blocking=True)[mask],
        mask=torch.ones(support_ids.shape[0], dtype=torch.bool, device=device),
        target_ids=input_ids[:, 1:][mask],
        teacher_target_logprob=batch["target_logprob"].to(device, non_blocking=True)[mask],
    )


def _student_forward(
    model, batch: dict, device, autocast, *, fused_bins: bool = False, include_target: bool = False,
    verify_head: bool = False,
) -> tuple[torch.Tensor | losses.StudentBins, losses.KDBatch]:  # fmt: skip
    """The student at the M trained positions of the batch, and the teacher data there.

    Default: the logits [M, V] (fp32). With ``fused_bins``: :class:`losses.StudentBins` on the teacher's support
    (plus the true token as an extra column with ``include_target``, as ATKD needs) from the chunked head of
    train/fused.py, so no [M, V] tensor exists. That raises fused.UnsplittableHead for a student whose head cannot
    be split off; ``verify_head`` also checks the numbers (once per model is enough).
    """
    if fused_bins:
        head, teacher = _student_head(model, batch, device, autocast, verify_head)
        with autocast:  # the head's products then run in the autocast dtype, as the model's own head would
            bins = fused.fused_student_bins(
                head.hidden, head.weight, teacher.support_ids, teacher.target_ids, bias=head.bias,
                include_target=include_target,
            )  # fmt: skip
        return bins, teacher
    input_ids = batch["input_ids"].to(device, non_blocking=True)
    mask = batch["target_mask"].to(device, non_blocking=True)
    with autocast:
        logits = model(input_ids=input_ids[:, :-1], use_cache=False).logits
    # Only trained positions enter the loss: padding and prompt tokens cost no loss compute.
    logits = logits[mask].float()
    return logits, _teacher_at(batch, input_ids, mask, device)


def _student_head(model, batch: dict, device, autocast, verify: bool) -> tuple[fused.HeadInputs, losses.KDBatch]:
    """What the student's output layer sees at the M trained positions (hidden [M, d], W, b), and the teacher data."""
    input_ids = batch["input_ids"].to(device, non_blocking=True)
    mask = batch["target_mask"].to(device, non_blocking=True)
    with autocast:
        head = fused.lm_head_inputs(model, verify=verify, input_ids=input_ids[:, :-1], use_cache=False)
    return head._replace(hidden=head.hidden[mask]), _teacher_at(batch, input_ids, mask, device)


# Per student: whether its head splits off for the fused loss (absent: not tried yet). Decided on the first fused
# forward, which also checks the numbers; a refusal is printed once and the logits path serves from then on.
_FUSED_HEAD_OK: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _on_fused_path(model, run):
    """``run(verify_head)`` if the student's head splits off, else None (the caller takes the logits path)."""
    key = unwrap(model)
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
    model, batch: dict, cfg: DistillConfig, loss: losses.DistillLoss, device, autocast
) -> losses.KDLossOutput:
    """Forward the student on one batch; return ``loss``'s training loss and its parts."""
    if cfg.fused_loss:
        found = _on_fused_path(
            model,
            lambda verify: _student_forward(
                model, batch, device, autocast, fused_bins=True, include_target=loss.needs_target_column,
                verify_head=verify,
            ),  # fmt: skip
        )
        if found is not None:
            bins, teacher = found
            return loss(teacher, student=bins)
    logits, teacher = _student_forward(model, batch, device, autocast)
    return loss(teacher, logits)


# Eval on the fused path forms logits for blocks of positions of at most this many floats (256 MB in fp32).
EVAL_BLOCK_ELEMENTS = 1 << 26


def _eval_blocks(model, batch: dict, device, autocast, fused_loss: bool):
    """``(logits, teacher)`` pieces of one eval batch: the whole batch, or with ``fused_loss`` blocks of positions
    whose logits are formed from the head's inputs one block at a time (eval then never holds [M, V] either)."""
    found = None
    if fused_loss:
        found = _on_fused_path(model, lambda verify: _student_head(model, batch, device, autocast, verify))
    if found is None:
        yield _student_forward(model, batch, device, autocast)
        return
    head, teacher = found
    columns = {f.name: getattr(teacher, f.name) for f in fields(teacher)}
    rows = max(1, EVAL_BLOCK_ELEMENTS // head.weight.shape[0])
    for start in range(0, head.hidden.shape[0], rows):
        block = slice(start, start + rows)
        with autocast:  # the very product the model's head computes, for these positions only
            logits = torch.nn.functional.linear(head.hidden[block], head.weight, head.bias)
        yield logits.float(), replace(teacher, **{k: v[block] for k, v in columns.items() if v is not None})


@torch.no_grad()
def evaluate(model, reader: CacheReader, device, autocast, d: Dist, fused_loss: bool = False) -> dict:
    """Eval CE on the true tokens, KL(teacher‖student) on the k+1 bins and its cross-entropy form (soft CE = KL +
    the teacher's entropy on the bins), top-1 agreement; token-weighted, whatever the training loss.

    ``fused_loss``: bound the memory as the fused training loss does (the same numbers, up to rounding).
    """
    model.eval()
    totals = torch.zeros(5, dtype=torch.float64, device=device)  # ce, kl, soft_ce, agree, tokens
    for batch in reader.iter_epoch(0):
        for logits, teacher in _eval_blocks(model, batch, device, autocast, fused_loss):
            n = logits.shape[0]
            if n == 0:
                continue
            fit = losses.fit_metrics(teacher, logits)
            agree = (logits.argmax(-1) == teacher.support_ids[:, 0]).sum()
            totals += torch.stack([fit.ce.double() * n, fit.kl.double() * n, fit.soft_ce.double() * n, agree.double(), torch.tensor(float(n), device=device, dtype=torch.float64)])
    d.all_reduce_sum(totals)
    model.train()
    n = max(totals[4].item(), 1.0)
    ce, kl, soft_ce, top1 = (x / n for x in totals[:4].tolist())
    return {"eval_ce": ce, "eval_kl": kl, "eval_soft_ce": soft_ce, "eval_top1": top1, "eval_tokens": int(totals[4].item())}


# -------------------------------------------------------------------------------------- checkpoints
def _checkpoint_dirs(out: Path) -> list[Path]:
    root = out / CHECKPOINT_DIR
    if not root.exists():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / COMPLETE_MARKER).exists()]
    return sorted(done, key=lambda p: int(p.name.removeprefix("step-")))


def latest_checkpoint(out: Path) -> Path | None:
    dirs = _checkpoint_dirs(out)
    return dirs[-1] if dirs else None


def _rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its per-save "Writing model shards" bars would interleave with ours


def save_checkpoint(out: Path, step: int, model, optimizer, scheduler, trainer_state: dict, d: Dist, keep: int) -> Path:
    """Write step-N under a temporary name, then rename, then the COMPLETE marker (the commit point)."""
    root = out / CHECKPOINT_DIR
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp"
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    d.barrier()
    torch.save(_rng_state(), tmp / f"rng-rank{d.rank}.pt")
    if d.main:
        unwrap(model).save_pretrained(tmp, safe_serialization=True)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    d.barrier()
    if d.main:
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        (final / COMPLETE_MARKER).write_text(str(step))
        fsync_dir(final)
        fsync_dir(root)
        for old in _checkpoint_dirs(out)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    d.barrier()
    return final


def unwrap(model):
    return model.module if hasattr(model, "module") else model


# -------------------------------------------------------------------------------------------- train
def distill(cfg: DistillConfig) -> dict:
    """Train the student; returns the final metrics. Writes checkpoints, metrics.jsonl and final/."""
    from transformers import get_cosine_schedule_with_warmup

    cfg.validate()
    _quiet_transformers()
    d, device = init_distributed(cfg.device)
    info = load_cache(cfg.cache)
    tokenizer = load_student_tokenizer(cfg.student, info)
    check_tokenizer(info, tokenizer, cfg.allow_vocab_superset)

    chunks = plan_chunks(info)
    if cfg.eval_cache is not None:
        eval_info = load_cache(cfg.eval_cache)
        if eval_info.manifest.tokenizer["sha256"] != info.manifest.tokenizer["sha256"]:
            raise CacheError(f"{cfg.eval_cache} was made with another tokenizer than {cfg.cache}")
        train_chunks, eval_reader_source, eval_chunks = chunks, eval_info, None
    else:
        train_chunks, eval_chunks = split_holdout(chunks, cfg.eval_sequences)
        eval_reader_source = info
    reader = CacheReader(
        info, cfg.batch_size, chunks=train_chunks, seed=cfg.seed, shuffle_rows=cfg.shuffle_rows,
        rank=d.rank, world_size=d.world_size, pin_memory=device.type == "cuda",
    )  # fmt: skip
    eval_reader = None
    if eval_chunks or cfg.eval_cache is not None:
        eval_reader = CacheReader(
            eval_reader_source, cfg.batch_size, chunks=eval_chunks, shuffle=False,
            rank=d.rank, world_size=d.world_size, drop_remainder=False,
        )  # fmt: skip

    if reader.samples_per_rank < cfg.batch_size:
        _log(d, f"warning: --batch-size {cfg.batch_size} is more than the {reader.samples_per_rank} training sequences "
                f"per process in {cfg.cache}: every batch holds {reader.samples_per_rank} sequences (the metrics and "
                "tokens/s count the tokens actually trained)")  # fmt: skip
    steps_per_epoch = max(1, reader.batches_per_epoch // cfg.grad_accum)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = load_student(cfg.student, info, cfg.seed).to(device)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    model.train()
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=cfg.adam_betas, fused=device.type == "cuda",
    )  # fmt: skip
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, total_steps)
    loss = losses.build_loss(cfg.loss, cfg)

    step = 0
    out = cfg.out
    if cfg.resume:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            _log(d, f"--resume: no complete checkpoint in {out / CHECKPOINT_DIR}; starting from scratch")
        else:
            step = _restore(ckpt, model, optimizer, scheduler, reader, loss, d, cfg)
            _log(d, f"resumed from {ckpt} at step {step}")
    elif d.main and out.exists() and (out / METRICS_FILE).exists():
        raise CacheError(f"{out} already holds a run; pass --resume to continue it or choose a new --out")
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(out / METRICS_FILE, step)  # drop what a killed run logged past its checkpoint
        (out / "distill_config.json").write_text(json.dumps(asdict(cfg), indent=1, default=str))
    d.barrier()

    if d.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    metrics_file = open(out / METRICS_FILE, "a") if d.main else None
    batches = iter(reader)
    bar = tqdm(total=total_steps, initial=step, desc=f"distill {cfg.loss}", unit="step", disable=not (cfg.progress and d.main), dynamic_ncols=True)
    window_start, window_tokens = time.perf_counter(), 0
    last: dict = {}
    if eval_reader is not None and cfg.eval_at_start and step == 0:
        _write_metrics(metrics_file, {"step": 0, **evaluate(unwrap(model), eval_reader, device, autocast, d, fused_loss=cfg.fused_loss)})
    try:
        while step < total_steps:
            sums = torch.zeros(6, dtype=torch.float64, device=device)  # total, kd, ce, kl, soft_ce; trained tokens
            for micro in range(cfg.grad_accum):
                batch = next(batches)
                sync = micro == cfg.grad_accum - 1 or d.world_size == 1
                ctx = model.no_sync() if (d.world_size > 1 and not sync) else _null()
                with ctx:
                    parts = batch_losses(model, batch, cfg, loss, device, autocast)
                    (parts.total / cfg.grad_accum).backward()
                sums[:5] += torch.stack([parts.total.detach(), parts.kd.detach(), parts.ce.detach(), parts.kl, parts.soft_ce]).double()
                sums[5] += batch["target_mask"].sum().item()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else torch.tensor(0.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            d.all_reduce_sum(sums)
            loss_value, kd_value, ce_value, kl_value, soft_ce_value = (float(x) for x in sums[:5] / (cfg.grad_accum * d.world_size))
            window_tokens += int(sums[5])  # every rank's true count: short batches and chat masks counted as they are
            # Once per optimizer step, on the rank-averaged value: every rank's loss state agrees.
            loss.optimizer_step(kd_value, step, total_steps)  # step = optimizer steps completed before this one
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == total_steps:
                elapsed = time.perf_counter() - window_start
                last = {
                    "step": step, "loss": loss_value, "kd": kd_value, "ce": ce_value, "kl": kl_value,
                    "soft_ce": soft_ce_value, **loss.metrics(), "lr": scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm), "tokens": window_tokens, "tokens_per_s": window_tokens / max(elapsed, 1e-9),
                    "epoch": reader.epoch,
                }  # fmt: skip
                window_start, window_tokens = time.perf_counter(), 0
                shown = ("loss", *loss.metrics(), "tokens_per_s")
                bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in last.items() if k in shown})
                _write_metrics(metrics_file, last)
            if eval_reader is not None and (step % cfg.eval_every == 0 or step == total_steps):
                ev = {"step": step, **evaluate(unwrap(model), eval_reader, device, autocast, d, fused_loss=cfg.fused_loss)}
                last.update(ev)
                _write_metrics(metrics_file, ev)
                if d.main:
                    bar.write(f"step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in ev.items() if isinstance(v, float)))
            if step % cfg.save_every == 0 and step < total_steps:
                state = {"step": step, "reader": reader.state_dict(), "loss": loss.state_dict(), "total_steps": total_steps}
                save_checkpoint(out, step, model, optimizer, scheduler, state, d, cfg.keep_checkpoints)
    finally:
        bar.close()
        if metrics_file:
            metrics_file.close()
    state = {"step": step, "reader": reader.state_dict(), "loss": loss.state_dict(), "total_steps": total_steps}
    save_checkpoint(out, step, model, optimizer, scheduler, state, d, cfg.keep_checkpoints)
    if d.main:
        final = out / FINAL_DIR
        tmp = out / f".{FINAL_DIR}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        unwrap(model).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        lineage = {  # read by cache-teacher when this model teaches the next one (teacher-assistant chains)
            "student": cfg.student, "cache": str(Path(cfg.cache).resolve()), "cache_fingerprint": info.fingerprint(),
            "cache_teacher": info.manifest.teacher, "cache_lineage": info.manifest.lineage, "loss": cfg.loss,
            "steps": step, "run_dir": str(Path(out).resolve()),
        }  # fmt: skip
        (tmp / LINEAGE_FILE).write_text(json.dumps(lineage, indent=1, sort_keys=True) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _log(d, f"saved the student to {final}")
    d.barrier()
    return last


def _restore(ckpt: Path, model, optimizer, scheduler, reader, loss: losses.DistillLoss, d: Dist, cfg: DistillConfig) -> int:
    from safetensors.torch import load_file

    state = json.loads((ckpt / "trainer_state.json").read_text())
    weights = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        weights.update(load_file(f))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # Tied output embeddings are saved once; anything else missing means a different student.
    tied = {k for k in missing if "lm_head" in k} if getattr(model.config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise CacheError(f"{ckpt}: checkpoint does not match the student (missing {missing[:3]}, unexpected {unexpected[:3]})")
    opt = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    reader.load_state_dict(state["reader"])
    loss.load_state_dict(state.get("loss") or {})
    rng = ckpt / f"rng-rank{d.rank}.pt"
    if rng.exists():
        _set_rng_state(torch.load(rng, weights_only=False))
    return int(state["step"])


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


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
