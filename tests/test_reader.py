"""The streaming reader: coverage per epoch, rank split, determinism, exact resume, corruption, tokenizer."""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest
import torch

from kd_pipeline import read_all
from kd_pipeline.cache.format.manifest import load_cache
from kd_pipeline.cache.format.rows import CacheRows
from kd_pipeline.errors import CacheError
from kd_pipeline.train.reader import CacheReader, check_tokenizer, plan_chunks, split_holdout


def all_rows(cache_dir) -> CacheRows:
    return read_all(cache_dir)


def take(reader, n):
    it = iter(reader)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("shuffle_rows", [1, 10])  # windows of one row group (views) and of several (a copy)
def test_one_epoch_sees_every_sequence_once_with_its_own_data(small_cache, shuffle_rows):
    rows = all_rows(small_cache)
    reader = CacheReader(small_cache, batch_size=7, seed=3, shuffle_rows=shuffle_rows)
    batches = list(reader.iter_epoch(0))
    seen = torch.cat([b["seq_ids"] for b in batches]).numpy()
    assert sorted(seen.tolist()) == list(range(90))
    assert not np.array_equal(seen, np.arange(90))  # shuffled
    assert [len(b["seq_ids"]) for b in batches] == [7] * 12 + [6]
    for b in batches:
        idx = b["seq_ids"].numpy()
        np.testing.assert_array_equal(b["input_ids"].numpy(), rows.input_ids[idx])
        np.testing.assert_array_equal(b["topk_ids"].numpy(), rows.topk_ids[idx])
        np.testing.assert_array_equal(b["topk_logprobs"].numpy(), rows.topk_logprobs[idx])
        np.testing.assert_array_equal(b["target_logprob"].numpy(), rows.target_logprob[idx])
        np.testing.assert_array_equal(b["target_mask"].numpy(), rows.loss_mask[idx, 1:])
        assert b["input_ids"].dtype == torch.int64 and b["topk_ids"].dtype == torch.int32
        # The small cache is compact: its decoded log-probs are float32 (not on the fp16 grid).
        assert b["topk_logprobs"].dtype == torch.float32 and b["target_mask"].dtype == torch.bool


def test_order_is_a_pure_function_of_seed_and_epoch(small_cache):
    def order(seed, epoch):
        r = CacheReader(small_cache, batch_size=8, seed=seed, shuffle_rows=16)
        return torch.cat([b["seq_ids"] for b in r.iter_epoch(epoch)]).tolist()

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1)
    assert order(1, 0) != order(2, 0)
    unshuffled = CacheReader(small_cache, batch_size=8, shuffle=False)
    assert torch.cat([b["seq_ids"] for b in unshuffled.iter_epoch(0)]).tolist() == list(range(90))


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_get_equal_disjoint_slices(small_cache, world):
    per_rank = []
    for rank in range(world):
        r = CacheReader(small_cache, batch_size=5, seed=0, rank=rank, world_size=world, shuffle_rows=12)
        per_rank.append(torch.cat([b["seq_ids"] for b in r.iter_epoch(0)]).tolist())
        assert r.batches_per_epoch == -(-(90 // world) // 5)
    assert len({len(s) for s in per_rank}) == 1 and len(per_rank[0]) == 90 // world
    union = [i for s in per_rank for i in s]
    assert len(set(union)) == len(union) == (90 // world) * world


def test_exact_resume_mid_epoch_and_across_epochs(small_cache):
    reference = take(CacheReader(small_cache, batch_size=8, seed=5, shuffle_rows=12), 30)  # > 2 epochs
    for cut in (3, 11, 12, 25):
        first = CacheReader(small_cache, batch_size=8, seed=5, shuffle_rows=12)
        it = iter(first)
        for _ in range(cut):
            next(it)
        state = first.state_dict()
        resumed = CacheReader(small_cache, batch_size=8, seed=5, shuffle_rows=12)
        resumed.load_state_dict(state)
        rest = take(resumed, 30 - cut)
        for a, b in zip(reference[cut:], rest):
            assert torch.equal(a["seq_ids"], b["seq_ids"])
            assert torch.equal(a["topk_logprobs"], b["topk_logprobs"])


def test_resume_state_refuses_a_different_setup(small_cache):
    state = CacheReader(small_cache, batch_size=8, seed=5).state_dict()
    with pytest.raises(CacheError, match="seed"):
        CacheReader(small_cache, batch_size=8, seed=6).load_state_dict(state)
    with pytest.raises(CacheError, match="batch_size"):
        CacheReader(small_cache, batch_size=4, seed=5).load_state_dict(state)


def test_holdout_is_disjoint_from_training(small_cache):
    info = load_cache(small_cache)
    train, held = split_holdout(plan_chunks(info), 10)
    assert sum(c.rows for c in held) == 10  # exactly: row groups hold 4 here, the boundary one is split
    train_ids = torch.cat([b["seq_ids"] for b in CacheReader(info, 8, chunks=train).iter_epoch(0)])
    held_ids = torch.cat([b["seq_ids"] for b in CacheReader(info, 8, chunks=held, shuffle=False).iter_epoch(0)])
    assert set(train_ids.tolist()).isdisjoint(held_ids.tolist())
    assert len(train_ids) + len(held_ids) == 90
    assert sorted(held_ids.tolist()) == list(range(80, 90))  # the last 10 of the stream
    with pytest.raises(
        CacheError, match=r"--eval-sequences 1000 would hold out the whole cache \(90 sequences\): give at most 89"
    ):
        split_holdout(plan_chunks(info), 1000)
    with pytest.raises(CacheError, match="whole cache"):
        split_holdout(plan_chunks(info), 90)


def test_holdout_from_a_single_row_group(small_cache):
    """A cache of one row group: the holdout takes its last sequences (it used to need whole row groups)."""
    info = load_cache(small_cache)
    one = plan_chunks(info)[:1]  # 4 sequences in one row group
    for eval_sequences in (1, 3):
        train, held = split_holdout(one, eval_sequences)
        assert [c.rows for c in train] == [4 - eval_sequences] and [c.rows for c in held] == [eval_sequences]
        read = lambda chunks: CacheReader(info, 8, chunks=chunks, shuffle=False, drop_remainder=False)  # noqa: E731
        whole = next(read(one).iter_epoch(0))
        got_train, got_held = next(read(train).iter_epoch(0)), next(read(held).iter_epoch(0))
        for name, column in whole.items():  # the same rows, split where they should be, every column
            assert torch.equal(torch.cat([got_train[name], got_held[name]]), column), name
        assert got_held["seq_ids"].tolist() == list(range(4 - eval_sequences, 4))


def test_corrupted_shard_is_named_on_first_read(small_cache, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(small_cache, copy)
    victim = copy / "shards" / "00000002.parquet"
    data = bytearray(victim.read_bytes())
    data[100] ^= 0x01
    victim.write_bytes(bytes(data))
    reader = CacheReader(copy, batch_size=8, shuffle=False)
    with pytest.raises(CacheError, match="00000002.parquet: sha256 mismatch"):
        list(reader.iter_epoch(0))


def test_tokenizer_check(small_cache, tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    from tests.conftest import build_tokenizer

    info = load_cache(small_cache)
    check_tokenizer(info, AutoTokenizer.from_pretrained(tokenizer_dir))
    other = build_tokenizer(tmp_path / "other", vocab_size=300)
    with pytest.raises(CacheError, match="differs from the teacher"):
        check_tokenizer(info, other)
    with pytest.raises(CacheError, match="have another id"):
        check_tokenizer(info, other, allow_vocab_superset=True)
    extended = AutoTokenizer.from_pretrained(tokenizer_dir)
    extended.add_tokens(["<|tool|>"])
    check_tokenizer(info, extended, allow_vocab_superset=True)  # same ids plus one more: allowed
    with pytest.raises(CacheError):
        check_tokenizer(info, extended)  # but only when asked for


def prefetch_threads() -> list:
    return [t for t in threading.enumerate() if t.name == "cache-prefetch"]


def test_an_abandoned_iterator_stops_and_joins_its_prefetch_thread(small_cache):
    # A prefetch thread left running inside arrow's C++ code when the interpreter exits aborts the process
    # ("terminate called without an active exception", exit -6) after a run that succeeded.
    reader = CacheReader(small_cache, batch_size=2, prefetch=2)
    for source in (iter(reader), reader.iter_epoch(0)):
        next(source)
        assert prefetch_threads(), "the reader is expected to prefetch in a thread"
        source.close()
        assert prefetch_threads() == []
