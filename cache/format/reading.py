"""The public read API: every cache, whatever its format version or encoding, as numpy row groups.

from kd_pipeline import read_cache

for rows in read_cache("runs/cache"):          # one CacheRows per Parquet row group, in stream order
    rows.topk_ids, rows.topk_logprobs          # [B, L-1, k] int32, float32
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from kd_pipeline.cache.format.encodings import encoding_for
from kd_pipeline.cache.format.manifest import CacheInfo, load_cache
from kd_pipeline.cache.format.rows import CacheRows
from kd_pipeline.cache.format.storage import naming_storage_errors
from kd_pipeline.errors import CacheError


def read_cache(
    path: str | Path | CacheInfo,
    *,
    require_complete: bool = True,
    verify_checksums: bool = True,
    storage_options: dict | None = None,
) -> Iterator[CacheRows]:
    """Yield the cache's rows one Parquet row group at a time, shards in block (stream) order.

    Each :class:`CacheRows` holds ``B`` sequences of ``L`` tokens: seq_ids [B] int64, input_ids [B, L] int32,
    loss_mask [B, L] bool, topk_ids [B, L-1, k] int32, topk_logprobs [B, L-1, k] float32 (sorted
    descending, normalized over the full vocabulary; ``kd_pipeline.cache.format.rows.tail_mass`` gives the mass outside),
    target_logprob [B, L-1] float32. A shard whose checksum does not match its manifest raises
    :class:`kd_pipeline.errors.CacheError` before any of its rows are yielded. ``path`` may be a URL
    (``s3://bucket/cache``; ``storage_options`` go to its filesystem): row groups are then read by byte ranges.
    """
    info = (
        path
        if isinstance(path, CacheInfo)
        else load_cache(path, require_complete=require_complete, storage_options=storage_options)
    )
    encoding = encoding_for(info.manifest)
    store = info.store
    for shard in info.shards:
        file = store.member(shard.name)
        with naming_storage_errors(file):
            if not store.exists(shard.name):
                raise CacheError(f"{file}: shard listed in the manifest is missing")
            if verify_checksums and store.sha256(shard.name) != shard.sha256:
                raise CacheError(f"{file}: sha256 mismatch; the shard is corrupted (run `pipeline verify`)")
            with store.parquet_file(shard.name) as f:
                for group in range(f.num_row_groups):
                    yield encoding.decode(f.read_row_group(group)).as_float32()


def read_all(path: str | Path | CacheInfo, **kwargs) -> CacheRows:
    """The whole cache in memory as one :class:`CacheRows` (small caches, tests, tools)."""
    return CacheRows.concat(list(read_cache(path, **kwargs)))
