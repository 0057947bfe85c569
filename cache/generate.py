"""`pipeline generate`: write responses to prompts with a student, a teacher, or both (SWITCH).

A data-generation step before `pipeline cache-teacher`: the jsonl it writes is read by cache-teacher like
any other dataset, and for chat prompts only the generated reply is trained.

SWITCH (Koo et al., "SWITCH: Studying with Teacher for Knowledge Distillation of Large Language Models",
arXiv 2410.19503, Findings of NAACL 2025). The student writes the response; at every step the teacher's and
the student's next-token distributions p and q are compared by the Jensen-Shannon divergence

    JSD(p, q) = ½ KL(p ‖ m) + ½ KL(q ‖ m),   m = ½ (p + q)        (natural log: 0 ≤ JSD ≤ ln 2 ≈ 0.693)

and where ``JSD > τ_t = τ0 · exp(−λ·t)`` the token is drawn from the teacher's distribution instead of the
student's. ``t`` is the token's index in the response: 0 for the first generated token, the prompt not
counted. The threshold falls with t, so the teacher steps in more and more as a response grows, where the
student's own errors would otherwise compound. The divergence is taken between the temperature-1
distributions; temperature and top-p only shape the draw from the chosen one.

Defaults. The paper has no public code. The exponential schedule and the JSD are the paper's (secondary
summaries of it also report a decay factor of 1/10, with which about 47% of the tokens came from the student
and 53% from the teacher): λ = 0.1 per token. We could not find the paper's τ0; ``DEFAULT_TAU0 = 0.5``
nats is our choice: at the first token only a strong disagreement (JSD > 0.5 of at most 0.693) brings the
teacher in, by token 7 the threshold is 0.25 and by token 23 it is 0.05. Tune both on your pair of models;
every record keeps the JSD values, so the share of teacher tokens a setting gives can be read off one run.

Modes: ``switch`` (the default, both models), ``student`` (threshold off: the student writes everything) and
``teacher`` (the teacher writes everything). In the two single-writer modes the other model is optional;
when it is given, its JSD to the writer is still recorded (a free diagnostic), else ``jsd`` is null.

Prompts come from any source cache-teacher reads (jsonl, jsonl.zst, parquet, saved datasets, folders): a
``prompt`` field used as raw text, or chat ``messages`` rendered with the tokenizer's chat template and
``add_generation_prompt=True`` (trailing assistant turns are dropped: that reply is the one to write).
``chat=True`` wraps a plain prompt as one user turn.

Output: one JSON object per prompt, ``{"index", "prompt" (the text the models saw), "response",
"text" | "messages", "token_ids", "teacher_chosen", "jsd", "finish_reason"}``. Chat records carry the
conversation with the response appended as the assistant turn, so cache-teacher trains only the response;
plain records carry ``text = prompt + response``. The per-token lists are aligned with ``token_ids``, which
include the stop token when generation stopped on one (``finish_reason`` "eos", else "length").

Resume. Records are appended a batch at a time (one write, flushed and fsynced); a rerun skips the prompt
indices already in the file, after cutting off a line torn by a kill. ``OUT.meta.json`` holds what the file
was made with (models, mode, schedule, sampling, prompt source); a rerun with other settings is refused
rather than mixing two kinds of data in one file. Sampling uses one generator per prompt, seeded from
(seed, prompt index): a prompt's response does not depend on batching or on where a run was interrupted.

Backend: HF transformers, teacher and student on one device, batched with left padding and a KV cache per
model. vLLM is not supported (not needed now): SWITCH needs both models' full next-token distributions at
every step of one shared decode, which two independent vLLM engines do not give without a custom sampler.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from kd_pipeline.cache.config import (  # noqa: F401 - the constants re-exported for bench/ and tests
    DEFAULT_DECAY,
    DEFAULT_TAU0,
    MODES,
    GenerateConfig,
)
from kd_pipeline.cache.data import iter_documents, source_fingerprint
from kd_pipeline.cache.format.files import atomic_write_bytes
from kd_pipeline.cache.format.manifest import identity_diff, tokenizer_fingerprint
from kd_pipeline.errors import GenerateError
from kd_pipeline.models import (
    check_model_path,
    dtype_name,
    load_causal_lm,
    resolve_device,
    resolve_dtype,
    teacher_identity,
)
from kd_pipeline.models import load_tokenizer as load_one_tokenizer


# ------------------------------------------------------------------------------------------ the rule
def switch_threshold(t: int, tau0: float, decay: float) -> float:
    """τ_t = τ0·exp(−λ·t) for the response token at index t (t = 0 is the first generated token)."""
    return tau0 * math.exp(-decay * t)


def jensen_shannon(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Per-row JSD between softmax(logits_p) and softmax(logits_q), in nats (in [0, ln 2])."""
    logp = torch.log_softmax(logits_p.float(), dim=-1)
    logq = torch.log_softmax(logits_q.float(), dim=-1)
    logm = torch.logaddexp(logp, logq) - math.log(2.0)
    return (0.5 * (_kl(logp, logm) + _kl(logq, logm))).clamp_min(0.0)


def _kl(logp: torch.Tensor, logm: torch.Tensor) -> torch.Tensor:
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logm), 0.0).sum(-1)  # 0·log 0 = 0 (masked logits give -inf)


# ------------------------------------------------------------------------------------------- models
@dataclass
class Models:
    """What generation runs on: the tokenizer both models share and the models (None where unused)."""

    tokenizer: Any
    teacher: torch.nn.Module | None
    student: torch.nn.Module | None
    device: torch.device

    def present(self) -> dict[str, torch.nn.Module]:
        return {role: m for role, m in (("teacher", self.teacher), ("student", self.student)) if m is not None}

    def stop_ids(self) -> set[int]:
        """The tokenizer's EOS and every model's generation-config EOS (an instruct model's end of turn)."""
        ids = {self.tokenizer.eos_token_id}
        for model in self.present().values():
            eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
            ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
        return {int(i) for i in ids if i is not None}


def load_tokenizer(cfg: GenerateConfig):
    """The tokenizer of the models; with both models given, they must share it (as a cache's student must)."""
    tokenizers = {
        role: load_one_tokenizer(path, f"--{role}", trust_remote_code=cfg.trust_remote_code)
        for role, path in (("teacher", cfg.teacher), ("student", cfg.student))
        if path is not None
    }
    if len(tokenizers) == 2:
        a, b = (tokenizer_fingerprint(t) for t in tokenizers.values())
        if a != b:
            raise GenerateError(
                f"the teacher's and the student's tokenizers differ ({', '.join(identity_diff(a, b)[:3])}); "
                "SWITCH mixes their tokens in one sequence, so they must share one"
            )
    return tokenizers.get("teacher") or tokenizers["student"]


def load_models(cfg: GenerateConfig, tokenizer) -> Models:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its per-load bars would interleave with ours
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    loaded = {}
    for role in ("teacher", "student"):
        path = getattr(cfg, role)
        if path is None:
            continue
        model = load_causal_lm(path, f"--{role}", dtype=dtype, trust_remote_code=cfg.trust_remote_code)
        rows = model.get_output_embeddings().weight.shape[0]
        if rows < len(tokenizer):
            raise GenerateError(f"the {role}'s output layer has {rows} rows for {len(tokenizer)} tokens")
        loaded[role] = model.to(device).eval()
    return Models(tokenizer, loaded.get("teacher"), loaded.get("student"), device)


# -------------------------------------------------------------------------------------- generation
@dataclass
class Generation:
    """One response: its tokens (the stop token included when there was one) and, per token, whether the
    teacher's distribution emitted it and the JSD there (None when only one model ran)."""

    token_ids: list[int]
    teacher_chosen: list[bool]
    jsd: list[float] | None
    finish_reason: str  # "eos" | "length"


class _Decoder:
    """One model's incremental forward over the shared token stream, with its own KV cache."""

    def __init__(self, model: torch.nn.Module, vocab: int):
        self.model, self.vocab, self.past = model, vocab, None
        # transformers 5 renamed the KV cache argument and output `past_key_values` to `cache` (the old name
        # warns, and goes in 5.40); earlier versions only know `past_key_values`.
        self.cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def __call__(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
            **{self.cache_name: self.past},
        )
        self.past = getattr(out, self.cache_name)
        # Rows past the tokenizer's vocabulary (padded embeddings) are never tokens: drop them.
        return out.logits[:, -1, : self.vocab].float()


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generators) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p >= top_p  # the tokens before it already hold top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p.masked_fill(outside, 0.0))
    return torch.cat([torch.multinomial(row, 1, generator=g) for row, g in zip(probs, generators)])


@torch.inference_mode()
def generate_batch(
    models: Models, prompts: list[list[int]], seeds: list[int], cfg: GenerateConfig, stop_ids: set[int]
) -> list[Generation]:
    """Generate one response per prompt (token ids), all in one left-padded batch."""
    device, tokenizer = models.device, models.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    b, width = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.full((b, width), pad, dtype=torch.long, device=device)
    mask = torch.zeros((b, width), dtype=torch.long, device=device)
    for i, ids in enumerate(prompts):
        input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        mask[i, width - len(ids) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    decoders = {role: _Decoder(model, len(tokenizer)) for role, model in models.present().items()}
    logits = {role: decode(input_ids, mask, positions) for role, decode in decoders.items()}
    generators = [torch.Generator(device=device).manual_seed(s) for s in seeds] if cfg.temperature > 0 else None
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    tokens, from_teacher, divergences = [], [], []
    for t in range(cfg.max_new_tokens):
        jsd = jensen_shannon(logits["teacher"], logits["student"]) if len(decoders) == 2 else None
        if cfg.mode == "switch":
            teacher_turn = jsd > switch_threshold(t, cfg.tau0, cfg.decay)
            chosen = torch.where(teacher_turn[:, None], logits["teacher"], logits["student"])
        else:
            teacher_turn = torch.full((b,), cfg.mode == "teacher", device=device)
            chosen = logits[cfg.mode]
        token = torch.where(finished, pad, _pick(chosen, cfg.temperature, cfg.top_p, generators))
        tokens.append(token)
        from_teacher.append(teacher_turn)
        if jsd is not None:
            divergences.append(jsd)
        finished |= torch.isin(token, stop)
        if bool(finished.all()) or t == cfg.max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype, device=device)], dim=1)
        positions = positions[:, -1:] + 1
        logits = {role: decode(token[:, None], mask, positions) for role, decode in decoders.items()}

    token_rows = torch.stack(tokens, 1).tolist()
    teacher_rows = torch.stack(from_teacher, 1).tolist()
    jsd_rows = torch.stack(divergences, 1).tolist() if divergences else None
    out = []
    for i, row in enumerate(token_rows):
        ends = [j for j, token in enumerate(row) if token in stop_ids]
        n = ends[0] + 1 if ends else len(row)
        out.append(
            Generation(
                token_ids=row[:n],
                teacher_chosen=teacher_rows[i][:n],
                jsd=[round(x, 6) for x in jsd_rows[i][:n]] if jsd_rows is not None else None,
                finish_reason="eos" if ends else "length",
            )
        )
    return out


# ------------------------------------------------------------------------------------------ prompts
@dataclass
class Prompt:
    index: int  # position in the prompt source: the resume key
    text: str  # what the models see: the raw prompt, or the rendered conversation
    ids: list[int]
    messages: list[dict] | None  # chat prompts: the conversation the response answers


def iter_prompts(cfg: GenerateConfig, tokenizer) -> Iterator[Prompt]:
    docs = iter_documents(cfg.prompts, cfg.prompt_field, cfg.messages_field, cfg.split)
    try:
        for index, doc in enumerate(docs):
            if cfg.max_prompts is not None and index >= cfg.max_prompts:
                return
            if isinstance(doc, str) and not cfg.chat:
                text, messages = doc, None
                ids = tokenizer(text)["input_ids"]
            else:
                messages = [{"role": "user", "content": doc}] if isinstance(doc, str) else _prompt_turns(doc, index)
                if getattr(tokenizer, "chat_template", None) is None:
                    raise GenerateError("chat prompts need a tokenizer with a chat template")
                text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if not ids:
                raise GenerateError(f"prompt {index} of {cfg.prompts} has no tokens")
            yield Prompt(index, text, ids, messages)
    finally:
        docs.close()


def _prompt_turns(messages: list[dict], index: int) -> list[dict]:
    """The conversation up to the reply to write: trailing assistant turns are that reply, so drop them."""
    end = len(messages)
    while end and messages[end - 1]["role"] == "assistant":
        end -= 1
    if end == 0:
        raise GenerateError(f"prompt {index}: the conversation has no turn for the assistant to answer")
    return messages[:end]


def _record(prompt: Prompt, generation: Generation, tokenizer) -> dict:
    body = generation.token_ids[:-1] if generation.finish_reason == "eos" else generation.token_ids
    response = tokenizer.decode(body, skip_special_tokens=True)
    record: dict[str, Any] = {"index": prompt.index, "prompt": prompt.text, "response": response}
    if prompt.messages is not None:
        record["messages"] = [*prompt.messages, {"role": "assistant", "content": response}]
    else:
        record["text"] = prompt.text + response
    record.update(
        token_ids=generation.token_ids,
        teacher_chosen=generation.teacher_chosen,
        jsd=generation.jsd,
        finish_reason=generation.finish_reason,
    )
    return record


def _row_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _batched(items: Iterable[Prompt], size: int) -> Iterator[list[Prompt]]:
    batch: list[Prompt] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# ------------------------------------------------------------------------------------ output, resume
def _model_identity(path: str | None, dtype: str, trust_remote_code: bool) -> dict | None:
    if path is None:
        return None
    # A local directory is pinned by its config and sampled weight hashes; a hub id by its name.
    if Path(path).is_dir():
        return teacher_identity(path, None, dtype, trust_remote_code)
    return {"name_or_path": path, "dtype": dtype}


def _identity(cfg: GenerateConfig) -> dict:
    dtype = dtype_name(cfg.dtype, cfg.device)
    source = source_fingerprint(cfg.prompts, cfg.split)
    return {
        "teacher": _model_identity(cfg.teacher, dtype, cfg.trust_remote_code),
        "student": _model_identity(cfg.student, dtype, cfg.trust_remote_code),
        "prompts": {"files": source["files"], "sha256": source["sha256"]},
        **{
            name: getattr(cfg, name)
            for name in (
                "mode",
                "tau0",
                "decay",
                "max_new_tokens",
                "temperature",
                "top_p",
                "seed",
                "prompt_field",
                "messages_field",
                "chat",
                "split",
            )
        },
    }


def _prepare_output(cfg: GenerateConfig, identity: dict) -> set[int]:
    """Check an existing output against ``identity``; return the prompt indices it already holds."""
    out, meta = cfg.out, cfg.meta_path
    if cfg.overwrite:
        out.unlink(missing_ok=True)
        meta.unlink(missing_ok=True)
    if meta.exists():
        diff = identity_diff(json.loads(meta.read_text())["identity"], identity)
        if diff:
            raise GenerateError(
                f"{out} was generated with other settings, refusing to append:\n  "
                + "\n  ".join(diff)
                + "\nUse another --out, or --overwrite to start over."
            )
    elif out.exists():
        raise GenerateError(f"{out} exists but has no {meta.name}; use another --out, or --overwrite")
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        _write_meta(cfg, identity)
    return _completed_indices(out)


def _completed_indices(out: Path) -> set[int]:
    """Indices already written. A line torn by a kill during the last append is cut off first."""
    done: set[int] = set()
    if not out.exists():
        return done
    good = 0
    with open(out, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                break
            try:
                done.add(int(json.loads(line)["index"]))
            except (ValueError, KeyError, TypeError) as e:
                raise GenerateError(f"{out}:{lineno}: not a record written by `pipeline generate` ({e})") from None
            good += len(line)
    if good < out.stat().st_size:
        with open(out, "r+b") as f:
            f.truncate(good)
            os.fsync(f.fileno())
    return done


def _write_meta(cfg: GenerateConfig, identity: dict, **facts) -> None:
    payload = {"identity": identity, **facts}
    atomic_write_bytes(cfg.meta_path, (json.dumps(payload, indent=1, sort_keys=True) + "\n").encode())


# --------------------------------------------------------------------------------------------- main
@dataclass
class GenerateSummary:
    out: Path
    prompts: int  # prompts in the source (up to --max-prompts)
    skipped: int  # already in the output from an earlier run
    generated: int  # records written by this run
    tokens: int  # response tokens written by this run
    teacher_tokens: int  # of which the teacher emitted
    seconds: float  # wall time of the call, model loading included
    generate_seconds: float  # time in generation proper

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.generate_seconds, 1e-9)

    @property
    def teacher_share(self) -> float:
        return self.teacher_tokens / max(self.tokens, 1)


def generate(cfg: GenerateConfig, models: Models | None = None) -> GenerateSummary:
    """Write (or resume) ``cfg.out``. ``models``: already loaded models to use instead of loading
    ``cfg.teacher`` / ``cfg.student`` (e.g. to generate several modes with one load)."""
    cfg.validate()
    if models is not None and any(getattr(models, role) is None for role in cfg.writers):
        raise GenerateError(f"--mode {cfg.mode} needs the {' and the '.join(cfg.writers)} model")
    for role in ("teacher", "student"):  # before anything is written: a typo must not leave an OUT.meta.json
        if getattr(cfg, role) is not None:
            check_model_path(getattr(cfg, role), f"--{role}")
    started = time.perf_counter()
    identity = _identity(cfg)
    done = _prepare_output(cfg, identity)
    tokenizer = models.tokenizer if models is not None else load_tokenizer(cfg)
    prompts = iter_prompts(cfg, tokenizer)

    seen = generated = tokens = teacher_tokens = 0
    generate_seconds = 0.0
    stop_ids: set[int] = set()

    def todo() -> Iterator[Prompt]:
        nonlocal seen
        for prompt in prompts:
            seen += 1
            if prompt.index not in done:
                yield prompt

    remaining = cfg.max_prompts - sum(i < cfg.max_prompts for i in done) if cfg.max_prompts else None
    bar = tqdm(
        total=remaining,
        unit="prompt",
        desc=f"generate ({cfg.mode})",
        disable=not cfg.progress,
        dynamic_ncols=True,
    )
    try:
        with open(cfg.out, "a", encoding="utf-8") as f:
            for batch in _batched(todo(), cfg.batch_size):
                if models is None:  # loaded only once there is work: a finished run costs no model load
                    models = load_models(cfg, tokenizer)
                if not stop_ids:
                    stop_ids = models.stop_ids()
                seeds = [_row_seed(cfg.seed, p.index) for p in batch]
                batch_started = time.perf_counter()
                results = generate_batch(models, [p.ids for p in batch], seeds, cfg, stop_ids)
                generate_seconds += time.perf_counter() - batch_started
                records = (_record(p, g, tokenizer) for p, g in zip(batch, results))
                f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
                f.flush()
                os.fsync(f.fileno())  # the commit point of this batch
                generated += len(batch)
                tokens += sum(len(g.token_ids) for g in results)
                teacher_tokens += sum(sum(g.teacher_chosen) for g in results)
                bar.update(len(batch))
                rate = tokens / max(generate_seconds, 1e-9)
                bar.set_postfix(tok_s=f"{rate:,.0f}", teacher=f"{teacher_tokens / max(tokens, 1):.0%}", refresh=False)
    finally:
        bar.close()
    if seen == 0:
        raise GenerateError(f"{cfg.prompts}: no prompts")
    summary = GenerateSummary(
        out=cfg.out,
        prompts=seen,
        skipped=len(done),
        generated=generated,
        tokens=tokens,
        teacher_tokens=teacher_tokens,
        seconds=time.perf_counter() - started,
        generate_seconds=generate_seconds,
    )
    _write_meta(cfg, identity, records=len(done) + generated)
    _log(
        f"done: {summary.generated} responses written ({summary.skipped} already there), {tokens:,} tokens, "
        f"{summary.teacher_share:.1%} from the teacher, {summary.tokens_per_s:,.0f} tok/s"
    )
    return summary


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
