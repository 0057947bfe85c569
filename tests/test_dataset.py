"""kd_pipeline.CacheDataset (train/dataset.py): CacheReader's order for one worker, every row exactly once per epoch
over ranks and DataLoader workers, deterministic, exact resume from state_dict."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, default_collate

import kd_pipeline
from kd_pipeline.errors import CacheError, ConfigError
from kd_pipeline.train.dataset import CacheDataset
from kd_pipeline.train.reader import CacheReader

B = 4


def seq_ids(items) -> list[int]:
    return [int(i) for item in items for i in item["seq_ids"].reshape(-1)]


def test_exported_lazily_from_the_package_root():
    assert kd_pipeline.CacheDataset is CacheDataset


def test_one_worker_yields_cache_readers_order_and_tensors(small_cache):
    reader = CacheReader(small_cache, B, seed=3, shuffle_rows=8)
    dataset = CacheDataset(small_cache, batch_size=B, seed=3, shuffle_rows=8)
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        want = list(reader.iter_epoch(epoch))
        got = list(DataLoader(dataset, batch_size=B, collate_fn=default_collate))
        assert len(got) == len(want) == reader.batches_per_epoch
        for a, b in zip(got, want):
            assert a.keys() == b.keys()
            for name in a:
                assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    assert seq_ids(reader.iter_epoch(0)) != seq_ids(reader.iter_epoch(1))  # epochs are shuffled anew


@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")  # 3 workers on a 2-core machine
@pytest.mark.parametrize("num_workers", [2, 3])
def test_ranks_and_workers_cover_every_row_exactly_once_per_epoch(small_cache, num_workers):
    world = 2
    total = sum(chunk.rows for chunk in CacheReader(small_cache, B).chunks)
    for epoch in (0, 1):
        seen = []
        for rank in range(world):
            dataset = CacheDataset(small_cache, batch_size=B, seed=5, shuffle_rows=8, rank=rank, world_size=world)
            dataset.set_epoch(epoch)
            loader = DataLoader(dataset, batch_size=B, num_workers=num_workers, collate_fn=default_collate)
            got = seq_ids(loader)
            reader = CacheReader(small_cache, B, seed=5, shuffle_rows=8, rank=rank, world_size=world)
            assert sorted(got) == sorted(seq_ids(reader.iter_epoch(epoch)))  # this rank's share, split by workers
            seen += got
        assert len(seen) == len(set(seen)) == total - total % world  # no overlap; CacheReader drops N mod ranks


def test_workers_take_contiguous_whole_blocks(small_cache):
    dataset = CacheDataset(small_cache, batch_size=B, world_size=1, rank=0)
    n = dataset.reader.samples_per_rank
    parts = [dataset.part(w, 3) for w in range(3)]
    assert parts[0].start == 0 and parts[-1].stop == n
    assert all(a.stop == b.start and a.stop % B == 0 for a, b in zip(parts, parts[1:]))


def test_same_seed_same_order_another_seed_another(small_cache):
    def order(seed):
        return seq_ids([item for item in CacheDataset(small_cache, seed=seed, shuffle_rows=8)])

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert sorted(order(1)) == sorted(order(2))


def test_state_dict_resume_continues_exactly_across_epochs(small_cache):
    def make():
        return CacheDataset(small_cache, batch_size=B, seed=7, shuffle_rows=8)

    n = make().reader.samples_per_rank
    reference = make()
    want = seq_ids(reference) + seq_ids(reference) + seq_ids(reference)  # three epochs, one pass per iteration
    assert len(want) == 3 * n
    for stop in (0, 5, n - 1, n, n + 7):
        dataset, got = make(), []
        items = iter(dataset)
        for _ in range(stop):
            try:
                got.append(next(items))
            except StopIteration:  # the end of an epoch: the next iteration is the next epoch
                items = iter(dataset)
                got.append(next(items))
        state = dataset.state_dict()
        items.close()
        resumed = make()
        resumed.load_state_dict(state)
        rest = seq_ids(resumed) + seq_ids(resumed) + seq_ids(resumed)
        assert seq_ids(got) + rest[: 3 * n - stop] == want, stop


def test_resume_refuses_another_setting(small_cache):
    state = CacheDataset(small_cache, seed=1).state_dict()
    with pytest.raises(CacheError, match="seed was 1, now 2"):
        CacheDataset(small_cache, seed=2).load_state_dict(state)
    with pytest.raises(CacheError, match="batch_size"):
        CacheDataset(small_cache, seed=1, batch_size=3).load_state_dict(state)
    with pytest.raises(CacheError, match="world_size"):
        CacheDataset(small_cache, seed=1, rank=1, world_size=2).load_state_dict(state)


def test_a_position_is_bound_to_its_worker_split(small_cache):
    dataset = CacheDataset(small_cache, batch_size=B, seed=1)
    state = dataset.state_dict()
    state.update(consumed=3, worker=1, num_workers=2)  # what worker 1 of 2 would have saved
    dataset.load_state_dict(state)
    with pytest.raises(CacheError, match="worker 1 of 2, but it is iterated as worker 0 of 1"):
        next(iter(dataset))
    with pytest.raises(ConfigError, match="batch_size"):
        CacheDataset(small_cache, batch_size=0)


@pytest.mark.filterwarnings("ignore:'set_vital' is deprecated:UserWarning")  # torchdata 0.11 on torch 2.13
def test_stateful_dataloader_resumes_workers_exactly(small_cache):
    stateful = pytest.importorskip("torchdata.stateful_dataloader")

    def loader():
        dataset = CacheDataset(small_cache, batch_size=B, seed=9, shuffle_rows=8)
        return stateful.StatefulDataLoader(dataset, batch_size=B, num_workers=2, collate_fn=default_collate)

    want = [seq_ids([batch]) for batch in loader()]
    first = loader()
    got, batches = [], iter(first)
    for _ in range(5):
        got.append(seq_ids([next(batches)]))
    state = first.state_dict()
    del batches
    resumed = loader()
    resumed.load_state_dict(state)
    got += [seq_ids([batch]) for batch in resumed]
    assert got == want


def test_stopping_after_the_reader_made_its_last_batch_does_not_hang():
    """The prefetch thread had made every item and filled its queue when the consumer stopped (a run ending
    a few batches before its epoch did, as the dataset's parts do): the close must not wait forever."""
    import threading
    import time

    from kd_pipeline.train.reader import _prefetched

    items = _prefetched(iter(range(3)), 2)
    assert next(items) == 0
    time.sleep(0.3)  # the thread puts 1 and 2, then waits for room for its end marker
    closer = threading.Thread(target=items.close, daemon=True)
    closer.start()
    closer.join(timeout=10)
    assert not closer.is_alive()
    assert not [t for t in threading.enumerate() if t.name == "cache-prefetch"]
