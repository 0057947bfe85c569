"""Seeded fuzzing of damaged shards: random truncations and byte flips, read by `verify` and by the reader.

Two kinds of damage:
- on disk after the commit (the manifest keeps the original checksum): every case must be refused, by `verify`
  and by the reader, with an error naming the file, so no damaged byte reaches a student.
- already in the bytes the manifest records (its checksum recomputed over the damage, as if written so): here the
  checksum cannot help, and what must hold is that decoding never crashes, hangs or raises anything but an
  error naming the file. Damage that still decodes (a flipped mantissa bit is a valid number) is what the
  checksums exist for.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from test_cache import config

from kd_pipeline.cache.build import cache_teacher
from kd_pipeline.cache.format.files import sha256_file
from kd_pipeline.cache.format.manifest import load_cache
from kd_pipeline.cache.format.verify import verify_cache
from kd_pipeline.errors import CacheError
from kd_pipeline.train.reader import CacheReader

CASES = 300
SEED = 20261201


@pytest.fixture(scope="module")
def one_shard_cache(tmp_path_factory, teacher_dir, corpus_jsonl) -> Path:
    """6 sequences of 32 tokens, k=8: one shard of two row groups."""
    out = tmp_path_factory.mktemp("fuzz") / "cache"
    cache_teacher(config(teacher_dir, corpus_jsonl, out, max_sequences=6))
    return out


def _damage(data: bytes, rng: np.random.Generator) -> bytes:
    if rng.random() < 0.3:
        return data[: int(rng.integers(0, len(data)))]
    out = bytearray(data)
    for at in rng.integers(0, len(out), size=int(rng.integers(1, 5))):
        out[at] ^= int(rng.integers(1, 256))
    return bytes(out)


def _read_everything(cache: Path) -> int:
    reader = CacheReader(cache, batch_size=4, shuffle=False, drop_remainder=False, prefetch=0)
    return sum(int(batch["seq_ids"].numel()) for batch in reader.iter_epoch(0))


def test_damaged_shards_are_named_never_crash_or_hang(tmp_path, one_shard_cache):
    cache = tmp_path / "cache"
    shutil.copytree(one_shard_cache, cache)
    (entry,) = load_cache(cache).shards
    shard, original = cache / entry.name, (cache / entry.name).read_bytes()
    manifest_path = cache / "manifest.json"
    manifest_text = manifest_path.read_text()
    rng = np.random.default_rng(SEED)
    started = time.perf_counter()
    recorded = {"refused": 0, "decoded": 0}
    for case in range(CASES):
        damaged = _damage(original, rng)
        if damaged == original:
            continue
        shard.write_bytes(damaged)
        trusted = case % 2 == 1  # every other case: the manifest records the damaged bytes
        if trusted:
            manifest = json.loads(manifest_text)
            manifest["shards"][0].update(sha256=sha256_file(shard), bytes=len(damaged))
            manifest_path.write_text(json.dumps(manifest))
        else:
            manifest_path.write_text(manifest_text)
        problems = verify_cache(cache).problems
        assert all(str(shard) in p for p in problems), (case, problems)
        try:
            read = _read_everything(cache)
        except CacheError as e:
            assert str(shard) in str(e), (case, e)
            recorded["refused"] += 1
        else:
            # Only bytes the manifest vouches for may be read, and then all of them.
            assert trusted and read == entry.rows, (case, read)
            recorded["decoded"] += 1
        if not trusted:
            assert problems, case  # verify refuses every damage the checksum sees
    assert recorded["refused"] > CASES // 2  # every untrusted case, and the trusted ones that do not decode
    assert time.perf_counter() - started < 120  # no hang (each case takes milliseconds)
