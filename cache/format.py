"""The cache format both stages share: shard schema, encode/decode, tail mass, durable file commits.

This module is the single definition of the on-disk layout (see ../shared/DESIGN.md, "Cache layout").
Stage one encodes with :func:`to_table`; stage two decodes with :func:`from_record_batch`.

Alignment, for a sequence of ``L`` tokens and support size ``k``:

- ``input_ids[t]``, ``loss_mask[t]`` for t in [0, L): ``loss_mask[t]`` says whether token t is a trained
  *target* (so ``loss_mask[0]`` is always False: nothing predicts the first token).
- ``topk_ids[t, j]``, ``topk_logprobs[t, j]`` for t in [0, L-1): the teacher's j-th most likely token
  after reading tokens 0..t, i.e. the distribution predicting ``input_ids[t+1]``; log-probabilities over
  the full vocabulary, temperature 1, sorted descending.
- ``target_logprob[t]``: the teacher's log-probability of ``input_ids[t+1]``, whether or not it is in
  the top-k.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FORMAT_VERSION = 2  # what this version writes
READABLE_VERSIONS = (1, 2)  # what it reads: v2 only declared the list elements non-nullable
MANIFEST_NAME = "manifest.json"
SHARD_DIR = "shards"
TOKENIZER_DIR = "tokenizer"  # a copy of the teacher's tokenizer, saved with the cache

# Stored precision of the teacher's log-probabilities. fp16 keeps |error| <= 2^-6 for lp in [-32, -16]
# and finer above; the loss computes in fp32 after decode.
LOGPROB_DTYPE = np.float16


def _list_type(value_type: pa.DataType, version: int) -> pa.DataType:
    # v2: non-nullable elements, so Parquet stores and decodes no definition level per value (one per row
    # remains): the same bytes within 0.01%, 1.25-1.5x faster decoding across runs (bench/RESULTS.md, "Reader").
    return pa.list_(pa.field("element", value_type, nullable=False)) if version >= 2 else pa.list_(value_type)


def shard_schema(version: int = FORMAT_VERSION) -> pa.Schema:
    if version not in READABLE_VERSIONS:
        raise ValueError(f"unknown cache format version {version}")
    columns = [("input_ids", pa.int32()), ("loss_mask", pa.bool_()), ("topk_ids", pa.int32()),
               ("topk_logprobs", pa.float16()), ("target_logprob", pa.float16())]  # fmt: skip
    return pa.schema(
        [pa.field("seq_id", pa.int64(), nullable=False)]
        + [pa.field(name, _list_type(value_type, version), nullable=False) for name, value_type in columns],
        metadata={"kd_cache_format": str(version)},
    )


SHARD_SCHEMA = shard_schema()

# Parquet settings, chosen by bench/bench_writer.py. Per-column options on list columns must name the
# leaf path ("col.list.element"): the top-level name is silently ignored by pyarrow.
_LEAF = "{}.list.element"
_BYTE_STREAM_SPLIT = [_LEAF.format(c) for c in ("topk_ids", "topk_logprobs", "target_logprob")]
PARQUET_WRITE_OPTIONS = dict(
    compression="zstd",
    # Top-k ids and log-prob mantissas are near-random bytes: zstd's match search finds little in them, so
    # level 1 writes files as small as level 3's at k <= 64 (1% larger at k=128) for 1.2-1.5x less CPU
    # (bench/RESULTS.md, "Writer and storage").
    compression_level=1,
    use_dictionary=False,  # dictionary pages would win over byte-stream-split and bloat random ids
    use_byte_stream_split=_BYTE_STREAM_SPLIT,
    write_statistics=["seq_id"],  # min/max seq_id per row group; stats on token lists cost bytes only
    data_page_size=1 << 20,
)


@dataclass
class CacheRows:
    """A batch of ``B`` cached sequences as numpy arrays (the in-memory form of shard rows).

    Shapes: seq_ids [B] int64; input_ids [B, L] int32; loss_mask [B, L] bool;
    topk_ids [B, L-1, k] int32; topk_logprobs [B, L-1, k] float; target_logprob [B, L-1] float.
    """

    seq_ids: np.ndarray
    input_ids: np.ndarray
    loss_mask: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    target_logprob: np.ndarray

    @property
    def num_rows(self) -> int:
        return int(self.seq_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def k(self) -> int:
        return int(self.topk_ids.shape[2])

    def validate(self) -> None:
        b, length = self.input_ids.shape
        k = self.topk_ids.shape[-1]
        expected = {
            "seq_ids": (b,),
            "loss_mask": (b, length),
            "topk_ids": (b, length - 1, k),
            "topk_logprobs": (b, length - 1, k),
            "target_logprob": (b, length - 1),
        }
        for name, shape in expected.items():
            got = getattr(self, name).shape
            if got != shape:
                raise ValueError(f"CacheRows.{name} has shape {got}, expected {shape}")

    @staticmethod
    def concat(parts: list["CacheRows"]) -> "CacheRows":
        return CacheRows(
            **{f: np.concatenate([getattr(p, f) for p in parts]) for f in CacheRows.__dataclass_fields__}
        )

    def slice(self, start: int, stop: int) -> "CacheRows":
        return CacheRows(**{f: getattr(self, f)[start:stop] for f in CacheRows.__dataclass_fields__})


def _list_array(values: np.ndarray, list_type: pa.ListType) -> pa.ListArray:
    """[B, ...] numpy → a list array with one row per leading index, without per-element Python."""
    rows = values.shape[0]
    width = int(np.prod(values.shape[1:], dtype=np.int64))
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * width, type=pa.int32())
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=list_type.value_type)
    return pa.ListArray.from_arrays(offsets, flat, type=list_type)


def to_table(rows: CacheRows) -> pa.Table:
    """Encode rows for a shard. Log-probabilities are rounded to :data:`LOGPROB_DTYPE` here, once."""
    rows.validate()
    lists = {
        "input_ids": rows.input_ids.astype(np.int32, copy=False),
        "loss_mask": rows.loss_mask.astype(np.bool_, copy=False),
        "topk_ids": rows.topk_ids.astype(np.int32, copy=False),
        "topk_logprobs": rows.topk_logprobs.astype(LOGPROB_DTYPE),
        "target_logprob": rows.target_logprob.astype(LOGPROB_DTYPE),
    }
    columns = [pa.array(rows.seq_ids.astype(np.int64, copy=False))]
    columns += [_list_array(values, SHARD_SCHEMA.field(name).type) for name, values in lists.items()]
    return pa.Table.from_arrays(columns, schema=SHARD_SCHEMA)


def _flat_values(column: pa.Array, row_width: int, name: str) -> np.ndarray:
    """Flattened values of a list column whose rows must all have ``row_width`` elements."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    offsets = column.offsets.to_numpy()
    lengths = np.diff(offsets)
    if lengths.size and not (lengths == row_width).all():
        bad = int(np.flatnonzero(lengths != row_width)[0])
        raise ValueError(f"column {name!r}: row {bad} has {lengths[bad]} values, expected {row_width}")
    values = column.flatten()  # respects slicing offsets
    zero_copy = not pa.types.is_boolean(values.type)
    return values.to_numpy(zero_copy_only=zero_copy)


def from_record_batch(batch: pa.RecordBatch | pa.Table, seq_len: int, k: int) -> CacheRows:
    """Decode shard rows to numpy (zero-copy views where the arrow buffers allow)."""
    b = batch.num_rows
    col = batch.column
    return CacheRows(
        seq_ids=col("seq_id").to_numpy(),
        input_ids=_flat_values(col("input_ids"), seq_len, "input_ids").reshape(b, seq_len),
        loss_mask=_flat_values(col("loss_mask"), seq_len, "loss_mask").reshape(b, seq_len),
        topk_ids=_flat_values(col("topk_ids"), (seq_len - 1) * k, "topk_ids").reshape(b, seq_len - 1, k),
        topk_logprobs=_flat_values(col("topk_logprobs"), (seq_len - 1) * k, "topk_logprobs").reshape(
            b, seq_len - 1, k
        ),
        target_logprob=_flat_values(col("target_logprob"), seq_len - 1, "target_logprob").reshape(
            b, seq_len - 1
        ),
    )


def tail_mass(topk_logprobs):
    """Teacher probability outside the support: ``p_rest = max(0, 1 - sum_j exp(lp_j))`` in fp32.

    Accepts a torch tensor or numpy array of shape [..., k]; returns [...] of the same kind.
    """
    if isinstance(topk_logprobs, np.ndarray):
        return np.clip(1.0 - np.exp(topk_logprobs.astype(np.float32)).sum(-1), 0.0, None)
    return (1.0 - topk_logprobs.float().exp().sum(-1)).clamp_min(0.0)


# ---------------------------------------------------------------------------------------------------
# Durable files: write under a temporary name in the same directory, fsync, rename, fsync the directory.


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path_for(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def commit_file(tmp: Path, final: Path) -> None:
    """Make ``tmp`` durable and atomically move it to ``final``."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fsync_dir(final.parent)


def atomic_write_bytes(final: Path, data: bytes) -> None:
    tmp = temp_path_for(final)
    with open(tmp, "wb") as f:
        f.write(data)
    commit_file(tmp, final)


def write_shard(rows: CacheRows, final: Path, row_group_rows: int) -> None:
    """Write one shard durably. A crash leaves either no ``final`` or a complete one, never a short one."""
    tmp = temp_path_for(final)
    table = to_table(rows)
    pq.write_table(table, tmp, row_group_size=row_group_rows, **PARQUET_WRITE_OPTIONS)
    commit_file(tmp, final)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tokens_sha256(input_ids: np.ndarray) -> str:
    """Fingerprint of a token block (int32, row-major): lets a resumed run prove it regenerated the
    same sequences as the run that wrote the shard."""
    return hashlib.sha256(np.ascontiguousarray(input_ids, dtype=np.int32).tobytes()).hexdigest()
