"""`pipeline verify` and `pipeline inspect`: check a cache end to end, and show what is in it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from kd_pipeline.cache.format.encodings import Encoding, encoding_for
from kd_pipeline.cache.format.layout import SHARD_DIR, TOKENIZER_DIR
from kd_pipeline.cache.format.manifest import CacheInfo, ShardEntry, load_cache, tokenizer_fingerprint
from kd_pipeline.cache.format.rows import id_list, invalid_rows, tail_mass
from kd_pipeline.cache.format.storage import naming_storage_errors
from kd_pipeline.errors import CacheError

# fp16 storage rounds each probability by at most 2^-11 relative, so a sum over the support may exceed 1
# by that much; anything beyond is a broken teacher or a broken file.
_MASS_TOLERANCE = 2e-3
# |stored target_logprob - stored top-k logprob| for the same token: fp16 roundings of one value agree to
# within one fp16 step at |lp| < 64; a quantizing encoding adds its own error bound.
_TARGET_TOLERANCE = 0.07


@dataclass
class VerifyReport:
    shards_checked: int = 0
    rows: int = 0
    tokens: int = 0
    problems: list[str] = field(default_factory=list)  # each names the file
    warnings: list[str] = field(default_factory=list)
    incomplete: str | None = None  # why the cache is not complete (a worker unfinished or its manifest missing)
    trained: int | None = 0  # trained targets in the shards checked; None if unknown (--quick on an older cache)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def exit_code(self) -> int:
        """`pipeline verify`'s exit status: 0 OK, 1 damaged (problems), 3 intact so far but incomplete."""
        return 1 if self.problems else 3 if self.incomplete else 0


def _read_shard(info: CacheInfo, name: str):
    """A whole shard as an arrow table (verify and inspect decode all of it)."""
    if info.store.local:
        return pq.read_table(info.root / name)
    with info.store.open_input(name) as f:
        return pq.read_table(f)


def _check_rows(shard: ShardEntry, info: CacheInfo, path: Path | str, encoding: Encoding) -> tuple[list[str], int]:
    """Decoded-value bounds every encoding must meet: ids in the vocabulary and unique per position,
    log-probs <= 0 and sorted, support mass <= 1 (tail mass in [0, 1]), target consistent with the support.
    Returns (problems, trained targets in the shard)."""
    m = info.manifest
    vocab = m.tokenizer["vocab_size"]
    problems = []
    table = _read_shard(info, shard.name)
    if table.schema.remove_metadata() != encoding.schema.remove_metadata():
        return [f"{path}: schema differs from format v{m.format_version} ({encoding.name}): {table.schema}"], 0
    if table.num_rows != shard.rows:
        problems.append(f"{path}: {table.num_rows} rows, manifest says {shard.rows}")
    problems += [f"{path}: {p}" for p in encoding.check(table)]
    rows = encoding.decode(table)
    trained = int(rows.loss_mask[:, 1:].sum())
    expected_ids = np.arange(shard.first_seq_id, shard.last_seq_id + 1)
    if not np.array_equal(rows.seq_ids, expected_ids):
        problems.append(f"{path}: seq_ids are not {shard.first_seq_id}..{shard.last_seq_id} in order")
    lp = rows.topk_logprobs.astype(np.float32)
    for name, ids in (("input_ids", rows.input_ids), ("topk_ids", rows.topk_ids)):
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            problems.append(f"{path}: {name} outside [0, {vocab})")
    sampled = m.support == "sampled"
    # A sampled support pads positions with fewer distinct draws than k with weight 0 (log -inf), and so does
    # an encoding that cuts the support.
    bad = invalid_rows(lp, rows.target_logprob, sampled or encoding.cuts_support)
    if bad.size:
        problems.append(f"{path}: non-finite log-probabilities in sequences {id_list(rows.seq_ids[bad])}")
    if (lp > 0).any() or (rows.target_logprob.astype(np.float32) > 0).any():
        problems.append(f"{path}: positive log-probabilities")
    with np.errstate(invalid="ignore"):  # -inf - -inf between two pads
        unsorted = (np.nan_to_num(np.diff(lp, axis=-1), nan=0.0) > 0).any()
    if unsorted:
        problems.append(f"{path}: topk_logprobs not sorted descending")
    ids_sorted = np.sort(rows.topk_ids, axis=-1)
    if (ids_sorted[..., 1:] == ids_sorted[..., :-1]).any():
        problems.append(f"{path}: a position lists the same topk id twice")
    mass = np.exp(lp).sum(-1)
    if (mass > 1 + _MASS_TOLERANCE).any():
        problems.append(f"{path}: support mass up to {mass.max():.4f} > 1 (tail mass would be negative)")
    if sampled:  # stored values are sample weights, not the teacher's log-probs: nothing to cross-check
        return problems, trained
    targets = rows.input_ids[:, 1:, None]
    hit = (rows.topk_ids == targets) & np.isfinite(lp)  # a padded slot (-inf) is not an entry
    in_topk = hit.any(-1)
    gap = np.abs(np.where(hit, lp, 0).sum(-1) - rows.target_logprob.astype(np.float32))[in_topk]
    if gap.size and gap.max() > _TARGET_TOLERANCE + encoding.error_bound():
        problems.append(f"{path}: target_logprob disagrees with the top-k entry of the same token by {gap.max():.3f}")
    return problems, trained


def _check_tokenizer(info: CacheInfo, load: bool) -> list[str]:
    """The teacher's tokenizer saved with the cache must be there and be the one the manifest fingerprints:
    a student built from a config gets its tokenizer from it."""
    directory = info.store.member(TOKENIZER_DIR)
    if not info.store.is_folder(TOKENIZER_DIR):
        return [f"{directory}: missing (the teacher's tokenizer, saved with the cache; distill and inspect use it)"]
    if not load:
        return []
    from transformers import AutoTokenizer

    try:
        local = info.store.local_dir(TOKENIZER_DIR)
        got = tokenizer_fingerprint(AutoTokenizer.from_pretrained(local, trust_remote_code=False))
    except Exception as e:  # whatever transformers raises for a damaged tokenizer, name the folder
        return [f"{directory}: unreadable tokenizer ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"]
    expected = info.manifest.tokenizer["sha256"]
    if got["sha256"] != expected:
        return [
            f"{directory}: tokenizer fingerprint {got['sha256'][:12]} (vocab {got['vocab_size']}) differs from the "
            f"manifest's {expected[:12]} (vocab {info.manifest.tokenizer['vocab_size']})"
        ]
    return []


def verify_cache(root: str | Path, check_values: bool = True, storage_options: dict | None = None) -> VerifyReport:
    """Checksums, schema, row counts, seq_id ranges and value sanity of every shard."""
    report = VerifyReport()
    try:
        info = load_cache(root, require_complete=False, storage_options=storage_options)
    except CacheError as e:
        report.problems.append(str(e))
        return report
    if not info.complete:
        try:  # its own words: which workers are missing or unfinished
            load_cache(root, storage_options=storage_options)
        except CacheError as e:
            report.incomplete = str(e)
    try:
        with naming_storage_errors(str(info.root)):
            _verify_files(info, report, check_values)
    except CacheError as e:  # the store stopped answering (credentials, network): what was checked stays reported
        report.problems.append(str(e))
    return report


def _verify_files(info: CacheInfo, report: VerifyReport, check_values: bool) -> None:
    store = info.store
    encoding = encoding_for(info.manifest)
    listed = set()
    for shard in info.shards:
        path = store.member(shard.name)
        listed.add(shard.name.rsplit("/", 1)[-1])
        report.shards_checked += 1
        if not store.exists(shard.name):
            report.problems.append(f"{path}: missing")
            continue
        size = store.size(shard.name)
        if size != shard.bytes:
            report.problems.append(f"{path}: {size} bytes, manifest says {shard.bytes}")
            continue
        if store.sha256(shard.name) != shard.sha256:
            report.problems.append(f"{path}: sha256 mismatch (file corrupted or replaced)")
            continue
        if check_values:
            try:
                problems, trained = _check_rows(shard, info, path, encoding)
            except Exception as e:  # a file that passes sha256 but cannot be decoded is still named
                report.problems.append(f"{path}: unreadable ({type(e).__name__}: {e})")
                continue
            report.problems.extend(problems)
            if shard.trained is not None and trained != shard.trained:
                report.problems.append(f"{path}: {trained} trained targets, manifest says {shard.trained}")
        else:
            trained = shard.trained
        report.trained = None if report.trained is None or trained is None else report.trained + trained
        report.rows += shard.rows
        report.tokens += shard.tokens
    report.problems.extend(_check_tokenizer(info, check_values))
    if info.complete and report.trained == 0 and report.shards_checked == len(info.shards):
        try:
            info.check_trains_something()
        except CacheError as e:
            report.problems.append(str(e))
    for extra in store.list(SHARD_DIR):
        if extra not in listed:
            report.warnings.append(
                f"{store.member(f'{SHARD_DIR}/{extra}')}: not listed in any manifest (left by an interrupted run)"
            )


def inspect_cache(
    root: str | Path | CacheInfo,
    seq: int = 0,
    position: int | None = None,
    show: int = 10,
    tokenizer=None,
    storage_options: dict | None = None,
) -> str:
    """A human summary: manifest facts, one position decoded with probabilities, tail-mass statistics."""
    info = (
        root
        if isinstance(root, CacheInfo)
        else load_cache(root, require_complete=False, storage_options=storage_options)
    )
    m = info.manifest
    lines = [
        f"cache: {info.root}  (format v{m.format_version}, {'complete' if info.complete else 'INCOMPLETE'})",
        f"encoding: {encoding_for(m).describe()}",
        f"teacher: {m.teacher.get('name_or_path')}  dtype={m.teacher.get('dtype')}  backend={m.backend}",
        f"tokenizer: vocab {m.tokenizer['vocab_size']}  sha256 {m.tokenizer['sha256'][:16]}…",
        f"support: {m.support}{' ' + str(m.sampling) if m.sampling else ''}  k={m.k}  seq_len={m.seq_len}  packing={m.packing}",
        f"data: {m.data_path}  sha256 {str(m.data['source'].get('sha256'))[:16]}…",
        f"shards: {len(info.shards)} from {m.num_workers} worker(s); {info.num_sequences:,} sequences, "
        f"{info.num_tokens:,} tokens, {info.num_bytes / 2**20:.2f} MiB, "
        f"{info.num_bytes / max(info.num_tokens, 1):.1f} bytes/token",
    ]
    if not info.shards:
        return "\n".join(lines)
    shard = next((s for s in info.shards if s.first_seq_id <= seq <= s.last_seq_id), None)
    if shard is None:
        held = ", ".join(f"{s.first_seq_id}..{s.last_seq_id}" for s in info.shards[:8])
        raise CacheError(
            f"{info.root}: no sequence {seq} in the cache (it holds sequences {held}"
            f"{', ...' if len(info.shards) > 8 else ''})"
        )
    if position is not None and not 0 <= position <= m.seq_len - 2:
        raise CacheError(f"--position {position} is outside [0, {m.seq_len - 2}] (sequences of {m.seq_len} tokens)")
    with naming_storage_errors(info.store.member(shard.name)):
        rows = encoding_for(m).decode(_read_shard(info, shard.name))
    row = seq - shard.first_seq_id
    mask = rows.loss_mask[row, 1:]
    if position is None:
        trained = np.flatnonzero(mask)
        position = int(trained[len(trained) // 2]) if trained.size else 0
    decode = (lambda ids: tokenizer.decode(ids)) if tokenizer is not None else (lambda ids: str(ids))
    context = rows.input_ids[row, max(0, position - 15) : position + 1]
    target = int(rows.input_ids[row, position + 1])
    lines.append("")
    lines.append(f"seq {int(rows.seq_ids[row])}, position {position}: context …{decode(context.tolist())!r}")
    lines.append(
        f"  true next token {decode([target])!r} (id {target}): teacher log p = "
        f"{float(rows.target_logprob[row, position]):.3f} (p = {np.exp(float(rows.target_logprob[row, position])):.4f})"
    )
    for j in range(min(show, m.k)):
        tid = int(rows.topk_ids[row, position, j])
        lp = float(rows.topk_logprobs[row, position, j])
        lines.append(f"  #{j + 1:<3} {decode([tid])!r:>16} (id {tid:>6})  p = {np.exp(lp):.4f}  log p = {lp:.3f}")
    rest = tail_mass(rows.topk_logprobs)
    lines.append(f"  tail mass here: {float(rest[row, position]):.4f}")
    trained_rest = rest[rows.loss_mask[:, 1:]]
    if trained_rest.size:
        q = np.quantile(trained_rest, [0.5, 0.9, 0.99])
        lines.append(
            f"tail mass over {shard.name} ({trained_rest.size:,} trained positions): mean {trained_rest.mean():.4f}  "
            f"p50 {q[0]:.4f}  p90 {q[1]:.4f}  p99 {q[2]:.4f}  max {trained_rest.max():.4f}"
        )
        in_topk = (rows.topk_ids == rows.input_ids[:, 1:, None]).any(-1)[rows.loss_mask[:, 1:]]
        lines.append(f"true next token inside the top-{m.k}: {in_topk.mean():.1%} of trained positions")
    return "\n".join(lines)
