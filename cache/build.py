"""Stage one: run a teacher over a token stream and write the top-k cache, resumably.

The stream of fixed-length sequences is cut into blocks of ``rows_per_shard`` sequences; block ``b``
becomes ``shards/{b:08d}.parquet`` and belongs to worker ``b % num_workers``. Shard bytes therefore
depend only on (teacher, data, options), not on how many workers wrote them or where a run was killed.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from kd_pipeline.cache.backends import TeacherBackend, check_seq_len, select_backend
from kd_pipeline.cache.config import CacheConfig
from kd_pipeline.cache.data import DataSpec, iter_sequences, source_fingerprint
from kd_pipeline.cache.format.encodings import encoding_class, encoding_for
from kd_pipeline.cache.format.files import sha256_file, write_shard
from kd_pipeline.cache.format.layout import SHARD_DIR, TOKENIZER_DIR, manifest_name, shard_name
from kd_pipeline.cache.format.manifest import (
    LINEAGE_FILE,
    Manifest,
    ShardEntry,
    identity_diff,
    load_cache,
    read_manifest,
    tokenizer_fingerprint,
)
from kd_pipeline.cache.format.rows import CacheRows, id_list, invalid_rows, tokens_sha256
from kd_pipeline.cache.format.storage import (
    Store,
    WrittenFile,
    describe_error,
    is_storage_failure,
    naming_storage_errors,
    open_store,
    parse_storage_options,
)
from kd_pipeline.config import CONFIG_FILE, config_yaml
from kd_pipeline.errors import CacheError, ConfigError
from kd_pipeline.models import check_model_path, load_config, load_tokenizer, teacher_identity
from kd_pipeline.signals import stopping_cache

# (index, count) variables of launchers that start one process per task; torchrun's first, since under
# `srun torchrun` they name the process while SLURM's name the node.
LAUNCHER_ENV = (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS"))


def launcher_worker(env=None) -> tuple[int, int, str] | None:
    """(worker index, number of workers, source) from the launcher's environment, or None if none is set."""
    env = os.environ if env is None else env
    for index_var, count_var in LAUNCHER_ENV:
        if index_var in env and count_var in env:
            try:
                return int(env[index_var]), int(env[count_var]), f"{index_var}/{count_var}"
            except ValueError:
                raise ConfigError(
                    f"{index_var}={env[index_var]!r} / {count_var}={env[count_var]!r} are not integers; "
                    "unset them or pass --worker-index and --num-workers"
                ) from None
    return None


def with_workers(config: CacheConfig, env=None) -> CacheConfig:
    """Fill an unset --worker-index / --num-workers from the launcher (srun, torchrun), else 0 / 1."""
    if config.worker_index is not None and config.num_workers is not None:
        return config
    found = launcher_worker(env)
    index, count = (found[0], found[1]) if found else (0, 1)
    resolved = replace(
        config,
        worker_index=index if config.worker_index is None else config.worker_index,
        num_workers=count if config.num_workers is None else config.num_workers,
    )
    if found:
        _log(f"worker {resolved.worker_index} of {resolved.num_workers} (from {found[2]})")
    return resolved


def _without_path(d: dict) -> dict:
    return {key: value for key, value in d.items() if key != "path"}


def _blocks(sequences: Iterator[tuple[np.ndarray, np.ndarray]], rows: int):
    """Group the sequence stream into (block index, input_ids [R, L], loss_mask [R, L])."""
    ids, masks = [], []
    block = 0
    for seq_ids, seq_mask in sequences:
        ids.append(seq_ids)
        masks.append(seq_mask)
        if len(ids) == rows:
            yield block, np.stack(ids), np.stack(masks)
            ids, masks = [], []
            block += 1
    if ids:
        yield block, np.stack(ids), np.stack(masks)


def _clean_stray_temp_files(config: CacheConfig, store: Store) -> None:
    """Temp files (local) and multipart uploads (S3) of this worker's blocks left by a killed run."""

    def mine(name: str) -> bool:
        base = name.rsplit("/", 1)[-1]
        return not _is_block_file(base) or int(base[:-8]) % config.num_workers == config.worker_index

    for removed in store.clean_interrupted(mine):
        if not store.local:
            _log(f"{removed}: left by an interrupted run; aborted")


@contextlib.contextmanager
def _naming_write_errors(path: Path | str):
    """A failed write (full disk, quota, read-only file system, a refused or unreachable bucket) is one line
    naming the file. What was committed before stays committed: the same command resumes once the cause is fixed."""
    try:
        yield
    except Exception as e:
        if not is_storage_failure(e):
            raise
        reason = (e.strerror if isinstance(e, OSError) else None) or describe_error(e)
        raise CacheError(
            f"{path}: cannot write ({reason}); the shards committed so far are kept, rerun the same command "
            "to resume once this is fixed"
        ) from e


def _is_block_file(name: str) -> bool:
    return name.endswith(".parquet") and name.removesuffix(".parquet").isdigit()


def _remove_uncommitted(config: CacheConfig, manifest: Manifest, store: Store) -> None:
    """Delete this worker's shard files that its manifest does not list: the manifest is the commit log,
    so these were written by a run killed between a shard's rename (or upload) and the manifest update, and
    will be written again. Other workers' files are theirs to judge."""
    listed = {Path(s.name).name for s in manifest.shards}
    for name in store.list(SHARD_DIR):
        if _is_block_file(name) and int(name[:-8]) % config.num_workers == config.worker_index and name not in listed:
            _log(
                f"{store.member(f'{SHARD_DIR}/{name}')}: not in the manifest (written by an interrupted run before its commit); removed"
            )
            store.delete(f"{SHARD_DIR}/{name}")


def _write_shard(store: Store, name: str, rows: CacheRows, row_group_rows: int, encoding) -> WrittenFile:
    """One shard, visible whole or not at all: locally write_shard's temp + fsync + rename, in a bucket one upload
    completed only on success (its sha256 computed as the bytes go out)."""
    if store.local:
        path = store.root / name
        write_shard(rows, path, row_group_rows, encoding)
        return WrittenFile(bytes=path.stat().st_size, sha256=sha256_file(path))
    return store.write_parquet(name, encoding.encode(rows), row_group_size=row_group_rows, **encoding.write_options)


def _teacher_lineage(teacher: str) -> dict:
    """A teacher written by `pipeline distill` (its final/ dir) says which cache and run made it."""
    path = Path(teacher) / LINEAGE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _save_tokenizer(tokenizer, store: Store) -> None:
    """Keep the teacher's tokenizer with the cache: students are checked against it, inspect decodes with it.
    In a bucket its files are uploaded again by every run (a killed upload may have left some of them)."""
    if store.local and store.is_folder(TOKENIZER_DIR):
        return
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        store.put_dir(Path(tmp), TOKENIZER_DIR)


def _manifest_names(store: Store) -> list[str]:
    return [n for n in store.list("") if n.startswith("manifest") and n.endswith(".json")]


def _prepare_output(config: CacheConfig, fresh: Manifest, store: Store) -> Manifest:
    """Return the manifest to continue from: a new one, or the one on disk if it matches."""
    name = manifest_name(config.worker_index, config.num_workers)
    path = store.member(name)
    if config.overwrite:
        if config.num_workers == 1:
            for p in _manifest_names(store):
                store.delete(p)
            store.delete_tree(SHARD_DIR)
            store.delete_tree(TOKENIZER_DIR)
        else:  # other workers may be running: remove only this worker's manifest and blocks
            store.delete(name)
            for shard in store.list(SHARD_DIR):
                stem = shard.removesuffix(".parquet")
                if (
                    shard.endswith(".parquet")
                    and stem.isdigit()
                    and int(stem) % config.num_workers == config.worker_index
                ):
                    store.delete(f"{SHARD_DIR}/{shard}")
    if store.exists(name):
        existing = read_manifest(name, store)
        diff = identity_diff(existing.identity(), fresh.identity())
        settings = [
            f"{name}: {getattr(existing, name)} != {getattr(fresh, name)}"
            for name in ("rows_per_shard", "row_group_rows", "num_workers")
            if getattr(existing, name) != getattr(fresh, name)
        ]
        if diff or settings:
            raise CacheError(
                f"{path} was written for a different cache, refusing to resume:\n  "
                + "\n  ".join(diff + settings)
                + "\nUse a new --out, or --overwrite to delete the existing cache."
            )
        sizes = store.sizes(SHARD_DIR)
        for shard in existing.shards:
            if sizes.get(shard.name.rsplit("/", 1)[-1]) != shard.bytes:
                raise CacheError(f"{store.member(shard.name)}: listed in the manifest but missing or of the wrong size")
        return existing
    layout = {manifest_name(i, config.num_workers) for i in range(config.num_workers)}
    existing_manifests = _manifest_names(store)
    foreign = [p for p in existing_manifests if p not in layout]
    if foreign:
        raise CacheError(
            f"{config.out} holds a cache written with a different --num-workers ({foreign[0]}); "
            "use the same worker layout, a new --out, or --overwrite"
        )
    for sibling in existing_manifests:  # another worker of this layout: it must be the same cache
        diff = identity_diff(read_manifest(sibling, store).identity(), fresh.identity())
        if diff:
            raise CacheError(f"{store.member(sibling)} describes a different cache:\n  " + "\n  ".join(diff))
    # Block files without a manifest are uncommitted and rewritten (_remove_uncommitted); anything else
    # there is not ours to delete.
    foreign = (
        [n for n in store.list(SHARD_DIR) if not _is_block_file(n) and not n.startswith(".")]
        if not existing_manifests
        else []
    )
    if foreign:
        raise CacheError(
            f"{store.member(SHARD_DIR)} holds files that are not shards of a cache ({', '.join(sorted(foreign)[:3])}) "
            "and no manifest; use a new --out, or --overwrite to start over"
        )
    return fresh


def writer_lock_name(worker_index: int) -> str:
    return f".writer{worker_index:03d}.lock"


def cache_teacher(config: CacheConfig) -> Manifest:
    """Build (or resume, or finish) the cache described by ``config``; return its final manifest.

    One writer per (out, worker index): a second one is refused while the first runs (cache/format/lock.py).
    ``out`` may be a URL (cache/format/storage.py): shards are uploaded whole, the manifest written after them."""
    given, config = config, with_workers(config)
    config.validate()
    backend = select_backend(config)  # refuses an unknown name or a cache the backend cannot produce
    check_model_path(config.teacher, "--teacher")
    store = open_store(config.out, config.storage_options)
    what = f"cache {config.out}" + (f" (worker {config.worker_index})" if config.num_workers > 1 else "")
    with (
        store.lock(writer_lock_name(config.worker_index), what, enabled=not config.no_lock) as lease,
        stopping_cache(config, given),
    ):
        return _build(config, backend, store, lease)


def _fresh_manifest(
    config: CacheConfig, backend: type[TeacherBackend], tokenizer, spec: DataSpec, first_block_ids: np.ndarray
) -> Manifest:
    """The manifest a new cache of ``config`` starts with: its identity (what a resume, another worker or a student
    must agree on) and its settings, no shard yet. The encoding's parameters come from the first block's tokens."""
    tokenizer_identity = tokenizer_fingerprint(tokenizer)
    encoding_params = encoding_class(config.encoding).new_params(
        first_block_input_ids=first_block_ids,
        vocab_size=tokenizer_identity["vocab_size"],
        min_logprob=config.min_logprob,
    )
    # Resolve "auto" now: a resume on another device must not silently mix float32 and bf16 numbers.
    fresh = Manifest(
        teacher=teacher_identity(
            config.teacher, config.revision, backend.teacher_dtype(config), config.trust_remote_code
        ),
        backend={"name": backend.name},
        tokenizer=tokenizer_identity,
        encoding={"name": config.encoding, **encoding_params},
        k=config.top_k,
        seq_len=config.seq_len,
        # The path is informational (a moved dataset still resumes); the bytes and options are identity.
        data={**_without_path(spec.describe()), "source": _without_path(source_fingerprint(config.data, config.split))},
        data_path=str(config.data),
        packing=spec.describe()["packing"],
        support=config.support,
        sampling=(
            {"num_samples": config.num_samples, "temperature": config.sample_temperature, "seed": config.sample_seed}
            if config.support == "sampled"
            else {}
        ),
        rows_per_shard=config.rows_per_shard,
        row_group_rows=config.row_group_rows,
        worker_index=config.worker_index,
        num_workers=config.num_workers,
        lineage=_teacher_lineage(config.teacher),
    )
    # The backend's name is part of the identity check: mixing HF and vLLM numbers in one cache would
    # make it depend on where a run was interrupted.
    fresh.teacher.update(backend=backend.name, **backend.identity(config))
    return fresh


def _commit_block(
    config: CacheConfig,
    store: Store,
    lease,
    manifest: Manifest,
    encoding,
    block: int,
    input_ids,
    loss_mask,
    scores,
    tokens_sha: str,
) -> None:
    """Write block ``block``'s shard whole, then the manifest that lists it (the commit point), or nothing: a block
    with values no teacher may give is refused before any byte is written."""
    first_seq = block * config.rows_per_shard
    rows = CacheRows(
        seq_ids=np.arange(first_seq, first_seq + len(input_ids), dtype=np.int64),
        input_ids=input_ids,
        loss_mask=loss_mask,
        topk_ids=scores.topk_ids,
        topk_logprobs=scores.topk_logprobs,
        target_logprob=scores.target_logprob,
    )
    name = shard_name(block)
    path = store.member(name)
    bad = invalid_rows(rows.topk_logprobs, rows.target_logprob, sampled=config.support == "sampled")
    if bad.size:
        raise CacheError(
            f"the teacher gave non-finite log-probabilities (NaN or inf) for sequences "
            f"{id_list(rows.seq_ids[bad])} of {path}; nothing was written for that block"
            + (f" (the {len(manifest.shards)} shard(s) committed before it are kept)" if manifest.shards else "")
            + ". Check the teacher's weights and --dtype (float16 overflows in some models)."
        )
    with _naming_write_errors(path):
        written = _write_shard(store, name, rows, manifest.row_group_rows, encoding)
    manifest.shards.append(
        ShardEntry(
            name=name,
            block=block,
            rows=rows.num_rows,
            tokens=int(input_ids.size),
            bytes=written.bytes,
            sha256=written.sha256,
            first_seq_id=int(rows.seq_ids[0]),
            last_seq_id=int(rows.seq_ids[-1]),
            tokens_sha256=tokens_sha,
            trained=int(loss_mask.sum()),
        )
    )
    manifest.shards.sort(key=lambda s: s.block)
    lease.check()  # never commit over a writer that took over an expired lease
    with _naming_write_errors(store.member(manifest_name(config.worker_index, config.num_workers))):
        manifest.save(store)  # the commit point of this shard


def _build(config: CacheConfig, backend: type[TeacherBackend], store: Store, lease) -> Manifest:
    started = time.perf_counter()
    tokenizer = load_tokenizer(
        config.teacher, "--teacher", revision=config.revision, trust_remote_code=config.trust_remote_code
    )
    spec = DataSpec(
        path=config.data,
        seq_len=config.seq_len,
        text_field=config.text_field,
        messages_field=config.messages_field,
        split=config.split,
        max_tokens=config.max_tokens,
        max_sequences=config.max_sequences,
        assistant_roles=list(config.assistant_roles),
    )
    teacher_config = load_config(
        config.teacher, "--teacher", revision=config.revision, trust_remote_code=config.trust_remote_code
    )
    check_seq_len(config.seq_len, teacher_config, config.teacher)
    # The encoding's parameters (the compact id table) come from the first block's tokens, which every
    # worker reads whether or not the block is its own: the same for a resume and for every worker.
    blocks = _blocks(iter_sequences(spec, tokenizer), config.rows_per_shard)
    first_block = next(blocks, None)
    if first_block is None:
        raise CacheError(f"{config.data}: the dataset produced no token sequences")
    blocks = itertools.chain([first_block], blocks)
    fresh = _fresh_manifest(config, backend, tokenizer, spec, first_block[1])
    with naming_storage_errors(store.member(""), "cannot use the output"):
        manifest = _prepare_output(config, fresh, store)
    if manifest.complete:
        options = parse_storage_options(config.storage_options)
        load_cache(config.out, require_complete=False, storage_options=options).check_trains_something()
        _log(f"{config.out}: cache already complete ({len(manifest.shards)} shards); nothing to do")
        return manifest
    if store.local:
        (store.root / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    with naming_storage_errors(store.member(""), "cannot clean up after an interrupted run"):
        _clean_stray_temp_files(config, store)
        _remove_uncommitted(config, manifest, store)
    with _naming_write_errors(store.member(TOKENIZER_DIR)):
        _save_tokenizer(tokenizer, store)
    if config.worker_index == 0:  # one copy per cache; docs/configuration.md says why these two are not kept
        # Storage options are not kept (they may hold credentials): a rerun gives them again.
        saved = replace(config, worker_index=None, overwrite=False, storage_options=[])
        with _naming_write_errors(store.member(CONFIG_FILE)):
            store.write_bytes(CONFIG_FILE, config_yaml(saved, "cache-teacher").encode())

    encoding = encoding_for(manifest)
    done = {s.block: s for s in manifest.shards}
    teacher = None  # loaded lazily: a finished or mismatched run never pays for the model
    load_seconds = score_seconds = 0.0
    stream_hash = hashlib.sha256()
    num_sequences = 0
    scored_tokens = 0
    planned = config.max_tokens or (config.max_sequences * config.seq_len if config.max_sequences else None)
    bar = None  # made once the teacher is ready, so its rate counts scoring only
    try:
        for block, input_ids, loss_mask in blocks:
            block_tokens_sha = tokens_sha256(input_ids)
            stream_hash.update(block_tokens_sha.encode())
            first_seq = block * config.rows_per_shard
            num_sequences = first_seq + len(input_ids)
            if block % config.num_workers != config.worker_index:
                continue
            if block in done:
                if done[block].tokens_sha256 != block_tokens_sha:
                    raise CacheError(
                        f"the data no longer produces the token sequences of {done[block].name}; the source "
                        "or the tokenizer changed since this cache was started. Use --overwrite to rebuild."
                    )
                continue
            if teacher is None:
                if config.progress:
                    _log(f"loading teacher {config.teacher} ({backend.name} backend) ...")
                loading = time.perf_counter()
                teacher = backend.from_config(config)
                load_seconds = time.perf_counter() - loading
                if config.progress:
                    _log(f"teacher ready in {load_seconds:.1f} s")
                manifest.backend = teacher.describe()["backend"]
                bar = tqdm(
                    total=planned // config.num_workers if planned else None,
                    initial=manifest.total_tokens,  # resumed shards count as done but not towards the rate
                    unit="tok",
                    unit_scale=True,
                    desc=f"caching (worker {config.worker_index}/{config.num_workers})",
                    disable=not config.progress,
                    dynamic_ncols=True,
                )
            scoring = time.perf_counter()
            scores = teacher.score(
                input_ids, progress=lambda n, bar=bar: bar.update(n * config.seq_len), first_seq_id=first_seq
            )
            score_seconds += time.perf_counter() - scoring
            _commit_block(
                config, store, lease, manifest, encoding, block, input_ids, loss_mask, scores, block_tokens_sha
            )
            scored_tokens += int(input_ids.size)
            bar.set_postfix(shards=len(manifest.shards), refresh=False)
    finally:
        if bar is not None:
            bar.close()
        if teacher is not None and hasattr(teacher, "close"):
            teacher.close()  # the engine's processes too, on errors and Ctrl-C
    if num_sequences == 0:
        raise CacheError(f"{config.data}: the dataset produced no token sequences")
    manifest.stream = {"num_sequences": num_sequences, "sha256": stream_hash.hexdigest()}
    manifest.complete = True
    lease.check()
    with _naming_write_errors(store.member(manifest_name(config.worker_index, config.num_workers))):
        manifest.save(store)
    with naming_storage_errors(store.member(""), "cannot read back"):  # once the last worker completes it
        options = parse_storage_options(config.storage_options)
        load_cache(config.out, require_complete=False, storage_options=options).check_trains_something()
    elapsed = time.perf_counter() - started
    tokens, size = manifest.total_tokens, manifest.total_bytes
    _log(
        f"done: {len(manifest.shards)} shards, {tokens:,} tokens, {size / 2**20:.1f} MiB, "
        f"{size / max(tokens, 1):.1f} B/token; scored {scored_tokens:,} tokens this run in {score_seconds:.1f} s "
        f"of teacher time ({scored_tokens / max(score_seconds, 1e-9):,.0f} tok/s); teacher load "
        f"{load_seconds:.1f} s; {elapsed:.1f} s in all"
    )
    return manifest


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
