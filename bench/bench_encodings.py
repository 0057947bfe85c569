"""Cache encodings side by side on the same real teacher rows: bytes, speed, error (issue 12).

    python -m bench.bench_encodings [--rows ROWS.npz] [--sequences 256] [--seq-len 256] [--repeats 3]

Material: SmolLM2-135M-Instruct (bench/material.py) scoring Moby Dick once at k=128 (``--rows`` keeps the
rows; bench/bench_writer.py writes the same file); smaller k are the first columns of the sorted top-128.

Variants, at k = 16, 50, 64, 128:

- ``v2``: format v2 (the ``exact`` encoding at version 2, fp16 log-probs, int32 ids): the baseline.
- ``v3 exact`` and ``v3 compact`` (cache/format/encodings/), as ``pipeline cache-teacher`` writes them: the id
  table from the input tokens of the first block that command cuts from this corpus (the first 1M tokens
  of the packed stream, i.e. all of Moby Dick's 311k; ``--table-from rows``: only the scored rows' own
  input tokens); ``v3 compact, min-logprob X``: the support cut.
- ``DistillKit budget`` / ``DistillKit recommended``: an encoder written here from DistillKit's published
  description (not its code): ids bit-packed at ceil(log2 V) bits padded per position; log-probs sorted,
  the first ``exact_k`` as bf16, the rest replaced by a least-squares fit on ``t^i`` / ``sqrt(t)``
  (t = 0, 1, ... unnormalized; fp32 SVD pseudo-inverse with singular values below 1e-5 dropped;
  coefficients stored fp32); Parquet with pyarrow's defaults (snappy, dictionary); input ids kept; no
  tail, no mask, no target log-prob. Budget: exact_k=1, terms (0, 1, sqrt); recommended: exact_k=16,
  terms (0, 1, 2, 3, 4, sqrt). At k=16 the recommended shape stores all 16 exactly.

Columns: B/token (whole Parquet file over the real rows, one row group as the writer's default 64k
tokens); encode and decode speed per core (CPU seconds, one thread, best of ``--repeats`` interleaved
rounds) as ratios to v2 in the same run, and the absolute decode rate of one row group (the reader's
unit); max |Δ log-prob| over the stored support vs the teacher's fp32 values; ΔKL = mean over positions of
KL(teacher ‖ stored) on the k+1 bins (support + rest), the stored side as the trainer decodes it
(kd_pipeline.cache.format.rows.tail_mass of the decoded support, renormalized if over 1: kd_pipeline.train.losses.teacher_bin_logprobs),
in float64. Where the stored rest bin is empty but the teacher's is not, that position's KL is infinite:
those are counted (``∞ KL``) and left out of the mean. With a support cut the bins are the stored ones
(cut entries belong to the rest bin on both sides).
"""

from __future__ import annotations

import argparse
import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.bench_writer import (
    K_MAX,
    load_average,
    load_or_score,
    machine,
    moby_dick_sequences,
    single_threaded,
    table,
    time_all,
    with_k,
)
from kd_pipeline.cache.build import CacheConfig
from kd_pipeline.cache.format.encodings import Encoding
from kd_pipeline.cache.format.encodings.compact import CompactEncoding
from kd_pipeline.cache.format.encodings.exact import ExactEncoding
from kd_pipeline.cache.format.rows import CacheRows, tail_mass

SIZE_KS = (16, 50, 64, 128)
VOCAB = 49152  # SmolLM2's tokenizer
MIN_LOGPROB = math.log(1e-4)  # the support cut reported: keep tokens with p >= 1e-4


# ---------------------------------------------------------------------------------------------------
# A DistillKit-style encoder, from the description in the module docstring


def _bf16_bytes(values: np.ndarray) -> np.ndarray:
    """float32 → bf16 (round to nearest even) as 2 little-endian bytes per value."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return rounded.view(np.uint8).reshape(*values.shape[:-1], -1)


def _from_bf16_bytes(data: np.ndarray, n: int) -> np.ndarray:
    halves = np.ascontiguousarray(data).view(np.uint16).reshape(*data.shape[:-1], n)
    return (halves.astype(np.uint32) << 16).view(np.float32)


@dataclass
class DistillKitStyle:
    label: str
    k: int
    exact_k: int
    terms: tuple  # ints are powers of t, "sqrt" is sqrt(t)
    vocab_size: int = VOCAB

    @property
    def bits(self) -> int:
        return int(math.ceil(math.log2(self.vocab_size)))

    def _basis(self) -> np.ndarray:
        t = np.arange(self.k - self.exact_k, dtype=np.float32)
        return np.stack([np.sqrt(t) if term == "sqrt" else t**term for term in self.terms], axis=-1)

    def _pinv(self) -> np.ndarray:
        u, s, vh = np.linalg.svd(self._basis(), full_matrices=False)  # fp32, as the fit runs in fp32
        inv = np.where(s > 1e-5, 1 / np.where(s > 1e-5, s, 1), 0).astype(np.float32)
        return (vh.T * inv) @ u.T  # [terms, n]

    def encode(self, rows: CacheRows) -> pa.Table:
        b, positions, k = rows.topk_ids.shape
        lp = rows.topk_logprobs.astype(np.float32).reshape(-1, k)
        chunks = [_bf16_bytes(lp[:, : self.exact_k])]
        if self.exact_k < k:
            coeffs = (lp[:, self.exact_k :] @ self._pinv().T).astype(np.float32)
            chunks.append(coeffs.view(np.uint8))
        value_bytes = np.concatenate(chunks, axis=-1)
        # Ids: the low `bits` bits of each, LSB first, packed per position and padded to whole bytes.
        ids = rows.topk_ids.reshape(-1, k).astype("<u4")
        id_bits = np.unpackbits(ids.view(np.uint8).reshape(-1, k, 4), axis=-1, bitorder="little")[..., : self.bits]
        id_bytes = np.packbits(id_bits.reshape(ids.shape[0], -1), axis=-1, bitorder="little")
        n = b * positions

        def nested(data: np.ndarray) -> pa.ListArray:  # [N, width] → list<list<uint8>> per row
            width = data.shape[1]
            inner = pa.ListArray.from_arrays(
                pa.array(np.arange(n + 1, dtype=np.int32) * width), pa.array(data.reshape(-1), pa.uint8())
            )
            return pa.ListArray.from_arrays(pa.array(np.arange(b + 1, dtype=np.int32) * positions), inner)

        input_ids = pa.ListArray.from_arrays(
            pa.array(np.arange(b + 1, dtype=np.int32) * rows.seq_len), pa.array(rows.input_ids.reshape(-1))
        )
        return pa.table(
            {"input_ids": input_ids, "compressed_logprobs": nested(value_bytes), "bytepacked_indices": nested(id_bytes)}
        )

    def decode(self, data: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """→ (ids [N, k] int32, log-probs [N, k] float32)."""
        k = self.k

        def flat(name: str) -> np.ndarray:
            column = data.column(name).combine_chunks().flatten()
            width = column.value_lengths()[0].as_py() if len(column) else 0
            return column.flatten().to_numpy().reshape(len(column), width)

        values, packed = flat("compressed_logprobs"), flat("bytepacked_indices")
        lp = np.empty((values.shape[0], k), dtype=np.float32)
        lp[:, : self.exact_k] = _from_bf16_bytes(values[:, : 2 * self.exact_k], self.exact_k)
        if self.exact_k < k:
            coeffs = np.ascontiguousarray(values[:, 2 * self.exact_k :]).view(np.float32)
            lp[:, self.exact_k :] = coeffs @ self._basis().T
        id_bits = np.unpackbits(packed, axis=-1, bitorder="little")[:, : k * self.bits].reshape(-1, k, self.bits)
        ids = (id_bits.astype(np.int32) << np.arange(self.bits, dtype=np.int32)).sum(-1, dtype=np.int32)
        return ids, lp

    write_options = {}  # pyarrow's defaults: snappy, dictionary encoding


# ---------------------------------------------------------------------------------------------------
# Measurement


def parquet(table_: pa.Table, options: dict) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table_, buffer, **options)
    return buffer.getvalue()


def kl_teacher_to_stored(teacher_lp: np.ndarray, stored_lp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per position KL(teacher ‖ stored) on the stored support + rest bins, float64; and where it is inf.

    ``teacher_lp`` [N, k] the teacher's fp32 values; ``stored_lp`` [N, k] as decoded (``-inf`` = cut)."""
    import torch

    from kd_pipeline.train.losses import teacher_bin_logprobs

    cut = np.isneginf(stored_lp)
    # The stored side, exactly as the trainer builds its bins from the decoded values.
    log_q, log_q_rest = (t.numpy() for t in teacher_bin_logprobs(torch.from_numpy(stored_lp), dtype=torch.float64))
    p = np.where(cut, 0.0, np.exp(teacher_lp.astype(np.float64)))
    p_rest = np.clip(1.0 - p.sum(-1), 0.0, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(np.where(p > 0, p, 1)) - log_q), 0.0).sum(-1)
        rest = np.where(p_rest > 0, p_rest * (np.log(np.where(p_rest > 0, p_rest, 1)) - log_q_rest), 0.0)
    kl = terms + rest
    return kl, ~np.isfinite(kl)


@dataclass
class Variant:
    label: str
    encode: Callable[[], pa.Table]
    options: dict
    decode: Callable[[pa.Table], tuple[np.ndarray, np.ndarray]]  # → ids, log-probs [N, k]


def ours(label: str, encoding: Encoding, rows: CacheRows) -> Variant:
    def decode(data: pa.Table):
        got = encoding.decode(data)
        return got.topk_ids.reshape(-1, rows.k), got.topk_logprobs.reshape(-1, rows.k).astype(np.float32, copy=False)

    return Variant(label, lambda: encoding.encode(rows), encoding.write_options, decode)


def distillkit(label: str, encoder: DistillKitStyle, rows: CacheRows) -> Variant:
    return Variant(label, lambda: encoder.encode(rows), encoder.write_options, encoder.decode)


def variants(rows: CacheRows, first_block_input_ids: np.ndarray) -> list[Variant]:
    k = rows.k
    geometry = dict(seq_len=rows.seq_len, k=k)

    def compact(min_logprob=None) -> CompactEncoding:
        params = CompactEncoding.new_params(
            first_block_input_ids=first_block_input_ids, vocab_size=VOCAB, min_logprob=min_logprob
        )
        return CompactEncoding(version=3, params=params, **geometry)

    out = [
        ours("v2 (fp16)", ExactEncoding(version=2, params={}, **geometry), rows),
        ours("v3 exact", ExactEncoding(version=3, params={}, **geometry), rows),
        ours("v3 compact", compact(), rows),
        ours(f"v3 compact, min-logprob {MIN_LOGPROB:.2f}", compact(MIN_LOGPROB), rows),
        distillkit("DistillKit budget (exact_k=1; 1, t, √t)", DistillKitStyle("budget", k, 1, (0, 1, "sqrt")), rows),
    ]
    recommended = DistillKitStyle("recommended", k, min(16, k), (0, 1, 2, 3, 4, "sqrt"))
    out.append(distillkit("DistillKit recommended (exact_k=16; 1, t..t^4, √t)", recommended, rows))
    return out


# Where a compact file's bytes go: its columns in groups.
COLUMN_GROUPS = {
    "ids": ("id_heads", "id_tails", "id_far", "topk_ids"),
    "gaps": ("gap_steps", "gap_overflow"),
    "top-1 + mass shift": ("top_logprob", "log_mass_shift"),
    "input ids, mask, target, counts": ("seq_id", "input_ids", "loss_mask", "target_logprob", "support_size"),
}


def column_bytes(data: bytes) -> dict[str, float]:
    """Compressed bytes per column group of a one-file shard, and the rest (footer, headers) as "file"."""
    meta = pq.ParquetFile(io.BytesIO(data)).metadata
    sizes: dict[str, int] = {}
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        for c in range(group.num_columns):
            name = group.column(c).path_in_schema.split(".")[0]
            sizes[name] = sizes.get(name, 0) + group.column(c).total_compressed_size
    out = {label: sum(sizes.pop(n, 0) for n in names) for label, names in COLUMN_GROUPS.items()}
    if sizes:
        raise ValueError(f"columns in no group: {sorted(sizes)}")
    out["file"] = len(data) - sum(out.values())
    return out


def measure_k(real: CacheRows, first_block_input_ids: np.ndarray, k: int, repeats: int) -> list[dict]:
    rows = with_k(real, k)
    tokens = rows.input_ids.size
    teacher_lp = rows.topk_logprobs.reshape(-1, k)
    group = rows.num_rows  # all real rows in one row group: the writer's default 64k tokens at L=256
    found = variants(rows, first_block_input_ids)
    files = [parquet(v.encode(), {**v.options, "row_group_size": group}) for v in found]
    timings = time_all(
        [lambda v=v: parquet(v.encode(), {**v.options, "row_group_size": group}) for v in found]
        + [lambda v=v, f=f: v.decode(pq.read_table(io.BytesIO(f))) for v, f in zip(found, files, strict=True)],
        repeats,
    )
    encode_t, decode_t = timings[: len(found)], timings[len(found) :]
    results = []
    for v, data, enc, dec in zip(found, files, encode_t, decode_t, strict=True):
        ids, lp = v.decode(pq.read_table(io.BytesIO(data)))
        kept = np.isfinite(lp)
        ids_ok = bool((ids[kept] == rows.topk_ids.reshape(-1, k)[kept]).all())
        kl, infinite = kl_teacher_to_stored(teacher_lp, lp)
        results.append(
            dict(
                k=k,
                label=v.label,
                bytes=len(data) / tokens,
                encode_cpu=enc.cpu,
                decode_cpu=dec.cpu,
                tokens=tokens,
                max_error=float(np.abs(lp[kept] - teacher_lp[kept]).max()),
                kl=float(kl[~infinite].mean()),
                kl_max=float(kl[~infinite].max()),
                infinite=int(infinite.sum()),
                positions=kl.size,
                ids_ok=ids_ok,
                kept=float(kept.sum(-1).mean()),
                tail=float(np.abs(tail_mass(lp) - tail_mass(teacher_lp)).max()),
                columns={c: b / tokens for c, b in column_bytes(data).items()} if v.label == "v3 compact" else None,
            )
        )
    return results


def report_columns(results: list[dict]) -> None:
    rows = [r for r in results if r["columns"]]
    labels = list(rows[0]["columns"])
    table(
        "Where v3 compact's bytes go (B/token per column group)",
        ["k", "B/token", *labels],
        [[r["k"], f"{r['bytes']:.1f}", *(f"{r['columns'][c]:.1f}" for c in labels)] for r in rows],
        ["ids = id_heads + id_tails + id_far; gaps = gap_steps + gap_overflow; file = footer and page headers."],
    )


def report(results: list[dict]) -> None:
    by_k: dict[int, list[dict]] = {}
    for r in results:
        by_k.setdefault(r["k"], []).append(r)
    body = []
    for k, rs in by_k.items():
        base = rs[0]
        budget = next(r for r in rs if r["label"].startswith("DistillKit budget"))
        for r in rs:
            body.append(
                [
                    k,
                    r["label"],
                    f"{r['bytes']:.1f}",
                    f"{r['bytes'] / budget['bytes']:.2f}",
                    f"{base['encode_cpu'] / r['encode_cpu']:.2f}",
                    f"{base['decode_cpu'] / r['decode_cpu']:.2f}",
                    f"{r['tokens'] / r['decode_cpu'] / 1e6:.2f}M",
                    f"{r['max_error']:.4f}",
                    f"{r['kl']:.1e}",
                    f"{r['kl_max']:.1e}",
                    f"{r['infinite']}/{r['positions']}" if r["infinite"] else "0",
                    f"{r['kept']:.1f}",
                    "yes" if r["ids_ok"] else "NO",
                ]
            )
    table(
        "Encodings on the same teacher rows",
        [
            "k",
            "encoding",
            "B/token",
            "vs DK budget",
            "encode vs v2",
            "decode vs v2",
            "decode tok/s/core",
            "max abs Δ lp",
            "ΔKL mean",
            "ΔKL max",
            "∞ KL",
            "ids kept",
            "ids exact",
        ],
        body,
        [
            "encode = encode + pq.write_table into memory; decode = pq.read_table from memory + decode to numpy "
            "(ids, float log-probs), one row group; both CPU time on one thread, as ratios to v2 measured in the "
            "same interleaved rounds (> 1 is faster). ΔKL = KL(teacher ‖ stored) on the k+1 bins, mean over the "
            "positions where it is finite (∞ KL: positions whose decoded support sums to >= 1, so the stored rest "
            "bin is empty while the teacher's is not). max abs Δ lp over the stored (kept) support."
        ],
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_encodings", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=Path, help="teacher rows .npz (scored and saved if missing)")
    parser.add_argument("--sequences", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ks", default=",".join(map(str, SIZE_KS)))
    parser.add_argument(
        "--table-from",
        choices=("first-block", "rows"),
        default="first-block",
        help="input tokens the compact id table is built from: the first block cache-teacher cuts from the "
        "corpus (default), or the scored rows alone",
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    real, origin = load_or_score(args.rows, args.sequences, args.seq_len)
    import torch

    torch.set_num_threads(1)
    single_threaded()
    print(f"## Cache encodings (python -m bench.bench_encodings)\n\nMachine: {machine()}")
    print(f"\nLoad average at start (1/5/15 min): {load_average()}")
    print(
        f"\nMaterial: SmolLM2-135M-Instruct (fp32, CPU) on {real.num_rows} x {real.seq_len} = {real.input_ids.size:,} "
        f"Moby Dick tokens, scored once at k={K_MAX} ({origin})."
    )
    if args.table_from == "rows":
        first_block, where = real.input_ids, "the scored rows' own input tokens"
    else:
        rows_per_shard = CacheConfig.__dataclass_fields__["shard_tokens"].default // args.seq_len
        first_block = moby_dick_sequences(args.seq_len)[0][:rows_per_shard]
        where = (
            f"the input tokens of the first block cache-teacher cuts from this corpus ({len(first_block)} "
            f"sequences, {first_block.size:,} tokens, which include the scored rows)"
        )
    print(f"\nCompact id table: from {where}.")
    results = []
    for k in (int(x) for x in args.ks.split(",")):
        results += measure_k(real, first_block, k, args.repeats)
    report(results)
    report_columns(results)
    print(f"\nLoad average at end: {load_average()}; total bench time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
