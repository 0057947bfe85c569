"""A cache's rows in memory (:class:`CacheRows`), their alignment, the tail mass, and the value rules.

How rows are laid out in a shard is the business of one encoding module each (cache/format/encodings/): the
manifest names the encoding, and writer, reader, ``verify`` and ``inspect`` dispatch on it
(docs/cache-format.md).

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
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa

from kd_pipeline.cache.format.layout import FORMAT_VERSION


def list_type(value_type: pa.DataType, version: int = FORMAT_VERSION) -> pa.DataType:
    # v2 on: non-nullable elements, so Parquet stores and decodes no definition level per value (one per row
    # remains): the same bytes within 0.01%, 1.25-1.5x faster decoding across runs (bench/RESULTS.md, "Reader").
    return pa.list_(pa.field("element", value_type, nullable=False)) if version >= 2 else pa.list_(value_type)


# Parquet settings shared by every encoding, chosen by bench/bench_writer.py. Per-column options on list
# columns must name the leaf path ("col.list.element"): the top-level name is silently ignored by pyarrow.
_LEAF = "{}.list.element"


def shard_write_options(byte_stream_split: tuple[str, ...]) -> dict:
    """``pq.write_table`` options for a shard whose listed columns hold near-random multi-byte values."""
    return dict(
        compression="zstd",
        # Top-k ids and log-prob mantissas are near-random bytes: zstd's match search finds little in them,
        # so level 1 writes files as small as level 3's at k <= 64 (1% larger at k=128) for 1.2-1.5x less
        # CPU (bench/RESULTS.md, "Writer and storage").
        compression_level=1,
        use_dictionary=False,  # dictionary pages would win over byte-stream-split and bloat random ids
        use_byte_stream_split=[_LEAF.format(c) for c in byte_stream_split],
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
    def concat(parts: list[CacheRows]) -> CacheRows:
        return CacheRows(**{f: np.concatenate([getattr(p, f) for p in parts]) for f in CacheRows.__dataclass_fields__})

    def as_float32(self) -> CacheRows:
        """The same rows with log-probabilities as float32 (fp16-stored values widen exactly)."""
        return replace(
            self,
            topk_logprobs=self.topk_logprobs.astype(np.float32, copy=False),
            target_logprob=self.target_logprob.astype(np.float32, copy=False),
        )

    def slice(self, start: int, stop: int) -> CacheRows:
        return CacheRows(**{f: getattr(self, f)[start:stop] for f in CacheRows.__dataclass_fields__})


def list_array(values: np.ndarray, list_type: pa.ListType) -> pa.ListArray:
    """[B, ...] numpy → a list array with one row per leading index, without per-element Python."""
    rows = values.shape[0]
    width = int(np.prod(values.shape[1:], dtype=np.int64))
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * width, type=pa.int32())
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=list_type.value_type)
    return pa.ListArray.from_arrays(offsets, flat, type=list_type)


def ragged_list_array(flat: np.ndarray, lengths: np.ndarray, list_type: pa.ListType) -> pa.ListArray:
    """Row ``i`` holds the next ``lengths[i]`` values of ``flat``."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=list_type.value_type), type=list_type)


def _combined(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(column, pa.ChunkedArray):  # one chunk per row group read: no copy needed
        return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    return column


def flat_values(column: pa.Array, row_width: int, name: str) -> np.ndarray:
    """Flattened values of a list column whose rows must all have ``row_width`` elements."""
    column = _combined(column)
    lengths = np.diff(column.offsets.to_numpy())
    if lengths.size and not (lengths == row_width).all():
        bad = int(np.flatnonzero(lengths != row_width)[0])
        raise ValueError(f"column {name!r}: row {bad} has {lengths[bad]} values, expected {row_width}")
    return ragged_values(column)


def binary_values(column: pa.Array) -> np.ndarray:
    """All bytes of a binary column, rows concatenated, as uint8 (zero-copy)."""
    column = _combined(column)
    offsets = np.frombuffer(column.buffers()[1], dtype=np.int32)[column.offset : column.offset + len(column) + 1]
    data = column.buffers()[2]
    if data is None:
        return np.empty(0, dtype=np.uint8)
    return np.frombuffer(data, dtype=np.uint8)[offsets[0] : offsets[-1]]


def binary_array(flat: np.ndarray, lengths: np.ndarray) -> pa.BinaryArray:
    """Row ``i`` holds the next ``lengths[i]`` bytes of ``flat`` (uint8)."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.BinaryArray.from_buffers(
        pa.binary(), len(lengths), [None, pa.py_buffer(offsets), pa.py_buffer(np.ascontiguousarray(flat, np.uint8))]
    )


def ragged_values(column: pa.Array) -> np.ndarray:
    """All values of a list column, rows concatenated (zero-copy where the type allows)."""
    values = _combined(column).flatten()  # respects slicing offsets
    return values.to_numpy(zero_copy_only=not pa.types.is_boolean(values.type))


def tail_mass(topk_logprobs):
    """Teacher probability outside the support: ``p_rest = max(0, 1 - sum_j exp(lp_j))`` in fp32.

    Accepts a torch tensor or numpy array of shape [..., k]; returns [...] of the same kind.
    """
    if isinstance(topk_logprobs, np.ndarray):
        return np.clip(1.0 - np.exp(topk_logprobs.astype(np.float32)).sum(-1), 0.0, None)
    return (1.0 - topk_logprobs.float().exp().sum(-1)).clamp_min(0.0)


def tokens_sha256(input_ids: np.ndarray) -> str:
    """Fingerprint of a token block (int32, row-major): lets a resumed run prove it regenerated the
    same sequences as the run that wrote the shard."""
    return hashlib.sha256(np.ascontiguousarray(input_ids, dtype=np.int32).tobytes()).hexdigest()


def invalid_rows(topk_logprobs: np.ndarray, target_logprob: np.ndarray, sampled: bool = False) -> np.ndarray:
    """Indices of the sequences (rows of topk_logprobs [B, L-1, k], target_logprob [B, L-1]) holding values
    no teacher may give: NaN, +inf, or -inf, which only a sampled support's zero-weight pads may hold (see
    :func:`~kd_pipeline.cache.backends.hf.sample_support`). One rule for the writer, which refuses to commit such a block, and for verify."""
    support = np.asarray(topk_logprobs)
    target = np.asarray(target_logprob)
    bad = np.isnan(support) | (support == np.inf) if sampled else ~np.isfinite(support)
    rows = bad.reshape(len(support), -1).any(1) | ~np.isfinite(target).reshape(len(target), -1).any(1)
    return np.flatnonzero(rows)


def id_list(ids, show: int = 8) -> str:
    """``3, 4, 9 and 12 more``: sequence ids for a message."""
    ids = [int(i) for i in ids]
    more = f" and {len(ids) - show} more" if len(ids) > show else ""
    return ", ".join(map(str, ids[:show])) + more
