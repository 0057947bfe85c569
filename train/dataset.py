"""A teacher cache as a torch ``IterableDataset``, for one's own training loop or the Hugging Face ``Trainer``.

:class:`CacheDataset` yields one sequence at a time, the per-sequence slice of what a
:class:`~kd_pipeline.train.reader.CacheReader` batch holds; ``torch.utils.data.default_collate`` stacks them back
into that batch dict, which the losses take (``kd_pipeline.train.trainer.student_view`` and ``losses``). Per
sequence, so that the DataLoader (or the HF Trainer's ``per_device_train_batch_size``) decides the batch size as
it does for any dataset, and DataLoader workers batch their own share.

The order is CacheReader's, a pure function of (cache, seed, epoch): chunks permuted, windows of
``shuffle_rows`` rows shuffled inside, the epoch's order cut into one contiguous slice per rank (the last
``N mod world_size`` sequences left out so that every rank has as many). With DataLoader workers, each worker
takes a contiguous part of its rank's slice, in whole blocks of ``batch_size`` sequences (so no worker's batch
but the last mixes parts, and each worker decodes only the windows of its part). With one worker or none the
sequences come in exactly CacheReader's order; with W workers the DataLoader interleaves their batches
(worker 0's first, worker 1's first, ...), again the same for every run.

``state_dict()`` is the position of the sequences handed out (epoch, sequences of this worker's part), and
``load_state_dict`` continues from it exactly. Iterated in the training process (``num_workers=0``, the HF
Trainer's default) the dataset object itself is current. With worker processes each worker iterates its own copy:
use ``torchdata.stateful_dataloader.StatefulDataLoader``, which asks each worker's copy for its state and hands
it back to the same worker on resume.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import IterableDataset, get_worker_info

from kd_pipeline.cache.format.manifest import CacheInfo
from kd_pipeline.errors import CacheError, ConfigError
from kd_pipeline.train.reader import CacheReader, Chunk


class CacheDataset(IterableDataset):
    """One pass over this rank's share of ``cache`` per iteration, one epoch after the other.

    Each item is a dict of CPU tensors for one sequence of L tokens with the cache's top-k: ``input_ids`` [L]
    int64, ``target_mask`` [L-1] bool, ``topk_ids`` [L-1, k] int32, ``topk_logprobs`` [L-1, k] float16 (float32
    for a compact cache), ``target_logprob`` [L-1] float16, ``seq_ids`` [] int64.

    ``batch_size``: the DataLoader's; the unit in which workers split a rank's share (any DataLoader batch size
    works, this one gives whole batches per worker). ``rank``/``world_size``: default from the initialized
    process group, else 0 of 1. Under the HF Trainer on several processes, leave them at 0 of 1: its
    accelerate DataLoader reads an IterableDataset on the main process and sends each rank its part.
    ``chunks``: a part of the cache (``reader.split_holdout``), default all of it.
    """

    def __init__(
        self,
        cache: str | Path | CacheInfo,
        *,
        batch_size: int = 8,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_rows: int = 1024,
        rank: int | None = None,
        world_size: int | None = None,
        chunks: list[Chunk] | None = None,
        verify_checksums: bool = True,
    ):
        super().__init__()
        if rank is None or world_size is None:
            rank, world_size = _process_group()
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1; got {batch_size}")
        self.reader = CacheReader(
            cache,
            batch_size,
            chunks=chunks,
            seed=seed,
            shuffle=shuffle,
            shuffle_rows=shuffle_rows,
            rank=rank,
            world_size=world_size,
            verify_checksums=verify_checksums,
            prefetch=2,
        )
        self.epoch = 0
        self.consumed = 0  # sequences of this worker's part handed out in self.epoch
        self._worker: tuple[int, int] | None = None  # (id, count) seen by the last __iter__ or load_state_dict

    # ------------------------------------------------------------------------------------------ order
    def part(self, worker: int, num_workers: int) -> range:
        """The positions in this rank's slice of an epoch that ``worker`` of ``num_workers`` yields."""
        n, block = self.reader.samples_per_rank, self.reader.batch_size
        blocks = -(-n // block)
        lo, hi = worker * blocks // num_workers, (worker + 1) * blocks // num_workers
        return range(min(n, lo * block), min(n, hi * block))

    def set_epoch(self, epoch: int) -> None:
        """Iterate ``epoch`` next, from its start (what the HF Trainer calls before each epoch); a no-op for the
        epoch the dataset is in, so a resumed position survives the call."""
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker = _current_worker()
        if self.consumed and self._worker not in (None, worker):
            raise CacheError(
                f"this dataset's position belongs to worker {self._worker[0]} of {self._worker[1]}, but it is "
                f"iterated as worker {worker[0]} of {worker[1]}: resume with the same DataLoader num_workers"
            )
        self._worker = worker
        part = self.part(*worker)
        if self.consumed >= len(part):  # a position at the end of its epoch (the caller stopped on its last item)
            self.epoch, self.consumed = self.epoch + 1, 0
        if not part:
            self.epoch += 1
            return
        position = part.start + self.consumed
        batches = self.reader.iter_epoch(self.epoch, skip=position)
        try:
            for batch in batches:
                for row in range(batch["input_ids"].shape[0]):
                    self.consumed += 1  # before the yield: the state taken while the caller holds it counts it
                    position += 1
                    yield {name: values[row] for name, values in batch.items()}
                    if position == part.stop:
                        return
        finally:
            batches.close()  # joins the reader's prefetch thread when the caller stops early
            if position == part.stop:
                self.epoch, self.consumed = self.epoch + 1, 0

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        worker, workers = self._worker or _current_worker()
        return {
            "epoch": self.epoch,
            "consumed": self.consumed,
            "worker": worker,
            "num_workers": workers,
            **{k: v for k, v in self.reader.state_dict().items() if k not in ("epoch", "consumed")},
            "rank": self.reader.rank,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue after the sequences ``state`` had handed out, in the same setting (cache, seed, ranks,
        batch size and, with workers, the same worker of as many)."""
        reader = self.reader.state_dict()
        for key in ("seed", "world_size", "batch_size", "cache_fingerprint"):
            if state[key] != reader[key]:
                raise CacheError(f"cannot resume the dataset: {key} was {state[key]}, now {reader[key]}")
        if state["rank"] != self.reader.rank:
            raise CacheError(
                f"cannot resume the dataset: the state is rank {state['rank']}'s, this is rank {self.reader.rank}"
            )
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        self._worker = (int(state["worker"]), int(state["num_workers"]))
        if self.consumed > len(self.part(*self._worker)):
            raise CacheError(f"cannot resume the dataset: {self.consumed} sequences consumed, more than its part holds")


def _process_group() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _current_worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)
