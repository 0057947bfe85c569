"""Shard encodings: round trips within the documented bounds, the registry, the public read API, verify."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from kd_pipeline import read_cache
from kd_pipeline.cache.build import CacheConfig, cache_teacher
from kd_pipeline.cache.format.encodings import compact as compact_module
from kd_pipeline.cache.format.encodings import encoding_class, encoding_for
from kd_pipeline.cache.format.encodings.compact import DEFAULT_LOGPROB_STEP, CompactEncoding
from kd_pipeline.cache.format.encodings.exact import ExactEncoding
from kd_pipeline.cache.format.files import sha256_file
from kd_pipeline.cache.format.manifest import load_cache
from kd_pipeline.cache.format.rows import CacheRows, tail_mass
from kd_pipeline.cache.format.verify import verify_cache
from kd_pipeline.errors import CacheError

VOCAB, SEQ_LEN, K = 500, 33, 16
MASS_ATOL = 8e-6


def teacher_like_rows(b: int = 6, seq_len: int = SEQ_LEN, k: int = K, seed: int = 0, scale: float = 3.0) -> CacheRows:
    """Sorted top-k of real softmaxes over a Zipf-skewed vocabulary, in float32 as a backend returns them."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, scale, (b, seq_len - 1, VOCAB)) - 0.8 * np.log1p(np.arange(VOCAB))
    lp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    ids = np.argsort(-lp, axis=-1, kind="stable")[..., :k]
    input_ids = rng.integers(0, VOCAB, (b, seq_len)).astype(np.int32)
    return CacheRows(
        seq_ids=np.arange(b, dtype=np.int64),
        input_ids=input_ids,
        loss_mask=np.ones((b, seq_len), bool) & (np.arange(seq_len) > 0),
        topk_ids=ids.astype(np.int32),
        topk_logprobs=np.take_along_axis(lp, ids, -1).astype(np.float32),
        target_logprob=np.take_along_axis(lp, input_ids[:, 1:, None].astype(np.int64), -1)[..., 0].astype(np.float32),
    )


def compact(rows: CacheRows, min_logprob: float | None = None) -> CompactEncoding:
    params = CompactEncoding.new_params(first_block_input_ids=rows.input_ids, vocab_size=VOCAB, min_logprob=min_logprob)
    return CompactEncoding(version=3, seq_len=rows.seq_len, k=rows.k, params=params)


def round_trip(encoding, rows: CacheRows) -> CacheRows:
    return encoding.decode(encoding.encode(rows))


def test_compact_round_trip_is_within_its_bound_and_keeps_the_tail_mass():
    rows = teacher_like_rows()
    enc = compact(rows)
    got = round_trip(enc, rows)
    assert got.topk_logprobs.dtype == np.float32
    np.testing.assert_array_equal(got.topk_ids, rows.topk_ids)
    for name in ("seq_ids", "input_ids", "loss_mask"):
        np.testing.assert_array_equal(getattr(got, name), getattr(rows, name))
    error = np.abs(got.topk_logprobs - rows.topk_logprobs)
    assert 0 < error.max() <= enc.error_bound()
    assert (np.diff(got.topk_logprobs, axis=-1) <= 0).all() and (got.topk_logprobs <= 0).all()
    # The decoded support carries the teacher's mass: the tail derived from it is the teacher's, up to the fp16
    # rounding of the mass shift (|shift| <= step / 2: half an fp16 spacing there is < 8e-6 of the mass).
    np.testing.assert_allclose(tail_mass(got.topk_logprobs), tail_mass(rows.topk_logprobs), atol=MASS_ATOL)
    assert tail_mass(rows.topk_logprobs).mean() > 0.05  # a real tail, not a trivial one
    np.testing.assert_allclose(got.target_logprob, rows.target_logprob, atol=2e-2, rtol=2e-3)


def test_exact_round_trip_is_fp16():
    rows = teacher_like_rows()
    got = round_trip(ExactEncoding(version=3, seq_len=SEQ_LEN, k=K, params={}), rows)
    np.testing.assert_array_equal(got.topk_logprobs, rows.topk_logprobs.astype(np.float16))
    np.testing.assert_array_equal(got.topk_ids, rows.topk_ids)


def test_compact_stores_huge_gaps_in_the_side_list():
    rows = teacher_like_rows(b=2)
    step = DEFAULT_LOGPROB_STEP
    rows.topk_logprobs[0, 3, 1:] -= 1000 * step  # 1000 steps below the top-1: saturates the uint8 increment
    rows.topk_logprobs[1, 5, 7:] -= 300 * step  # 300 steps in one increment, mid-support
    enc = compact(rows)
    table = enc.encode(rows)
    assert len(table.column("gap_overflow").combine_chunks().flatten()) == 2
    got = enc.decode(table)
    assert np.abs(got.topk_logprobs - rows.topk_logprobs).max() <= enc.error_bound()
    assert enc.check(table) == []


def test_min_logprob_cuts_the_support_and_moves_its_mass_to_the_tail():
    rows = teacher_like_rows()
    lp = rows.topk_logprobs
    threshold = float(np.round(np.median(lp), 1))
    full_enc, cut_enc = compact(rows), compact(rows, min_logprob=threshold)
    got = round_trip(cut_enc, rows)
    dropped = lp < threshold
    dropped[..., 0] = False  # the top-1 is always kept
    assert 0.2 < dropped.mean() < 0.9  # the cut is real on these rows
    assert np.isneginf(got.topk_logprobs[dropped]).all() and np.isfinite(got.topk_logprobs[~dropped]).all()
    assert np.abs(got.topk_logprobs[~dropped] - lp[~dropped]).max() <= cut_enc.error_bound()
    np.testing.assert_array_equal(got.topk_ids[~dropped], rows.topk_ids[~dropped])
    expected_tail = tail_mass(lp) + np.where(dropped, np.exp(lp), 0).sum(-1)
    np.testing.assert_allclose(tail_mass(got.topk_logprobs), expected_tail, atol=MASS_ATOL)
    # Pads: valid, distinct ids per position that carry no weight.
    ids = got.topk_ids
    assert ids.min() >= 0 and ids.max() < VOCAB
    ordered = np.sort(ids, axis=-1)
    assert not (ordered[..., 1:] == ordered[..., :-1]).any()
    counts = cut_enc.encode(rows).column("support_size").combine_chunks().flatten().to_numpy()
    np.testing.assert_array_equal(counts, (~dropped).sum(-1).reshape(-1))
    assert pq_bytes(cut_enc, rows) < pq_bytes(full_enc, rows)


def pq_bytes(encoding, rows: CacheRows) -> int:
    import io

    buffer = io.BytesIO()
    pq.write_table(encoding.encode(rows), buffer, **encoding.write_options)
    return len(buffer.getvalue())


def test_compact_keeps_sampled_pads_and_refuses_unsorted_values():
    rows = teacher_like_rows(b=2)
    rows.topk_logprobs[:, :4, 10:] = -np.inf  # a sampled support with fewer distinct draws than k
    got = round_trip(compact(rows), rows)
    assert np.isneginf(got.topk_logprobs[:, :4, 10:]).all() and np.isfinite(got.topk_logprobs[:, 4:]).all()
    np.testing.assert_array_equal(got.topk_ids[:, :4, :10], rows.topk_ids[:, :4, :10])
    with pytest.raises(ValueError, match="top-1 log-probability of every position must be finite"):
        compact(rows).encode(replace(rows, topk_logprobs=rows.topk_logprobs[..., ::-1].copy()))
    rows = teacher_like_rows(b=2)
    for cut in (None, -3.0):  # the full-support path and the masked one
        with pytest.raises(ValueError, match="sorted descending"):
            compact(rows, cut).encode(replace(rows, topk_logprobs=rows.topk_logprobs[..., ::-1].copy()))


def test_frequency_table_is_a_deterministic_bijection():
    rows = teacher_like_rows()
    a, b = compact(rows), compact(teacher_like_rows())
    assert a.params == b.params
    order, rank = a._tables
    assert sorted(order.tolist()) == list(range(VOCAB))
    np.testing.assert_array_equal(order[rank], np.arange(VOCAB))
    counts = np.bincount(rows.input_ids.ravel(), minlength=VOCAB)
    assert counts[order[0]] == counts.max()  # rank 0 is the most frequent input token
    assert (np.diff(counts[order][: (counts > 0).sum()]) <= 0).all()
    # Ids beyond the table (a model head wider than its tokenizer) are stored as themselves, far ones too.
    rows.topk_ids[0, 0, -1] = VOCAB + 7
    rows.topk_ids[0, 1, -1] = 60_000
    got = round_trip(a, rows)
    assert got.topk_ids[0, 0, -1] == VOCAB + 7 and got.topk_ids[0, 1, -1] == 60_000
    np.testing.assert_array_equal(got.topk_ids, rows.topk_ids)


def test_ranks_split_into_bytes_round_trip_and_damaged_streams_are_refused():
    from kd_pipeline.cache.format.encodings.compact import _join_ranks, _split_ranks

    ranks = np.concatenate([np.arange(70_000), [150_000, 2**31 - 1]]).astype(np.int32)
    heads, tails, far = _split_ranks(ranks)
    assert heads.dtype == tails.dtype == np.uint8 and heads.size == ranks.size
    assert tails.size == (ranks >= 64).sum() and far.size == (ranks >= 48_960).sum()
    np.testing.assert_array_equal(_join_ranks(heads, tails, far), ranks)
    with pytest.raises(ValueError, match="need a tail byte"):
        _join_ranks(heads, tails[:-1], far)
    with pytest.raises(ValueError, match="far values are stored"):
        _join_ranks(heads, tails, far[:-1])


def test_ids_are_encoded_by_byte_tables_as_their_ranks_split():
    """The encoder's per-id byte tables give the streams _split_ranks makes of the ranks: in a table wide enough
    for far ranks (past 48,960) and with ids beyond the table."""
    from kd_pipeline.cache.format.encodings.compact import _split_ranks

    size = 50_000
    input_ids = np.random.default_rng(1).integers(0, size, 200_000).astype(np.int32)
    params = CompactEncoding.new_params(first_block_input_ids=input_ids, vocab_size=size, min_logprob=None)
    enc = CompactEncoding(version=3, seq_len=SEQ_LEN, k=K, params=params)
    ids = np.random.default_rng(2).permutation(size).astype(np.int32)
    for case in (ids, np.concatenate([ids, [size, size + 70_000, 2**31 - 1]]).astype(np.int32)):
        expected = _split_ranks(enc._map(case, enc._tables[1]))
        assert expected[2].size > 0  # far ranks are present
        for got, want in zip(enc._id_bytes(case), expected, strict=True):
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("min_logprob", [None, -7.0])
def test_compact_encodes_the_same_bytes_in_blocks_and_refuses_nan(min_logprob, monkeypatch):
    rows = teacher_like_rows(b=3)
    rows.topk_logprobs[1, 2, 1:] -= 400 * DEFAULT_LOGPROB_STEP  # a saturated gap
    whole = compact(rows, min_logprob).encode(rows)
    monkeypatch.setattr(compact_module, "_BLOCK_VALUES", 7 * K)  # blocks of 7 positions, the last one shorter
    assert compact(rows, min_logprob).encode(rows).equals(whole)
    bad = replace(rows, topk_logprobs=rows.topk_logprobs.copy())
    bad.topk_logprobs[2, 30, 5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        compact(rows, min_logprob).encode(bad)


def reference_decode(encoding: CompactEncoding, table) -> tuple[np.ndarray, np.ndarray]:
    """The bytes read one position at a time as the compact module's docstring states them: what its vectorized
    decoder must reproduce bit for bit. → (ids [N, k] int32, log-probs [N, k] float32)."""
    k, step = encoding.k, np.float32(encoding.step)
    order = encoding._tables[0]

    def values(name):  # a list column's values, rows concatenated
        return table.column(name).combine_chunks().flatten().to_numpy()

    def stream(name):  # a binary column's bytes, rows concatenated, one at a time
        return iter(b"".join(table.column(name).to_pylist()))

    count, top, shift = values("support_size"), values("top_logprob"), values("log_mass_shift")
    gaps, heads, tails = stream("gap_steps"), stream("id_heads"), stream("id_tails")
    overflow, far = iter(values("gap_overflow").tolist()), iter(values("id_far").tolist())
    ids = np.zeros((count.size, k), np.int32)
    lp = np.full((count.size, k), -np.inf, np.float32)
    for t, n_t in enumerate(count.tolist()):
        base = np.float32(top[t]) + np.float32(shift[t])
        q, ranks = 0, []
        for j in range(n_t):
            if j:
                gap = next(gaps)
                q += next(overflow) if gap == 255 else gap
            lp[t, j] = np.float32(np.float32(q) * -step) + base
            head = next(heads)
            rank = head if head < 64 else 64 + (head - 64) * 256 + next(tails) if head < 255 else None
            if rank is None:  # far: the tail byte holds the low 8 bits
                tail = next(tails)
                rank = 48_960 + next(far) * 256 + tail
            ranks.append(rank)
        taken = set(ranks)
        ranks += [r for r in range(2 * k + 1) if r not in taken][: k - n_t]  # pads: the smallest free ranks
        ids[t] = [order[r] if r < order.size else r for r in ranks]
    for rest in (gaps, overflow, heads, tails, far):
        assert next(rest, None) is None
    return ids, lp


@pytest.mark.parametrize("block_positions", [None, 5])
@pytest.mark.parametrize("k", [1, 5, 16, 70, 260])
def test_compact_decode_matches_the_reference_bit_for_bit(k, block_positions, monkeypatch):
    """Full and cut supports, sampled pads, saturated gaps, wide and far ranks, ids beyond the table, at widths
    that fill the 4-lane words exactly or not and past the 16-bit sums (k=260, (k-1) x 255 >= 2^16); in one
    block of positions or in blocks of 5 (the last one shorter)."""
    if block_positions:
        monkeypatch.setattr(compact_module, "_BLOCK_VALUES", block_positions * k)
    rows = teacher_like_rows(b=3, seq_len=9 if k > 100 else SEQ_LEN, k=k, seed=k)
    step = DEFAULT_LOGPROB_STEP
    if k > 1:
        rows.topk_logprobs[0, 3, 1:] -= 1000 * step  # one saturated gap at the first increment
        rows.topk_logprobs[1, 5, k // 2 :] -= 300 * step  # and one mid-support
        rows.topk_logprobs[2, 1, 1:] -= 254 * step  # the largest unsaturated increment
    rows.topk_ids[0, 0, -1] = 60_000  # beyond the table: a far rank
    rows.topk_ids[1, 2, 0] = 2**31 - 1
    rows.topk_ids[2, 4, -1] = VOCAB + 300  # a wide rank beyond the table
    for min_logprob in (None, -7.0):
        for pads in (False, True):
            case = replace(rows, topk_logprobs=rows.topk_logprobs.copy())
            if pads and k > 2:
                case.topk_logprobs[1, :3, k - 2 :] = -np.inf
            enc = compact(case, min_logprob)
            table = enc.encode(case)
            counts, overflow = (table.column(c).combine_chunks().flatten() for c in ("support_size", "gap_overflow"))
            assert len(table.column("id_far").combine_chunks().flatten()) >= 1
            assert len(overflow) >= (2 if min_logprob is None and k > 1 else 0)
            assert (pc.min(counts).as_py() < k) == (k > 2 and (pads or min_logprob is not None))
            got = enc.decode(table)
            ids, lp = reference_decode(enc, table)
            np.testing.assert_array_equal(got.topk_ids.reshape(-1, k), ids)
            assert got.topk_logprobs.dtype == np.float32
            np.testing.assert_array_equal(got.topk_logprobs.reshape(-1, k).view(np.uint32), lp.view(np.uint32))
            assert (got.topk_ids.reshape(-1, k)[np.isfinite(lp)] == case.topk_ids.reshape(-1, k)[np.isfinite(lp)]).all()


def test_caches_written_with_int32_ranks_still_read():
    """A compact cache whose manifest names no id_layout (written before the byte split) stores int32 ranks."""
    rows = teacher_like_rows(b=2)
    params = CompactEncoding.new_params(first_block_input_ids=rows.input_ids, vocab_size=VOCAB, min_logprob=None)
    del params["id_layout"]
    legacy = CompactEncoding(version=3, seq_len=SEQ_LEN, k=K, params=params)
    table = legacy.encode(rows)
    assert "topk_ids" in table.schema.names and "id_heads" not in table.schema.names
    np.testing.assert_array_equal(legacy.decode(table).topk_ids, rows.topk_ids)
    np.testing.assert_array_equal(
        legacy.decode(table).topk_logprobs, compact(rows).decode(compact(rows).encode(rows)).topk_logprobs
    )


def test_registry_and_unknown_encodings():
    assert encoding_class("compact") is CompactEncoding and encoding_class("exact") is ExactEncoding
    with pytest.raises(ValueError, match="unknown encoding 'zip'; choose from compact, exact"):
        encoding_class("zip")
    with pytest.raises(ValueError, match="does not exist in cache format version 2"):
        CompactEncoding(version=2, seq_len=SEQ_LEN, k=K, params={})
    with pytest.raises(ValueError, match="--min-logprob"):
        ExactEncoding.new_params(first_block_input_ids=np.zeros(3, np.int32), vocab_size=VOCAB, min_logprob=-5.0)


# ---------------------------------------------------------------------------------------------------
# Through the writer, on a tiny model


def _config(teacher_dir, corpus_jsonl, out, **kw) -> CacheConfig:
    base = dict(
        teacher=str(teacher_dir),
        data=str(corpus_jsonl),
        out=Path(out),
        top_k=8,
        seq_len=32,
        batch_size=8,
        shard_tokens=32 * 6,
        row_group_tokens=32 * 4,
        max_sequences=12,
        progress=False,
    )
    return CacheConfig(**{**base, **kw})


def test_read_cache_yields_float32_row_groups_whatever_the_encoding(tmp_path, teacher_dir, corpus_jsonl):
    caches = {}
    for name in ("compact", "exact"):
        cache_teacher(_config(teacher_dir, corpus_jsonl, tmp_path / name, encoding=name))
        caches[name] = list(read_cache(tmp_path / name))
    info = load_cache(tmp_path / "compact")
    assert info.manifest.format_version == 3 and info.manifest.encoding["name"] == "compact"
    assert info.manifest.encoding["id_order_sha256"]
    assert [r.num_rows for r in caches["compact"]] == [4, 2, 4, 2]  # row groups of 4 in shards of 6
    compact_rows, exact_rows = (CacheRows.concat(parts) for parts in caches.values())
    for rows in (compact_rows, exact_rows):
        assert rows.topk_logprobs.dtype == np.float32 and rows.target_logprob.dtype == np.float32
        assert rows.topk_ids.dtype == np.int32 and rows.topk_ids.shape == (12, 31, 8)
    np.testing.assert_array_equal(compact_rows.topk_ids, exact_rows.topk_ids)
    bound = encoding_for(info.manifest).error_bound() + 2.0**-7  # plus the exact cache's fp16 rounding
    assert np.abs(compact_rows.topk_logprobs - exact_rows.topk_logprobs).max() <= bound
    assert verify_cache(tmp_path / "compact").ok  # (bytes: 48 rows are all footer; see bench/bench_encodings.py)


def test_encoding_is_part_of_the_identity(tmp_path, teacher_dir, corpus_jsonl):
    out = tmp_path / "cache"
    cache_teacher(_config(teacher_dir, corpus_jsonl, out, max_sequences=6))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["complete"] = False
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match=r"encoding\.name: 'compact' != 'exact'"):
        cache_teacher(_config(teacher_dir, corpus_jsonl, out, max_sequences=6, encoding="exact"))
    with pytest.raises(CacheError, match=r"encoding\.min_logprob: None != -4\.0"):
        cache_teacher(_config(teacher_dir, corpus_jsonl, out, max_sequences=6, min_logprob=-4.0))
    manifest["complete"] = True
    manifest["encoding"]["id_order_sha256"] = "0" * 64  # a table edited by hand is refused on load
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="id_order does not match its sha256"):
        load_cache(out)


def test_verify_names_a_compact_shard_whose_streams_disagree(tmp_path, teacher_dir, corpus_jsonl):
    """A shard rewritten with a support size its id and gap lists do not hold, checksum updated: caught."""
    import pyarrow as pa

    out = tmp_path / "cache"
    cache_teacher(_config(teacher_dir, corpus_jsonl, out, max_sequences=6))
    info = load_cache(out)
    path = out / info.shards[0].name
    table = pq.read_table(path)
    sizes = table.column("support_size").combine_chunks()
    values = sizes.flatten().to_numpy().copy()
    values[5] -= 1
    broken = pa.ListArray.from_arrays(sizes.offsets, pa.array(values, pa.uint16()), type=sizes.type)
    table = table.set_column(table.schema.get_field_index("support_size"), table.schema.field("support_size"), broken)
    pq.write_table(
        table, path, row_group_size=info.manifest.row_group_rows, **encoding_for(info.manifest).write_options
    )
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][0].update(sha256=sha256_file(path), bytes=path.stat().st_size)
    (out / "manifest.json").write_text(json.dumps(manifest))
    problems = verify_cache(out).problems
    assert len(problems) == 1 and "00000000.parquet: unreadable" in problems[0] and "ids and" in problems[0]
    with pytest.raises(CacheError, match="does not decode"):
        from kd_pipeline.train.reader import CacheReader

        next(iter(CacheReader(out, batch_size=2, shuffle=False)))


def test_cli_encoding_options(tmp_path, teacher_dir, corpus_jsonl):
    from typer.testing import CliRunner

    from kd_pipeline.pipeline import app

    runner = CliRunner()
    args = [
        "cache-teacher",
        "--teacher",
        str(teacher_dir),
        "--data",
        str(corpus_jsonl),
        "--out",
        str(tmp_path / "c"),
        "--top-k",
        "4",
        "--seq-len",
        "16",
        "--max-tokens",
        "96",
        "--no-progress",
    ]
    bad = runner.invoke(app, args + ["--encoding", "zip"])
    assert bad.exit_code == 2 and "--encoding must be one of compact, exact" in bad.output
    cut_exact = runner.invoke(app, args + ["--encoding", "exact", "--min-logprob", "-3"])
    assert cut_exact.exit_code == 2 and "--min-logprob needs" in cut_exact.output
    ok = runner.invoke(app, args + ["--min-logprob", "-3"])
    assert ok.exit_code == 0, ok.output
    assert load_cache(tmp_path / "c").manifest.encoding["min_logprob"] == -3.0
    shown = runner.invoke(app, ["inspect", str(tmp_path / "c")])
    assert (
        shown.exit_code == 0 and "encoding: compact" in shown.output and "support cut below log p = -3" in shown.output
    )
    assert verify_cache(tmp_path / "c").ok
