"""The cache manifest: identity of what was cached, and the commit log of finished shards.

A cache written by ``n`` workers has one manifest per worker (``manifest.json`` when n == 1, else
``manifest.worker{i}-of-{n}.json``); :func:`load_cache` treats their union as one cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kd_pipeline.cache.format.encodings import encoding_for
from kd_pipeline.cache.format.layout import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    READABLE_VERSIONS,
    SHARD_DIR,
    is_shard_name,
    manifest_name,
)
from kd_pipeline.cache.format.schema import ManifestFieldError, validate_manifest
from kd_pipeline.cache.format.storage import Store, naming_storage_errors, open_store
from kd_pipeline.errors import CacheError

# Fields that define what a cache *is*. A resume, a second worker or a student run must agree on them.
IDENTITY_FIELDS = (
    "format_version",
    "encoding",
    "teacher",
    "tokenizer",
    "k",
    "support",
    "sampling",
    "seq_len",
    "packing",
    "data",
)

# Keys that manifests of earlier versions hold and nothing reads any more; dropped on read so those caches load.
# logprob_dtype: always "float16", while the compact encoding decodes to float32 (encodings say what they decode to).
LEGACY_KEYS = ("logprob_dtype",)

# The fields of a manifest's `teacher` that say which model it is (its weights and config), leaving out where it was
# loaded from, its dtype and its backend: one model evaluated at another precision is still the same teacher.
TEACHER_MODEL_FIELDS = ("architecture", "config_sha256", "weights_sha256", "revision")

# Written by `pipeline distill` into final/: which cache and run made that model. A cache whose teacher
# directory has one copies it into its manifest's `lineage` (teacher-assistant chains).
LINEAGE_FILE = "lineage.json"


@dataclass
class ShardEntry:
    name: str  # relative to the cache dir, e.g. "shards/00000003.parquet"
    block: int  # shard index in the global sequence stream: holds seq_ids [block*R, block*R + rows)
    rows: int
    tokens: int
    bytes: int
    sha256: str
    first_seq_id: int
    last_seq_id: int
    tokens_sha256: str  # of the block's input_ids: lets a resume prove the data did not change
    trained: int | None = None  # trained targets (loss_mask True) in the block; None in caches made before it


@dataclass
class Manifest:
    teacher: dict
    backend: dict
    tokenizer: dict
    k: int
    seq_len: int
    data: dict
    rows_per_shard: int
    row_group_rows: int
    worker_index: int = 0
    num_workers: int = 1
    support: str = "topk"  # "topk": the teacher's k most likely tokens; "sampled": RS-KD importance samples
    sampling: dict = field(default_factory=dict)  # for "sampled": num_samples, temperature, seed
    packing: str = "concat"
    data_path: str = ""
    format_version: int = FORMAT_VERSION
    # How shards store the rows: {"name": <a kd_pipeline.cache.format.encodings encoding>, **its parameters}. Format v1 and
    # v2 manifests have no such entry: theirs is "exact".
    encoding: dict = field(default_factory=lambda: {"name": "exact"})
    shards: list[ShardEntry] = field(default_factory=list)
    complete: bool = False
    # Set when complete: total sequences in the stream and the sha256 over all their tokens.
    stream: dict = field(default_factory=dict)
    # Not identity: the teacher's LINEAGE_FILE when the teacher was itself distilled ({} otherwise).
    lineage: dict = field(default_factory=dict)

    def identity(self) -> dict:
        return {name: getattr(self, name) for name in IDENTITY_FIELDS}

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @staticmethod
    def from_json(text: str) -> Manifest:
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ManifestFieldError("(top level)", f"expected a JSON object, got {type(raw).__name__}")
        version = raw.get("format_version")
        if version not in READABLE_VERSIONS:
            raise CacheError(
                f"cache format version {version!r} is not supported by this version of the tool "
                f"(it reads versions {', '.join(map(str, READABLE_VERSIONS))})"
            )
        for key in LEGACY_KEYS:
            raw.pop(key, None)
        validate_manifest(raw, Manifest, ShardEntry)
        raw["shards"] = [ShardEntry(**s) for s in raw.get("shards", [])]
        for shard in raw["shards"]:
            if not is_shard_name(shard.name):
                raise ValueError(f"shard name {shard.name!r} is not a file name inside {SHARD_DIR}/")
        manifest = Manifest(**raw)
        try:
            encoding_for(manifest).validate()
        except (ValueError, KeyError) as e:
            raise CacheError(f"cache encoding {manifest.encoding.get('name')!r}: {e}") from e
        return manifest

    def save(self, cache_dir: Path | Store) -> None:
        """Write this worker's manifest whole (temp + rename locally, one PUT in a bucket): the commit point."""
        store = cache_dir if isinstance(cache_dir, Store) else open_store(cache_dir)
        store.write_bytes(manifest_name(self.worker_index, self.num_workers), self.to_json().encode())

    @property
    def total_tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)


def teacher_diff(a: dict, b: dict) -> list[str]:
    """How two manifests' `teacher` entries differ as models (TEACHER_MODEL_FIELDS), one line each; [] if the same
    model. A field only one of them records (a hub teacher has no weights hash) is not a difference."""
    return [
        f"{name}: {str(a[name])[:16]} != {str(b[name])[:16]}"
        for name in TEACHER_MODEL_FIELDS
        if name in a and name in b and a[name] != b[name]
    ]


def identity_diff(a: dict, b: dict) -> list[str]:
    """Human-readable differences between two identities (nested dicts flattened to dotted keys)."""

    def flat(d, prefix=""):
        out = {}
        for key, value in d.items():
            if isinstance(value, dict):
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    def shown(value) -> str:  # a table in the identity (the compact encoding's id order) is named by its hash
        text = repr(value)
        return (
            text if len(text) <= 80 else f"<{len(text)} chars, sha256 {hashlib.sha256(text.encode()).hexdigest()[:12]}>"
        )

    fa, fb = flat(a), flat(b)
    keys = sorted(set(fa) | set(fb))
    return [f"{key}: {shown(fa.get(key))} != {shown(fb.get(key))}" for key in keys if fa.get(key) != fb.get(key)]


def read_manifest(path: Path | str, store: Store | None = None) -> Manifest:
    """The manifest at ``path``, or at the name ``path`` inside ``store``."""
    where = store.member(str(path)) if store is not None else path
    with naming_storage_errors(str(where)):
        text = store.read_bytes(str(path)).decode() if store is not None else Path(path).read_text()
    try:
        return Manifest.from_json(text)
    except ManifestFieldError as e:
        raise CacheError(f"{where}: corrupt manifest, {e}") from e
    except CacheError as e:
        raise CacheError(f"{where}: {e}") from e
    except (ValueError, TypeError, KeyError) as e:  # json.JSONDecodeError is a ValueError
        raise CacheError(f"{where}: corrupt manifest, not a valid cache manifest ({e})") from e


@dataclass
class CacheInfo:
    """A whole cache as the reader sees it: one identity, shards from every worker sorted by block."""

    root: Path | str  # a local directory, or the URL of a cache in an object store
    manifest: Manifest  # the first worker's; identity and settings are shared by all
    shards: list[ShardEntry]
    complete: bool
    store: Store | None = None  # where the files are; None: the local directory ``root``

    def __post_init__(self):
        if self.store is None:
            self.store = open_store(self.root)

    @property
    def num_sequences(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def num_tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    @property
    def num_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    @property
    def num_trained(self) -> int | None:
        """Trained targets in the whole cache, None if a shard does not record its count (an older cache)."""
        counts = [s.trained for s in self.shards]
        return None if any(c is None for c in counts) else sum(counts)

    def check_trains_something(self) -> None:
        """A complete cache with no trained position would make a student that learned nothing look perfect."""
        if self.complete and self.num_trained == 0:
            raise CacheError(
                f"{self.root}: none of the cache's {self.num_tokens:,} tokens is a trained target: chat data whose "
                "assistant turns use a role this tool does not train (see `pipeline cache-teacher --help`, "
                "--assistant-role), or conversations with no assistant turn"
            )

    def fingerprint(self) -> str:
        """Identifies this exact cache content (identity + shard checksums)."""
        h = hashlib.sha256(json.dumps(self.manifest.identity(), sort_keys=True).encode())
        for s in self.shards:
            h.update(s.sha256.encode())
        return h.hexdigest()[:16]


def load_cache(root: str | Path, require_complete: bool = True, storage_options: dict | None = None) -> CacheInfo:
    """The cache at ``root``: a local directory or a URL (``s3://bucket/prefix``, ``gs://``, any fsspec protocol
    installed), ``storage_options`` passed to its filesystem."""
    store = open_store(root, storage_options)
    root = store.root if store.local else os.fspath(root).rstrip("/")
    with naming_storage_errors(str(root)):
        if not store.root_exists():
            raise CacheError(f"{root}: no such cache directory")
        names = store.list("")
    paths = [MANIFEST_NAME] if MANIFEST_NAME in names else [n for n in names if _is_worker_manifest(n)]
    if not paths:
        raise CacheError(f"{root}: no manifest.json (is this a cache written by `pipeline cache-teacher`?)")
    manifests = [read_manifest(p, store) for p in paths]
    first = manifests[0]
    for path, m in zip(paths[1:], manifests[1:]):
        diff = identity_diff(first.identity(), m.identity())
        if diff:
            raise CacheError(f"{path} describes a different cache than {paths[0]}: " + "; ".join(diff))
    expected_workers = first.num_workers
    found = sorted(m.worker_index for m in manifests)
    complete = all(m.complete for m in manifests) and found == list(range(expected_workers))
    if require_complete and not complete:
        missing = sorted(set(range(expected_workers)) - set(found))
        unfinished = [m.worker_index for m in manifests if not m.complete]
        detail = []
        if missing:
            detail.append(f"no manifest from worker(s) {missing}")
        if unfinished:
            detail.append(f"worker(s) {unfinished} not finished")
        raise CacheError(
            f"{root}: cache is incomplete ({'; '.join(detail)}); rerun the same `pipeline cache-teacher` "
            "command to finish it"
        )
    shards = sorted((s for m in manifests for s in m.shards), key=lambda s: s.block)
    blocks = [s.block for s in shards]
    if len(set(blocks)) != len(blocks):
        raise CacheError(f"{root}: two manifests claim the same shard block")
    return CacheInfo(root=root, manifest=first, shards=shards, complete=complete, store=store)


def _is_worker_manifest(name: str) -> bool:
    from fnmatch import fnmatchcase

    return fnmatchcase(name, "manifest.worker*-of-*.json")


def tokenizer_fingerprint(tokenizer) -> dict:
    """What a student must share with the teacher: the id ↔ token map and the special tokens."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    specials = {name: getattr(tokenizer, name, None) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    payload = json.dumps({"vocab": vocab, "specials": specials}, ensure_ascii=False, sort_keys=True)
    return {
        "sha256": hashlib.sha256(payload.encode()).hexdigest(),
        "vocab_size": len(vocab),
        **specials,
    }
