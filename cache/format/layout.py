"""Where things are in a cache directory, and which format versions exist.

A cache is a directory (or a bucket prefix) holding::

    manifest.json                       the commit log (manifest.worker{i:03d}-of-{n:03d}.json per writer when
                                        several write one cache): identity, then one entry per finished shard
    shards/{block:08d}.parquet          one shard per block of the sequence stream
    tokenizer/                          a copy of the teacher's tokenizer

docs/cache-format.md is the specification.
"""

from __future__ import annotations

FORMAT_VERSION = 3  # what this version writes
READABLE_VERSIONS = (1, 2, 3)  # v2 declared the list elements non-nullable; v3 names an encoding
MANIFEST_NAME = "manifest.json"
SHARD_DIR = "shards"
TOKENIZER_DIR = "tokenizer"  # a copy of the teacher's tokenizer, saved with the cache


def manifest_name(worker_index: int, num_workers: int) -> str:
    if num_workers == 1:
        return MANIFEST_NAME
    return f"manifest.worker{worker_index:03d}-of-{num_workers:03d}.json"


def shard_name(block: int) -> str:
    return f"{SHARD_DIR}/{block:08d}.parquet"


def is_shard_name(name) -> bool:
    """Whether ``name`` is a plain file name inside the cache's shard folder (``shards/NAME``). Nothing else
    may be listed: a name that climbs out (``../x``, ``/etc/x``) or into a subfolder would let a damaged or
    hostile manifest read any file."""
    parts = name.split("/") if isinstance(name, str) else []
    return (
        len(parts) == 2
        and parts[0] == SHARD_DIR
        and parts[1] not in ("", ".", "..")
        and not any(c in parts[1] for c in "\\\0")
    )
