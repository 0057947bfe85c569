"""The ``compact`` encoding (format v3, the default): quantized log-prob gaps and frequency-ranked ids.

Per position ``t`` the stored support is the teacher's first ``n_t <= k`` entries (``n_t = k`` unless
``min_logprob`` cut it, or a sampled support had fewer distinct draws), sorted by log-probability:

- ``top_logprob`` fp16: the top-1 log-probability ``lp_1``.
- ``gap_steps`` uint8, ``n_t - 1`` per position: with ``q_j = round((lp_1 - lp_j) / step)`` (``lp_1`` as
  stored), the increments ``q_j - q_{j-1}`` (``q_1 = 0``). The support is sorted, so they are small
  non-negative integers that zstd codes in ~3 bits; one of 255 or more is stored as 255 and its value
  goes to ``gap_overflow`` (int32, in order).
- ``log_mass_shift`` fp16: ``c_t``, added to every decoded log-prob of the position so that the decoded
  support carries exactly the teacher's mass over it (log-sum-exp of the teacher's kept values). The tail
  mass is then the usual ``1 - sum(exp(lp))`` of the decoded support (one definition, cache/format/rows.py),
  and equals the teacher's: what is lost to the quantization is how the support's mass is spread, not how
  much of it there is. Without it, ΔKL at k=64 is 3.6x larger and 0.6% of positions lose their rest bin
  (bench/RESULTS.md, "Cache format v3").
- ids, ``n_t`` per position: each id's rank in a frequency table (0 = most frequent), a bijection of
  ``[0, id_table_size)`` (ids beyond it are stored as themselves), split into bytes: ``id_heads`` (one
  byte per id: ranks < 64 themselves, else 64 + (rank - 64) // 256, 255 from rank 48,960 on),
  ``id_tails`` (the low byte of rank - 64, one per rank >= 64) and ``id_far`` (int32, (rank - 48,960)
  // 256 of the few ranks beyond). Frequent tokens get small ranks, and zstd's entropy coder sees each
  stream's own statistics: on the benchmark teacher ids cost 7% over their order-0 entropy. The table is a pure function of
  the input tokens of the cache's first block (every worker computes the same one without scoring it),
  stored in the manifest's ``encoding.id_order`` (ids by rank; unseen ids follow in id order) and part of
  the cache identity. Caches whose manifest names no ``encoding.id_layout`` (written before the split)
  store the ranks as ``topk_ids`` int32 lists with byte-stream-split, and are read and resumed as such.
- ``support_size`` uint16 ``n_t``; ``input_ids``, ``loss_mask``, ``target_logprob`` (fp16) as in ``exact``.

Decoding is a cumulative sum of the increments, one multiply-add and table lookups (vectorized numpy).
Positions with ``n_t < k`` decode to ``k`` entries: the rest get log-prob ``-inf`` (weight 0) and
distinct ids not in the support (the most frequent ones left), as sampled supports pad.

Error of a decoded kept log-prob: at most ``step / 2`` from the gap quantization, plus ``|c_t| <= step /
2``, plus half an fp16 step of the top-1 (``<= 2^-8`` for ``|lp_1| < 16``, i.e. any vocabulary under 8.8M
tokens): :meth:`CompactEncoding.error_bound`. Entries cut by ``min_logprob`` move their mass to the tail.
"""

from __future__ import annotations

import base64
import hashlib
from functools import cached_property

import numpy as np
import pyarrow as pa

from kd_pipeline.cache.format.encodings.base import Encoding, register
from kd_pipeline.cache.format.rows import (
    CacheRows,
    binary_array,
    binary_values,
    flat_values,
    list_array,
    list_type,
    ragged_list_array,
    ragged_values,
    shard_write_options,
)

# 1/22 nat: the coarsest step with ΔKL under 5e-5 at every k on the benchmark teacher (4.3e-5 at k=128,
# 3.9e-5 at k=64); 1/32 costs 2.7 B/token more at k=64 for ΔKL 1.8e-5 (bench/RESULTS.md, "Cache format v3").
DEFAULT_LOGPROB_STEP = 1 / 22
_SATURATED = 255  # a gap increment this large is stored in gap_overflow

# Ids are stored as their rank in the frequency table, split into bytes: a head byte per id (ranks below
# _DIRECT_RANKS are the head itself; up to _FAR_START the head holds the high part and the low byte goes to
# id_tails; head _FAR: a far rank, see _split_ranks). zstd's entropy coder sees each stream's own
# statistics: 0.6-2.5 B/token less than int32 ranks with byte-stream-split at k = 16-128 (bench/RESULTS.md,
# "Cache format v3").
_DIRECT_RANKS = 64
_FAR = 255
_FAR_START = _DIRECT_RANKS + (_FAR - _DIRECT_RANKS) * 256  # 48,960

_COMMON_COLUMNS = [
    ("input_ids", pa.int32()),
    ("loss_mask", pa.bool_()),
    ("support_size", pa.uint16()),
]
_VALUE_COLUMNS = [
    ("top_logprob", pa.float16()),
    ("gap_overflow", pa.int32()),
    ("log_mass_shift", pa.float16()),
    ("target_logprob", pa.float16()),
]


def _schema(id_columns: list, id_bytes: list) -> pa.Schema:
    lists = _COMMON_COLUMNS + id_columns + _VALUE_COLUMNS
    return pa.schema(
        [pa.field("seq_id", pa.int64(), nullable=False)]
        + [pa.field(name, list_type(value_type), nullable=False) for name, value_type in lists]
        # Bytes, not list<uint8>: Parquet has no 8-bit physical type and would widen each to an INT32.
        + [pa.field(name, pa.binary(), nullable=False) for name in ["gap_steps", *id_bytes]],
        metadata={"kd_cache_format": "3", "kd_cache_encoding": "compact"},
    )


_VALUES_SPLIT = ("top_logprob", "log_mass_shift", "target_logprob")
# id_layout "bytes" (written since 2026-12-01 23:00 UTC) and "int32" (the caches written before it, whose
# manifests name no id_layout: ranks as int32 lists with byte-stream-split), read and resumed alike.
_LAYOUTS = {
    "bytes": (
        _schema([("id_far", pa.int32())], ["id_heads", "id_tails"]),
        shard_write_options(byte_stream_split=("id_far", *_VALUES_SPLIT)),
    ),
    "int32": (
        _schema([("topk_ids", pa.int32())], []),
        shard_write_options(byte_stream_split=("topk_ids", *_VALUES_SPLIT)),
    ),
}
DEFAULT_ID_LAYOUT = "bytes"


def _count_per_row(flags: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """How many of ``flags`` (bool, rows concatenated, row ``i`` ``lengths[i]`` long) are set in each row."""
    counts = np.zeros(len(lengths), dtype=np.int64)
    starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    nonempty = lengths > 0
    if flags.size:  # a segment runs to the next non-empty row's start: empty rows in between add nothing
        # int32 sums: 4.5x faster than int64 ones (a row holds far fewer than 2^31 values).
        counts[nonempty] = np.add.reduceat(flags.view(np.uint8), starts[nonempty], dtype=np.int32)
    return counts


# Head and tail byte of each rank up to _FAR_START (np.take on these is 5x faster than the arithmetic with masks).
_HEAD_OF_RANK = np.minimum(((np.arange(_FAR_START + 1) - _DIRECT_RANKS) >> 8) + _DIRECT_RANKS, _FAR).astype(np.uint8)
_HEAD_OF_RANK[:_DIRECT_RANKS] = np.arange(_DIRECT_RANKS)
_TAIL_OF_RANK = ((np.arange(_FAR_START + 1) - _DIRECT_RANKS) & 0xFF).astype(np.uint8)


def _split_ranks(ranks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """int32 ranks → (head bytes, one per rank; tail bytes, one per rank >= _DIRECT_RANKS; for the ranks
    r >= _FAR_START, (r - _FAR_START) >> 8, their tail byte holding the low 8 bits)."""
    capped = np.minimum(ranks, _FAR_START)
    heads = np.take(_HEAD_OF_RANK, capped)
    wide = np.compress(heads >= _DIRECT_RANKS, ranks)
    tails = np.take(_TAIL_OF_RANK, np.minimum(wide, _FAR_START))
    beyond = wide >= _FAR_START
    if not beyond.any():
        return heads, tails, np.empty(0, dtype=np.int32)
    far = wide[beyond] - _FAR_START
    tails[beyond] = far & 0xFF
    return heads, tails, (far >> 8).astype(np.int32)


# Decoding looks ids up by a 16-bit key per id, head << 8 | tail (tail 0 below _DIRECT_RANKS): one table
# lookup per id instead of a lookup of the heads, a second one of the wide ranks and a scatter (2x faster
# at k=64). The rank of each key, for id_far 0 (a far rank adds 256 * its far value):
_KEY_HEAD, _KEY_TAIL = np.arange(1 << 16) >> 8, np.arange(1 << 16) & 0xFF
_RANK_OF_KEY = np.where(
    _KEY_HEAD < _DIRECT_RANKS, _KEY_HEAD, _DIRECT_RANKS + ((_KEY_HEAD - _DIRECT_RANKS) << 8) + _KEY_TAIL
).astype(np.int32)


def _id_keys(heads: np.ndarray, tails: np.ndarray) -> np.ndarray:
    """The key head << 8 | tail of each id (intp, the index type of np.take). ValueError if the streams disagree."""
    wide = np.flatnonzero(heads >= _DIRECT_RANKS)
    if wide.size != tails.size:
        raise ValueError(f"{wide.size} ids need a tail byte but {tails.size} are stored")
    keys = heads.astype("<u2")
    keys <<= 8
    keys.view(np.uint8)[::2][wide] = tails  # a store of the low bytes: 2x faster than or-ing into intp keys
    return keys.astype(np.intp)


def _far_ranks(heads: np.ndarray, keys: np.ndarray, far: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(where the far ranks are, those ranks): head _FAR, rank _FAR_START + 256 * far + tail. ValueError if
    the streams disagree."""
    if not far.size and not (heads.size and heads.max() == _FAR):
        return heads[:0].astype(np.intp), far
    far_at = np.flatnonzero(heads == _FAR)
    if far_at.size != far.size:
        raise ValueError(f"{far_at.size} ids are far ranks but {far.size} far values are stored")
    ranks = np.take(_RANK_OF_KEY, np.take(keys, far_at)) + (far.astype(np.int64) << 8)
    if far.min() < 0 or ranks.max() > np.iinfo(np.int32).max:
        raise ValueError("id_far holds a value outside the int32 ranks")
    return far_at, ranks.astype(np.int32)


def _join_ranks(heads: np.ndarray, tails: np.ndarray, far: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_split_ranks` (int32 ranks)."""
    keys = _id_keys(heads, tails)
    ranks = np.take(_RANK_OF_KEY, keys)
    far_at, far_ranks = _far_ranks(heads, keys, far)
    ranks[far_at] = far_ranks
    return ranks


_LANES = np.uint64(0x0001_0001_0001_0001)
# Log-probs are decoded and quantized a block of positions at a time, 2^17 values (256 KiB of sums, 512 KiB of
# float32): the passes over a block then hit the core's cache, 1.3-1.5x faster at k = 64-128 than whole row groups.
_BLOCK_VALUES = 1 << 17


def _prefix_sums(values: np.ndarray) -> np.ndarray:
    """``values`` [N, m] (unsigned, <= 16 bits) → [N, m + 1] uint16 whose column j is the sum of the row's
    first j values (column 0 is 0), exact while each row sums to less than 2^16.

    Four 16-bit lanes per uint64: multiplying a word by 0x0001000100010001 leaves in lane j the sum of lanes
    0..j (no lane carries: the sums fit 16 bits), and each word then adds the sum of the words before it in
    its row, found the same way. 2.5x faster than np.cumsum (a sequential loop) at k=64."""
    rows, m = values.shape
    words = -(-(m + 1) // 4)
    lanes = np.zeros((rows, 4 * words), dtype="<u2")
    lanes[:, 1 : m + 1] = values
    packed = lanes.view("<u8")
    packed *= _LANES
    if words > 1:
        before = _prefix_sums((packed[:, :-1] >> np.uint64(48)).astype("<u2")).astype("<u8")
        before *= _LANES
        packed += before
    return lanes[:, : m + 1]


def _pack_ids(ids: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(ids, dtype="<i4").tobytes()).decode("ascii")


def _unpack_ids(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<i4").astype(np.int32)


@register
class CompactEncoding(Encoding):
    name = "compact"
    versions = (3,)

    @classmethod
    def new_params(cls, *, first_block_input_ids: np.ndarray, vocab_size: int, min_logprob: float | None) -> dict:
        ids = np.asarray(first_block_input_ids).ravel()
        counts = np.bincount(ids[(ids >= 0) & (ids < vocab_size)], minlength=vocab_size)
        seen = np.flatnonzero(counts)
        by_frequency = seen[np.lexsort((seen, -counts[seen]))]  # most frequent first, ties by id
        order = _pack_ids(by_frequency)
        return {
            "logprob_step": DEFAULT_LOGPROB_STEP,
            "min_logprob": None if min_logprob is None else float(min_logprob),
            "id_table_size": int(vocab_size),
            "id_layout": DEFAULT_ID_LAYOUT,
            "id_order": order,
            "id_order_sha256": hashlib.sha256(order.encode()).hexdigest(),
        }

    # ----------------------------------------------------------------------------------- parameters
    @property
    def step(self) -> float:
        return float(self.params["logprob_step"])

    @property
    def id_layout(self) -> str:
        return self.params.get("id_layout", "int32")

    @property
    def min_logprob(self) -> float | None:
        return self.params.get("min_logprob")

    @cached_property
    def _tables(self) -> tuple[np.ndarray, np.ndarray]:
        """(id of each rank, rank of each id), both [id_table_size] int32."""
        size = int(self.params["id_table_size"])
        text = self.params["id_order"]
        if hashlib.sha256(text.encode()).hexdigest() != self.params.get("id_order_sha256"):
            raise ValueError("encoding.id_order does not match its sha256: the manifest was altered")
        head = _unpack_ids(text)
        unseen = np.ones(size, dtype=bool)
        unseen[head] = False
        order = np.concatenate([head, np.flatnonzero(unseen).astype(np.int32)])
        if order.size != size:
            raise ValueError("encoding.id_order lists an id twice")
        rank = np.empty(size, dtype=np.int32)
        rank[order] = np.arange(size, dtype=np.int32)
        return order, rank

    @property
    def cuts_support(self) -> bool:
        return self.min_logprob is not None

    def validate(self) -> None:
        if self.id_layout not in _LAYOUTS:
            raise ValueError(f"unknown encoding.id_layout {self.id_layout!r}; this version reads {', '.join(_LAYOUTS)}")
        self._tables  # noqa: B018 (checks the id table against its hash)

    @property
    def schema(self) -> pa.Schema:
        return _LAYOUTS[self.id_layout][0]

    @property
    def write_options(self) -> dict:
        return _LAYOUTS[self.id_layout][1]

    def error_bound(self) -> float:
        return self.step + 2.0**-8

    def describe(self) -> str:
        cut = f", support cut below log p = {self.min_logprob:g}" if self.min_logprob is not None else ""
        return (
            f"compact (log-prob gaps in steps of {self.step:g} nat, |error| <= {self.error_bound():.4f}; "
            f"ids by frequency rank{cut})"
        )

    # ------------------------------------------------------------------------------------------ ids
    def _map(self, ids: np.ndarray, table: np.ndarray) -> np.ndarray:
        """Apply an id ↔ rank table; values beyond it map to themselves."""
        if ids.size == 0 or ids.max() < table.size:
            return np.take(table, ids)  # several times faster than table[ids] on int32 indices
        return np.where(ids < table.size, np.take(table, np.minimum(ids, table.size - 1)), ids)

    @cached_property
    def _bytes_of_id(self) -> tuple[np.ndarray, np.ndarray]:
        """:func:`_split_ranks` tabulated per id: the head byte and the tail byte of each id's rank (uint8
        [id_table_size] each; tail 0 where the rank has none, a far rank's low byte where it is far)."""
        rank = self._tables[1]
        heads, wide_tails, _ = _split_ranks(rank)
        tails = np.zeros(rank.size, dtype=np.uint8)
        tails[heads >= _DIRECT_RANKS] = wide_tails
        return heads, tails

    def _id_bytes(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """int32 ids → the streams ``_split_ranks`` makes of their ranks, by one lookup per id in tables of
        bytes instead of a rank lookup and a split of the ranks (2x faster encoding of ids at k=128)."""
        if ids.size and ids.max() >= self._tables[1].size:  # ids beyond the table are their own ranks
            return _split_ranks(self._map(ids, self._tables[1]))
        head_of_id, tail_of_id = self._bytes_of_id
        heads = np.take(head_of_id, ids)
        tails = np.take(tail_of_id, np.compress(heads >= _DIRECT_RANKS, ids))
        if head_of_id.size <= _FAR_START:  # no rank in the table is far
            return heads, tails, np.empty(0, dtype=np.int32)
        far_ranks = np.take(self._tables[1], np.compress(heads == _FAR, ids))
        return heads, tails, _split_ranks(far_ranks)[2]  # the few far ones split as every rank is

    # --------------------------------------------------------------------------------------- encode
    def encode(self, rows: CacheRows) -> pa.Table:
        rows.validate()
        b, positions, k = rows.topk_ids.shape
        n = b * positions
        lp = rows.topk_logprobs.reshape(n, k).astype(np.float32, copy=False)
        if not np.isfinite(lp[:, 0]).all():
            raise ValueError("the top-1 log-probability of every position must be finite")
        if rows.topk_ids.size and rows.topk_ids.min() < 0:
            raise ValueError("negative token id in topk_ids")
        # The usual case, a full finite support, skips every mask (NaN fails the test, and is refused below).
        full = self.min_logprob is None and (lp.size == 0 or bool(lp.min() > -np.inf))
        if full:
            keep = None
            count = np.full(n, k, dtype=np.int64)
        else:
            if np.isnan(lp).any():
                raise ValueError("topk_logprobs hold NaN")
            keep = lp > -np.inf  # a sampled support pads with -inf
            if self.min_logprob is not None:
                keep &= lp >= self.min_logprob
            keep[:, 0] = True
            count = keep.sum(-1)
            if not np.array_equal(keep, np.arange(k) < count[:, None]):
                raise ValueError("topk_logprobs must be sorted descending to be encoded")

        top = lp[:, 0].astype(np.float16)
        increments = np.empty((n, k - 1), dtype=np.float32)
        steps = np.empty((n, k - 1), dtype=np.uint8)  # the increments, saturated
        shift = np.empty(n, dtype=np.float32)
        block = max(1, _BLOCK_VALUES // k)  # as decoding: passes over a block stay in the core's cache
        for start in range(0, n, block):
            part = slice(start, start + block)
            if full and k > 1 and (lp[part, 1:] > lp[part, :-1]).any():
                raise ValueError("topk_logprobs must be sorted descending to be encoded")
            increments[part], shift[part] = self._quantize(lp[part], top[part], None if full else keep[part])
            lowest = increments[part].min() if increments[part].size else 0.0
            if np.isnan(lowest):
                raise ValueError("topk_logprobs hold NaN")
            if lowest < 0:
                raise ValueError("topk_logprobs must be sorted descending to be encoded")
            np.minimum(increments[part], _SATURATED, out=steps[part], casting="unsafe")

        ids = rows.topk_ids.reshape(n, k).astype(np.int32, copy=False)
        if full:
            gap_steps, ids_kept = steps.reshape(-1), ids.reshape(-1)
        else:
            gap_steps, ids_kept = steps[keep[:, 1:]], ids[keep]
        per_row = count.reshape(b, positions).sum(-1)
        gaps_per_row = per_row - positions
        if gap_steps.size and gap_steps.max() == _SATURATED:  # rare: a gap of >= 255 steps (11.6 nats)
            saturated = gap_steps == _SATURATED
            overflow = (increments.reshape(-1) if full else increments[keep[:, 1:]])[saturated].astype(np.int32)
            overflow_per_row = _count_per_row(saturated, gaps_per_row)
        else:
            overflow, overflow_per_row = np.empty(0, dtype=np.int32), np.zeros(b, dtype=np.int64)

        schema = self.schema
        typ = lambda name: schema.field(name).type  # noqa: E731
        columns = {
            "seq_id": pa.array(rows.seq_ids.astype(np.int64, copy=False)),
            "input_ids": list_array(rows.input_ids.astype(np.int32, copy=False), typ("input_ids")),
            "loss_mask": list_array(rows.loss_mask.astype(np.bool_, copy=False), typ("loss_mask")),
            "support_size": list_array(count.astype(np.uint16).reshape(b, positions), typ("support_size")),
            "top_logprob": list_array(top.reshape(b, positions), typ("top_logprob")),
            "gap_steps": binary_array(gap_steps, gaps_per_row),
            "gap_overflow": ragged_list_array(overflow, overflow_per_row, typ("gap_overflow")),
            "log_mass_shift": list_array(shift.astype(np.float16).reshape(b, positions), typ("log_mass_shift")),
            "target_logprob": list_array(rows.target_logprob.astype(np.float16), typ("target_logprob")),
        }
        if self.id_layout == "int32":
            columns["topk_ids"] = ragged_list_array(self._map(ids_kept, self._tables[1]), per_row, typ("topk_ids"))
        else:
            heads, tails, far = self._id_bytes(ids_kept)
            columns["id_heads"] = binary_array(heads, per_row)
            columns["id_tails"] = binary_array(tails, _count_per_row(heads >= _DIRECT_RANKS, per_row))
            far_per_row = _count_per_row(heads == _FAR, per_row) if far.size else np.zeros(b, np.int64)
            columns["id_far"] = ragged_list_array(far, far_per_row, typ("id_far"))
        return pa.Table.from_arrays([columns[name] for name in schema.names], schema=schema)

    def _quantize(self, lp: np.ndarray, top: np.ndarray, keep: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Log-probs [N, k] float32 (sorted), their top-1 as stored (fp16 [N]) and the kept entries ([N, k]
        bool, None: all) → (gap increments [N, k-1] float32: integers, 0 past the support; log mass shift [N])."""
        top32 = top.astype(np.float32)
        with np.errstate(invalid="ignore", over="ignore"):
            q = np.subtract(top32[:, None], lp[:, 1:])
            q /= np.float32(self.step)
            np.rint(q, out=q)
            np.maximum(q, 0, out=q)  # fp16 may round the top-1 below the second entry
            if keep is not None:
                q[~keep[:, 1:]] = 0
            increments = np.empty_like(q)
            if q.shape[1]:
                increments[:, 0] = q[:, 0]
                np.subtract(q[:, 1:], q[:, :-1], out=increments[:, 1:])
            if keep is not None:
                increments[~keep[:, 1:]] = 0
            # Teacher mass over the kept support vs the decoded one's, both relative to their top-1.
            exact = np.subtract(lp, lp[:, :1])
            np.exp(exact, out=exact)
            decoded = np.multiply(q, np.float32(-self.step))
            np.exp(decoded, out=decoded)
        if keep is not None:
            exact[~keep] = 0
            decoded[~keep[:, 1:]] = 0
        shift = (lp[:, 0] - top32) + np.log(exact.sum(-1)) - np.log1p(decoded.sum(-1))
        return increments, shift

    # --------------------------------------------------------------------------------------- decode
    def decode(self, table: pa.Table | pa.RecordBatch) -> CacheRows:
        # Damaged bytes that pass a recomputed checksum may decode to inf or NaN: that is verify's to name
        # (non-finite log-probabilities), not a floating-point warning's.
        with np.errstate(all="ignore"):
            return self._decode(table)

    def _decode(self, table: pa.Table | pa.RecordBatch) -> CacheRows:
        b, length, k = table.num_rows, self.seq_len, self.k
        positions = length - 1
        n = b * positions
        col = table.column
        count = flat_values(col("support_size"), positions, "support_size")
        base = flat_values(col("top_logprob"), positions, "top_logprob").astype(np.float32)
        base += flat_values(col("log_mass_shift"), positions, "log_mass_shift")
        gaps = binary_values(col("gap_steps"))
        overflow = ragged_values(col("gap_overflow"))
        if self.id_layout == "int32":
            ranks = ragged_values(col("topk_ids"))
        else:
            heads, tails, far = (
                binary_values(col("id_heads")),
                binary_values(col("id_tails")),
                ragged_values(col("id_far")),
            )
            ranks = heads  # one entry per id, for the size check below
        total = int(count.sum(dtype=np.int64))
        if count.size and (count.min() < 1 or count.max() > k):
            raise ValueError(f"support_size outside [1, {k}]")
        if ranks.size != total or gaps.size != total - n:
            raise ValueError(
                f"{ranks.size} ids and {gaps.size} gaps stored for a support of {total} entries over {n} positions"
            )

        full = total == n * k
        if full:
            increments = gaps.reshape(n, k - 1)
        else:
            kept = np.arange(k) < count[:, None].astype(np.int64)
            increments = np.zeros((n, k - 1), dtype=np.uint8)
            increments[kept[:, 1:]] = gaps
        lp = self._logprobs(increments, overflow, base)

        order = self._tables[0]
        if (
            self.id_layout == "bytes" and full
        ):  # the usual case: ids straight from the bytes, without an int32 rank array
            ids = self._ids_from_bytes(heads, tails, far).reshape(n, k)
        else:
            if self.id_layout == "bytes":
                ranks = _join_ranks(heads, tails, far)
            if full:
                ids = self._map(ranks, order).reshape(n, k)
            else:
                lp[~kept] = -np.inf
                ranks_full = np.zeros((n, k), dtype=np.int32)
                ranks_full[kept] = ranks
                ids = self._map(self._pad(ranks_full, kept, count), order)
        col_target = flat_values(col("target_logprob"), positions, "target_logprob")
        return CacheRows(
            seq_ids=col("seq_id").to_numpy(),
            input_ids=flat_values(col("input_ids"), length, "input_ids").reshape(b, length),
            loss_mask=flat_values(col("loss_mask"), length, "loss_mask").reshape(b, length),
            topk_ids=ids.reshape(b, positions, k),
            topk_logprobs=lp.reshape(b, positions, k),
            target_logprob=col_target.reshape(b, positions),
        )

    def _logprobs(self, increments: np.ndarray, overflow: np.ndarray, base: np.ndarray) -> np.ndarray:
        """Log-probs [N, k] float32: ``base`` [N] - step x (the cumulative sums of each position's
        ``increments`` [N, k-1] uint8, whose saturated values stand for the next ``overflow`` values)."""
        n, width = increments.shape
        lp = np.empty((n, width + 1), dtype=np.float32)
        block = max(1, _BLOCK_VALUES // (width + 1))
        for start in range(0, n, block):
            part = slice(start, start + block)
            if width * _SATURATED < 1 << 16:  # the row sums fit 16 bits (k <= 258) with every gap taken as 255
                steps = _prefix_sums(increments[part])
            else:
                steps = np.zeros((increments[part].shape[0], width + 1), dtype=np.int32)
                np.cumsum(increments[part], axis=1, out=steps[:, 1:])
            np.multiply(steps, np.float32(-self.step), out=lp[part])  # column 0: -0.0, and base + -0.0 is base
            lp[part] += base[part, None]
        if not overflow.size and not (increments.size and increments.max() == _SATURATED):
            return lp
        # The few positions with a saturated gap are summed again with the stored values (int64).
        saturated = np.flatnonzero(increments.reshape(-1) == _SATURATED)
        if saturated.size != overflow.size:
            raise ValueError(f"{saturated.size} saturated gaps but {overflow.size} overflow values")
        rows = np.unique(saturated // width)
        exact = increments[rows].astype(np.int64)
        exact[exact == _SATURATED] = overflow  # row-major order is the stream's order
        values = np.empty(exact.shape, dtype=np.float32)
        np.multiply(np.cumsum(exact, axis=1), np.float32(-self.step), out=values)
        values += base[rows, None]
        lp[rows, 1:] = values
        return lp

    def _ids_from_bytes(self, heads: np.ndarray, tails: np.ndarray, far: np.ndarray) -> np.ndarray:
        """Ids of the byte streams: one lookup per id by its key, the few far ones looked up again."""
        keys = _id_keys(heads, tails)
        ids = np.take(self._id_of_key, keys)
        far_at, far_ranks = _far_ranks(heads, keys, far)
        ids[far_at] = self._map(far_ranks, self._tables[0])
        return ids

    @cached_property
    def _id_of_key(self) -> np.ndarray:
        """Id of each 16-bit key (int32 [65536]; far keys as if id_far were 0)."""
        return self._map(_RANK_OF_KEY, self._tables[0])

    def _pad(self, ranks: np.ndarray, kept: np.ndarray, count: np.ndarray) -> np.ndarray:
        """Fill the slots past each position's support with distinct ranks not in it: the smallest free ones
        (the most frequent tokens), so pads are valid, distinct ids that carry weight 0."""
        k = ranks.shape[1]
        rows = np.flatnonzero(count < k)
        if rows.size == 0:
            return ranks
        r, m = ranks[rows], kept[rows]
        candidates = min(2 * k, int(self.params["id_table_size"]))  # >= k: enough free ones for every row
        taken = np.zeros((rows.size, candidates), dtype=bool)
        hit = m & (r < candidates)
        taken[np.nonzero(hit)[0], r[hit]] = True
        free = np.argsort(taken, axis=1, kind="stable")[:, :k].astype(np.int32)  # free candidates first
        slot = np.clip(np.arange(k)[None, :] - count[rows, None].astype(np.int64), 0, k - 1)
        ranks[rows] = np.where(m, r, np.take_along_axis(free, slot, axis=1))
        return ranks

    def check(self, table: pa.Table) -> list[str]:
        problems = []
        overflow = ragged_values(table.column("gap_overflow"))
        if overflow.size and overflow.min() < _SATURATED:
            problems.append(f"gap_overflow holds {int(overflow.min())} < {_SATURATED}: it only stores saturated gaps")
        return problems
