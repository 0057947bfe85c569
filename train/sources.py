"""Where a distill run's batches come from: one cache, a weighted mixture of caches, or an ensemble of caches.

The trainer sees one *batch source* (:class:`Mixture` or :class:`Ensemble`): an endless iterator of batches as the
student sees them (each cache's ``tokens`` transform applied: as read, or re-tokenized by ``--cross-tokenizer``),
with ``state_dict``/``load_state_dict`` for exact resume and ``epoch``/``batches_per_epoch``/``samples_per_rank``
as :class:`~train.reader.CacheReader` has them. Every batch is an ordinary one-teacher batch: the loss contract and
the trainer know nothing of how many teachers there are.

- ``--combine mixture`` (:class:`Mixture`): caches over different data, each batch from one cache with that cache's
  teacher signal. Which cache gives the next batch is a pure function of the weights, each cache's trained tokens
  per batch and how many batches each has given (:func:`next_source`): stride scheduling, so that every prefix of
  the run has drawn trained tokens in proportion to the weights, up to one batch per cache. Each cache keeps its own
  :class:`CacheReader` (own shuffle from the seed, own epochs, sharded over the ranks as one cache is); the plan is
  the same on every rank. Resume restores every reader's position and the per-cache counts: the same batches follow.
- ``--combine ensemble`` (:class:`Ensemble`): caches of several teachers over the same token stream (same tokenizer,
  same sequences, same shard layout), read in lockstep and combined position by position into one target on the
  union of their supports (train/ensemble.py, docs/multi-teacher.md).
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from kd_pipeline.cache.format.manifest import CacheInfo, load_cache, teacher_diff
from kd_pipeline.cache.format.storage import is_url, parse_storage_options
from kd_pipeline.errors import CacheError, ConfigError
from kd_pipeline.train import cross_tokenizer as xt
from kd_pipeline.train.config import cache_values
from kd_pipeline.train.ensemble import combine_teachers, target_weights
from kd_pipeline.train.reader import CacheReader, check_tokenizer, plan_chunks, split_holdout

COMBINE = ("mixture", "ensemble")
_NAME = re.compile(r"[A-Za-z0-9_.-]+")

Tokens = Callable[[dict], dict]


# ------------------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class CacheSpec:
    """One ``--cache`` value: ``NAME=PATH`` or ``PATH`` (named after its folder)."""

    name: str
    path: str  # a local path or a URL, as given


def located(path: str) -> str:
    """A cache's location as recorded and compared: a URL as given, a local path absolute."""
    return path if is_url(path) else str(Path(path).resolve())


def parse_caches(value, flag: str = "--cache") -> list[CacheSpec]:
    """``NAME=PATH`` or ``PATH`` per item; names must be distinct (they name the per-source metrics)."""
    specs = []
    for text in cache_values(value):
        name, sep, path = text.partition("=")
        if not (sep and _NAME.fullmatch(name) and not Path(text).exists()):  # a path that contains '=' stays a path
            name, path = Path(text).name or text, text
        specs.append(CacheSpec(name, path))
    if not specs:
        raise ConfigError(f"{flag}: give at least one cache")
    names = [s.name for s in specs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"{flag}: two caches are named {twice[0]!r}; name each one as NAME=PATH")
    return specs


def parse_weights(text: str | None, n: int) -> list[float] | None:
    """``--cache-weights`` ("0.3,0.7"): one value >= 0 per cache, normalized to sum 1; None if not given."""
    if text is None or str(text).strip() == "":
        return None
    try:
        weights = [float(x) for x in str(text).split(",")]
    except ValueError:
        raise ConfigError(f"--cache-weights {text!r}: give numbers separated by commas, e.g. 0.3,0.7") from None
    if len(weights) != n:
        raise ConfigError(f"--cache-weights has {len(weights)} values for {n} --cache options: give one per cache")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"--cache-weights {text!r}: every weight must be finite and >= 0, and one > 0")
    total = sum(weights)
    return [w / total for w in weights]


def comparable(value) -> list[list[str]]:
    """A ``--cache`` value as (name, resolved path) pairs: what a resume compares."""
    try:
        return [[s.name, located(s.path)] for s in parse_caches(value)]
    except ConfigError:
        return [[v] for v in cache_values(value)]


# ------------------------------------------------------------------------------------------ teachers
@dataclass
class Teacher:
    """One cache as this student sees it: ``tokens`` turns its reader's batches into the student's."""

    spec: CacheSpec
    info: CacheInfo
    tokens: Tokens
    projected: bool


def open_teachers(
    specs: list[CacheSpec], tokenizer, cfg, log: Callable[[str], None], loaded: list[CacheInfo] = ()
) -> list[Teacher]:
    """Load and check every cache. Without ``--cross-tokenizer`` each must hold the student's token ids (else
    refused with the reason); with it, each is projected onto the student's vocabulary through its own map.
    ``loaded``: the first caches, already loaded by the caller (the manifests are not read again)."""
    pieces: xt.TokenPieces | None | bool = False  # not built yet: once for all caches of the student's tokenizer
    teachers = []
    for i, spec in enumerate(specs):
        info = (
            loaded[i]
            if i < len(loaded)
            else load_cache(spec.path, storage_options=parse_storage_options(cfg.storage_options))
        )
        info.check_trains_something()
        if cfg.cross_tokenizer:
            tokens = xt.student_batches(info, tokenizer, cfg.cross_tokenizer_positions)
            matched = int((tokens.mapping >= 0).sum())
            log(
                f"--cross-tokenizer: {spec.name}: {matched:,} of the teacher's {len(tokens.mapping):,} ids have a "
                f"student counterpart; distilling at {cfg.cross_tokenizer_positions} positions, CE elsewhere"
            )
            teachers.append(Teacher(spec, info, tokens, True))
            continue
        check_tokenizer(info, tokenizer, cfg.allow_vocab_superset)
        if pieces is False:
            try:
                pieces = xt.TokenPieces.of(tokenizer)
            except CacheError as error:  # a slow or unusual tokenizer: the run goes on without bits per byte
                log(f"warning: no eval_bpb: {error}")
                pieces = None
        teachers.append(Teacher(spec, info, xt.CachedTokens(pieces), False))
    return teachers


def trained_per_sequence(info: CacheInfo) -> float:
    """Trained targets per sequence of a cache, from its first row group (the manifest counts tokens, not the
    trained ones; a packed stream trains nearly all, a chat-masked one a fraction): what --cache-weights count."""
    first = plan_chunks(info)[0]
    reader = CacheReader(info, first.rows, chunks=[first], shuffle=False, prefetch=0)
    batch = next(reader.iter_epoch(0))
    return max(float(batch["target_mask"].sum()) / first.rows, 1.0)


def check_eval_teachers(teachers: list[Teacher], eval_teachers: list[Teacher], allowed: bool) -> None:
    """Each eval cache must come from one of the training caches' teachers: one vocabulary serves a whole model
    family, so the tokenizer alone does not make it the same teacher (eval KL and top-1 would measure another)."""
    if allowed:
        return
    for e in eval_teachers:
        differences = [teacher_diff(t.info.manifest.teacher, e.info.manifest.teacher) for t in teachers]
        if all(differences):
            theirs = ", ".join(f"{t.spec.name}: {t.info.manifest.teacher.get('name_or_path')}" for t in teachers)
            raise CacheError(
                f"--eval-cache {e.spec.path} was made by teacher {e.info.manifest.teacher.get('name_or_path')}, the "
                f"--cache by {theirs} ({'; '.join(differences[0])}): eval KL and top-1 would measure the other "
                "teacher. Use an eval cache of the same teacher, or pass --allow-eval-teacher-mismatch."
            )


def check_ensemble(teachers: list[Teacher]) -> None:
    """Refuse caches that do not score the same token stream, cut the same way (they are read in lockstep)."""
    first = teachers[0]
    m0 = first.info.manifest
    for t in teachers[1:]:
        m = t.info.manifest
        why = []
        if m.tokenizer.get("sha256") != m0.tokenizer.get("sha256"):
            why.append(f"another tokenizer (vocab {m.tokenizer.get('vocab_size')} vs {m0.tokenizer.get('vocab_size')})")
        if m.seq_len != m0.seq_len or m.packing != m0.packing:
            why.append(f"another packing (seq_len {m.seq_len}, {m.packing} vs {m0.seq_len}, {m0.packing})")
        if m.stream != m0.stream:
            why.append(
                f"another token stream ({m.stream.get('num_sequences')} sequences, sha256 "
                f"{str(m.stream.get('sha256'))[:12]} vs {m0.stream.get('num_sequences')}, "
                f"{str(m0.stream.get('sha256'))[:12]})"
            )
        if not why and _layout(t.info) != _layout(first.info):
            why.append(
                "another cut into shards and row groups (the ensemble reads them in lockstep): rebuild one with the "
                "other's --shard-tokens and --row-group-tokens"
            )
        if why:
            raise CacheError(
                f"--combine ensemble: {t.spec.name} ({t.spec.path}) cannot be combined with {first.spec.name} "
                f"({first.spec.path}): {'; '.join(why)}. An ensemble needs teachers scored on the same tokens; caches "
                "over different data mix with --combine mixture."
            )


def _layout(info: CacheInfo) -> list[tuple[int, int]]:
    return [(c.first_seq_id, c.rows) for c in plan_chunks(info)]


# ----------------------------------------------------------------------------------------- mixture
def next_source(drawn: list[int], strides: list[float]) -> int:
    """The cache that gives the next batch: the one whose next batch is due first when cache i's j-th batch is due at
    ``j · strides[i]`` (``stride = trained tokens per batch / weight``; ties to the lower index). After any number of
    batches, cache i has given ``w_i`` of the trained tokens up to one batch of each cache."""
    return min(range(len(drawn)), key=lambda i: ((drawn[i] + 1) * strides[i], i))


def mixture_plan(strides: list[float], n: int, drawn: list[int] | None = None) -> list[int]:
    """The next ``n`` sources after ``drawn`` batches per cache (default none): a pure function, for tests and docs."""
    drawn = list(drawn or [0] * len(strides))
    out = []
    for _ in range(n):
        i = next_source(drawn, strides)
        drawn[i] += 1
        out.append(i)
    return out


class Mixture:
    """Batches from several caches, each from one, drawn in proportion to ``weights`` by trained tokens.

    ``readers[i]`` (one rank's share of cache i), ``tokens[i]`` (its batches as the student sees them),
    ``weights`` [T] summing to 1, ``per_batch[i]``: trained tokens of a batch of cache i. A single cache is the
    one-reader case: the same batches, in the same order, as its :class:`CacheReader` alone.
    """

    def __init__(self, names: list[str], readers: list[CacheReader], tokens: list[Tokens], weights, per_batch):
        self.names, self.readers, self.tokens = names, readers, tokens
        self.weights = [float(w) for w in weights]
        self.strides = [p / w if w > 0 else math.inf for p, w in zip(per_batch, self.weights)]
        self.drawn = [0] * len(readers)

    @property
    def batches_per_epoch(self) -> int:
        """As many batches as every drawn cache holds together (--epochs counts passes over all of them)."""
        return sum(r.batches_per_epoch for r, w in zip(self.readers, self.weights) if w > 0)

    @property
    def samples_per_rank(self) -> int:
        return min(r.samples_per_rank for r, w in zip(self.readers, self.weights) if w > 0)

    @property
    def epoch(self) -> int:
        return self.readers[0].epoch if len(self.readers) == 1 else sum(self.drawn) // self.batches_per_epoch

    def __iter__(self) -> Iterator[dict]:
        iters: list[Iterator | None] = [None] * len(self.readers)  # started when first drawn: a weight-0 cache never
        try:
            while True:
                i = next_source(self.drawn, self.strides)
                if iters[i] is None:
                    iters[i] = iter(self.readers[i])
                batch = next(iters[i])
                self.drawn[i] += 1
                yield self.tokens[i](batch)
        finally:
            for it in iters:
                if it is not None:
                    it.close()  # joins its prefetch thread

    def state_dict(self) -> dict:
        return {"names": self.names, "drawn": list(self.drawn), "readers": [r.state_dict() for r in self.readers]}

    def load_state_dict(self, state: dict, reshard: bool = False) -> None:
        if "readers" not in state:  # a checkpoint of one cache from before mixtures: the reader's own state
            if len(self.readers) != 1:
                raise CacheError("cannot resume: the checkpoint was written by a run of one cache")
            self.readers[0].load_state_dict(state, reshard=reshard)
            self.drawn = [
                state["epoch"] * self.readers[0].batches_per_epoch + -(-state["consumed"] // state["batch_size"])
            ]
            return
        _check_same_count(state.get("names"), self.names)
        for reader, saved in zip(self.readers, state["readers"]):
            reader.load_state_dict(saved, reshard=reshard)  # each refuses another cache by its fingerprint
        self.drawn = [int(n) for n in state["drawn"]]


def _check_same_count(saved: list[str] | None, now: list[str]) -> None:
    """A resume reads as many caches as the checkpoint did, in the same order. Their names may differ (a cache
    moved to a folder of another name is the same cache: each reader compares content fingerprints)."""
    if saved is None or len(saved) != len(now):
        raise CacheError(f"cannot resume: the checkpoint's caches are {saved}, now {now}")


# ---------------------------------------------------------------------------------------- ensemble
class Ensemble:
    """Several caches of one token stream, read in lockstep and combined per position (train/ensemble.py).

    ``weights`` [T] (the prior, summing to 1); ``temperature``: None for static weights, else per position
    ``w_i ∝ weights_i · p_i(true token)^(1/temperature)`` (:func:`~train.ensemble.target_weights`). ``tokens``: the
    combined batch as the student sees it. Out: the reader's keys with ``topk_ids`` [B, L-1, Σk] int32,
    ``topk_logprobs`` [B, L-1, Σk] float32 (empty columns -inf, repeating column 0's id), ``p_rest`` [B, L-1]
    float32 (the combined tail, passed to the loss as is) and ``target_logprob`` [B, L-1] float32 (log p̄(true)),
    on ``device``: the combination runs where the student trains (on one CPU thread it costs ~0.3 s per 16k
    positions at k = 64 + 64, which a GPU does in a blink), and the loss finds its inputs there already.
    """

    def __init__(
        self, names: list[str], readers: list[CacheReader], tokens: Tokens, weights, temperature=None, device=None
    ):
        self.names, self.readers, self.tokens = names, readers, tokens
        self.weights = [float(w) for w in weights]
        self.temperature = temperature
        self.device = torch.device(device or "cpu")

    batches_per_epoch = property(lambda self: self.readers[0].batches_per_epoch)
    samples_per_rank = property(lambda self: self.readers[0].samples_per_rank)
    epoch = property(lambda self: self.readers[0].epoch)

    def combine(self, batches: list[dict]) -> dict:
        first = batches[0]
        for name, b in zip(self.names[1:], batches[1:]):
            if not (
                torch.equal(b["input_ids"], first["input_ids"]) and torch.equal(b["target_mask"], first["target_mask"])
            ):
                raise CacheError(
                    f"--combine ensemble: cache {name} holds other tokens than {self.names[0]} at sequences "
                    f"{first['seq_ids'][:4].tolist()}...: the caches do not score the same stream (run `pipeline "
                    "verify` on both)"
                )
        dev = self.device
        rows, cols = first["target_mask"].nonzero(as_tuple=True)

        def at(key: str, batch: dict) -> torch.Tensor:
            return batch[key][rows, cols].to(dev, non_blocking=True)

        target_lps = [at("target_logprob", b).float() for b in batches]
        prior = torch.tensor(self.weights, device=dev)
        w = prior if self.temperature is None else target_weights(target_lps, self.temperature, prior)
        ids, lps, p_rest, target_lp = combine_teachers(
            [at("topk_ids", b) for b in batches],
            [at("topk_logprobs", b) for b in batches],
            target_lps,
            w,
            target_ids=first["input_ids"][:, 1:][rows, cols].to(dev, non_blocking=True),
        )
        b, n = first["target_mask"].shape
        rows, cols = rows.to(dev), cols.to(dev)

        def scatter(values: torch.Tensor, fill, dtype) -> torch.Tensor:
            out = torch.full((b, n, *values.shape[1:]), fill, dtype=dtype, device=dev)
            out[rows, cols] = values.to(dtype)
            return out

        return {
            **first,
            "topk_ids": scatter(ids, 0, torch.int32),
            "topk_logprobs": scatter(lps, float("-inf"), torch.float32),
            "p_rest": scatter(p_rest, 1.0, torch.float32),
            "target_logprob": scatter(target_lp, float("-inf"), torch.float32),
        }

    def __iter__(self) -> Iterator[dict]:
        iters = [iter(r) for r in self.readers]
        try:
            for batches in zip(*iters):
                yield self.tokens(self.combine(list(batches)))
        finally:
            for it in iters:
                it.close()

    def iter_epoch(self, epoch: int) -> Iterator[dict]:
        iters = [r.iter_epoch(epoch) for r in self.readers]
        try:
            for batches in zip(*iters):
                yield self.combine(list(batches))  # eval applies the tokens
        finally:
            for it in iters:
                it.close()

    def state_dict(self) -> dict:
        return {"names": self.names, "readers": [r.state_dict() for r in self.readers]}

    def load_state_dict(self, state: dict, reshard: bool = False) -> None:
        _check_same_count(state.get("names"), self.names)
        for reader, saved in zip(self.readers, state["readers"]):
            reader.load_state_dict(saved, reshard=reshard)  # each refuses another cache by its fingerprint


# ------------------------------------------------------------------------------------------ the run
@dataclass
class EvalSet:
    """One eval stream: ``name`` ("" for the run's total), its reader (``iter_epoch``) and ``tokens``."""

    name: str
    reader: object
    tokens: Tokens


@dataclass
class RunData:
    """What a distill run reads: ``train`` (the batch source), ``eval_sets`` (per source; for an ensemble also the
    combined target, named ""), the ``teachers`` and their ``weights`` (for the lineage)."""

    train: Mixture | Ensemble
    eval_sets: list[EvalSet]
    teachers: list[Teacher]
    weights: list[float]
    combine: str

    @property
    def projected(self) -> bool:
        return any(t.projected for t in self.teachers)

    def lineage(self) -> list[dict]:
        """Every teacher and its weight, for final/lineage.json."""
        return [
            {
                "name": t.spec.name,
                "cache": located(t.spec.path),
                "cache_fingerprint": t.info.fingerprint(),
                "teacher": t.info.manifest.teacher,
                "cache_lineage": t.info.manifest.lineage,
                "weight": w,
            }
            for t, w in zip(self.teachers, self.weights)
        ]


def open_run_data(cfg, tokenizer, rank: int, world_size: int, device, log=None, loaded=()) -> RunData:
    """The batch source and eval sets of a distill run, from ``cfg.cache``, ``cfg.cache_weights``, ``cfg.combine``,
    ``cfg.eval_cache`` / ``cfg.eval_sequences`` (every cache checked and refused with the reason if unusable), for a
    student on ``device`` (an ensemble combines there; CUDA gets pinned batches). ``loaded``: caches of ``cfg.cache``
    the caller has loaded already, in order (not read again)."""
    device = torch.device(device)
    pin_memory = device.type == "cuda"
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    specs = parse_caches(cfg.cache)
    teachers = open_teachers(specs, tokenizer, cfg, log, loaded)
    ensemble = cfg.combine == "ensemble"
    if ensemble:
        check_ensemble(teachers)
    eval_teachers = None
    if cfg.eval_cache:
        eval_teachers = open_teachers(parse_caches(cfg.eval_cache, "--eval-cache"), tokenizer, cfg, log)
        check_eval_teachers(teachers, eval_teachers, cfg.allow_eval_teacher_mismatch)
        if ensemble:
            if len(eval_teachers) != len(teachers):
                raise ConfigError(
                    f"--combine ensemble with --eval-cache: give one eval cache per teacher ({len(teachers)}, in the "
                    f"order of --cache), got {len(eval_teachers)}"
                )
            check_ensemble(eval_teachers)

    def reader(info, chunks, **kw) -> CacheReader:
        return CacheReader(info, cfg.batch_size, chunks=chunks, rank=rank, world_size=world_size, **kw)

    readers, eval_readers = [], []
    for t in teachers:
        chunks = plan_chunks(t.info)
        train_chunks, held = (chunks, []) if cfg.eval_cache else split_holdout(chunks, cfg.eval_sequences)
        readers.append(
            reader(t.info, train_chunks, seed=cfg.seed, shuffle_rows=cfg.shuffle_rows, pin_memory=pin_memory)
        )
        if held:
            eval_readers.append(reader(t.info, held, shuffle=False, drop_remainder=False))
    if eval_teachers is not None:
        eval_readers = [reader(t.info, None, shuffle=False, drop_remainder=False) for t in eval_teachers]
    eval_named = eval_teachers or teachers
    names = [t.spec.name for t in teachers]

    weights = parse_weights(cfg.cache_weights, len(teachers))
    if ensemble:
        weights = weights or [1.0 / len(teachers)] * len(teachers)
        train = Ensemble(names, readers, teachers[0].tokens, weights, cfg.ensemble_temperature, device)
        eval_sets = [EvalSet(t.spec.name, r, t.tokens) for t, r in zip(eval_named, eval_readers)]
        if eval_readers:  # the combined target first: its metrics are the run's totals
            members = [t.spec.name for t in eval_named]
            combined = Ensemble(members, eval_readers, teachers[0].tokens, weights, cfg.ensemble_temperature, device)
            eval_sets.insert(0, EvalSet("", combined, teachers[0].tokens))
    else:
        per_seq = [trained_per_sequence(t.info) for t in teachers] if len(teachers) > 1 else [1.0]
        if weights is None:  # each cache's share of the trained tokens: every cache passes once per epoch
            shares = [p * r.samples_per_rank for p, r in zip(per_seq, readers)]
            weights = [s / sum(shares) for s in shares]
        train = Mixture(names, readers, [t.tokens for t in teachers], weights, [p * cfg.batch_size for p in per_seq])
        eval_sets = [EvalSet(t.spec.name, r, t.tokens) for t, r in zip(eval_named, eval_readers)]
    if len(teachers) > 1:
        log(
            f"--combine {cfg.combine}: "
            + ", ".join(f"{n} {w:.3f}" for n, w in zip(names, weights))
            + (
                f" (per position, temperature {cfg.ensemble_temperature})"
                if ensemble and cfg.ensemble_temperature
                else ""
            )
        )
    return RunData(train, eval_sets, teachers, weights, cfg.combine)


def pooled(results: dict[str, dict]) -> dict:
    """The eval metrics of several eval sets as one: each source's as ``eval_kl/NAME`` ..., and the pooled totals
    (token-weighted; bits per byte over all bytes) under the plain names. A set named "" (an ensemble's combined
    target) gives the totals itself. One set: its metrics as they are."""
    if len(results) == 1:
        return dict(next(iter(results.values())))
    out: dict = {}
    for name, r in results.items():
        if name:
            out.update({f"{k}/{name}": v for k, v in r.items()})
    if "" in results:
        return {**results[""], **out}
    parts = list(results.values())
    n = sum(r["eval_tokens"] for r in parts)
    n_kd = sum(r["eval_kd_tokens"] for r in parts)
    total = {
        "eval_ce": sum(r["eval_ce"] * r["eval_tokens"] for r in parts) / max(n, 1),
        **{
            k: sum(r[k] * r["eval_kd_tokens"] for r in parts) / max(n_kd, 1)
            for k in ("eval_kl", "eval_soft_ce", "eval_top1")
        },
        "eval_tokens": n,
        "eval_kd_tokens": n_kd,
    }
    if all("eval_bytes" in r for r in parts):
        total["eval_bytes"] = sum(r["eval_bytes"] for r in parts)
        total["eval_bpb"] = xt.bits_per_byte(sum(r["eval_ce"] * r["eval_tokens"] for r in parts), total["eval_bytes"])
    return {**total, **out}


def check_options(cfg) -> None:
    """Refuse option combinations of several caches that cannot work, before anything is loaded."""
    from kd_pipeline.train.losses import LOSSES

    specs = parse_caches(cfg.cache)
    if cfg.eval_cache:
        parse_caches(cfg.eval_cache, "--eval-cache")
    if cfg.combine not in COMBINE:
        raise ConfigError(f"--combine must be one of {', '.join(COMBINE)}; got {cfg.combine!r}")
    parse_weights(cfg.cache_weights, len(specs))
    if cfg.ensemble_temperature is not None:
        if cfg.combine != "ensemble":
            raise ConfigError("--ensemble-temperature weighs the teachers of --combine ensemble; drop it or add that")
        if not 0 < cfg.ensemble_temperature < math.inf:
            raise ConfigError(f"--ensemble-temperature must be finite and > 0, got {cfg.ensemble_temperature}")
    if cfg.combine == "ensemble":
        if cfg.cross_tokenizer:
            raise ConfigError(
                "--combine ensemble with --cross-tokenizer is not supported: combine the teachers for a student of "
                "their tokenizer, or mix caches of other tokenizers with --combine mixture"
            )
        if cfg.loss in LOSSES and LOSSES[cfg.loss].needs_logits:
            # ULD compares the teacher's K ranks with the student's top K: the combined support is Σk wide and
            # padded wherever the teachers agree, and the padding's zero ranks meet live student ranks. Its value
            # would depend on how much the teachers overlap (and trimming to the batch's widest union on which
            # other rows share the batch), not on the target: refused rather than silently distorted.
            raise ConfigError(
                f"--loss {cfg.loss} ranks the teacher's support against the student's top ranks, and an ensemble's "
                "combined support is padded where the teachers agree, which changes that loss (docs/multi-teacher.md);"
                " use a bin loss (fkl, rkl, js, ...) with --combine ensemble"
            )
