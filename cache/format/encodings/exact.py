"""The ``exact`` encoding: the teacher's values as fp16, ids as int32 (format v1 and v2, and v3 ``exact``).

Columns, one row per sequence of ``L`` tokens, support size ``k`` (alignment in cache/format/rows.py):
``seq_id`` int64; ``input_ids`` list<int32> [L]; ``loss_mask`` list<bool> [L]; ``topk_ids`` list<int32>
[(L-1)·k]; ``topk_logprobs`` list<float16> [(L-1)·k]; ``target_logprob`` list<float16> [L-1].
v1 declared the list elements nullable; v2 and v3 do not (same values, faster decoding).

fp16 keeps |error| <= 2^-6 for lp in [-32, -16] and finer above (relative 2^-11).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from kd_pipeline.cache.format.encodings.base import Encoding, register
from kd_pipeline.cache.format.rows import CacheRows, flat_values, list_array, list_type, shard_write_options
from kd_pipeline.errors import ConfigError

LOGPROB_DTYPE = np.float16
_COLUMNS = [
    ("input_ids", pa.int32()),
    ("loss_mask", pa.bool_()),
    ("topk_ids", pa.int32()),
    ("topk_logprobs", pa.float16()),
    ("target_logprob", pa.float16()),
]


def shard_schema(version: int) -> pa.Schema:
    metadata = {"kd_cache_format": str(version)}
    if version >= 3:
        metadata["kd_cache_encoding"] = ExactEncoding.name
    return pa.schema(
        [pa.field("seq_id", pa.int64(), nullable=False)]
        + [pa.field(name, list_type(value_type, version), nullable=False) for name, value_type in _COLUMNS],
        metadata=metadata,
    )


# Top-k ids and log-prob mantissas are near-random bytes: byte-stream-split groups their bytes by
# significance, which is what zstd can use (bench/RESULTS.md, "Writer and storage").
PARQUET_WRITE_OPTIONS = shard_write_options(byte_stream_split=("topk_ids", "topk_logprobs", "target_logprob"))


@register
class ExactEncoding(Encoding):
    name = "exact"
    versions = (1, 2, 3)

    @classmethod
    def new_params(cls, *, first_block_input_ids: np.ndarray, vocab_size: int, min_logprob: float | None) -> dict:
        if min_logprob is not None:
            raise ConfigError("--min-logprob needs an encoding with a variable support (--encoding compact)")
        return {}

    @property
    def schema(self) -> pa.Schema:
        return shard_schema(self.version)

    @property
    def write_options(self) -> dict:
        return PARQUET_WRITE_OPTIONS

    def encode(self, rows: CacheRows) -> pa.Table:
        """Log-probabilities are rounded to fp16 here, once."""
        rows.validate()
        schema = self.schema
        lists = {
            "input_ids": rows.input_ids.astype(np.int32, copy=False),
            "loss_mask": rows.loss_mask.astype(np.bool_, copy=False),
            "topk_ids": rows.topk_ids.astype(np.int32, copy=False),
            "topk_logprobs": rows.topk_logprobs.astype(LOGPROB_DTYPE),
            "target_logprob": rows.target_logprob.astype(LOGPROB_DTYPE),
        }
        columns = [pa.array(rows.seq_ids.astype(np.int64, copy=False))]
        columns += [list_array(values, schema.field(name).type) for name, values in lists.items()]
        return pa.Table.from_arrays(columns, schema=schema)

    def decode(self, table: pa.Table | pa.RecordBatch) -> CacheRows:
        """Zero-copy views of the arrow buffers where they allow (log-probs stay fp16)."""
        b, length, k = table.num_rows, self.seq_len, self.k
        col = table.column
        return CacheRows(
            seq_ids=col("seq_id").to_numpy(),
            input_ids=flat_values(col("input_ids"), length, "input_ids").reshape(b, length),
            loss_mask=flat_values(col("loss_mask"), length, "loss_mask").reshape(b, length),
            topk_ids=flat_values(col("topk_ids"), (length - 1) * k, "topk_ids").reshape(b, length - 1, k),
            topk_logprobs=flat_values(col("topk_logprobs"), (length - 1) * k, "topk_logprobs").reshape(
                b, length - 1, k
            ),
            target_logprob=flat_values(col("target_logprob"), length - 1, "target_logprob").reshape(b, length - 1),
        )

    def error_bound(self) -> float:
        return 2.0**-6 / 2  # half an fp16 step at |lp| in [16, 32); finer above
