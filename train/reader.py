"""Stream a teacher cache into training batches: bounded memory, deterministic order, exact resume.

Sample order is a pure function of (cache content, seed, epoch):

1. The unit of I/O is a *chunk*: one Parquet row group of one shard, or a contiguous part of one (the
   eval holdout splits a row group); its size comes from the manifest, so planning opens no file.
2. Each epoch permutes the chunks, groups consecutive chunks into *windows* of >= ``shuffle_rows`` rows
   and permutes the rows inside each window (a shuffle buffer whose contents are known in advance).
3. The epoch's global order is cut into ``world_size`` equal contiguous slices, one per rank. The last
   ``N mod world_size`` samples of the order are left out of that epoch (a different few every epoch
   when shuffling) so that every rank takes the same number of steps: unequal counts hang DDP.

A rank's position is (epoch, samples consumed); ``state_dict`` records the position of the last batch
handed to the caller, not of what the prefetch thread has read ahead.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from kd_pipeline.cache.format.encodings import encoding_for
from kd_pipeline.cache.format.layout import TOKENIZER_DIR
from kd_pipeline.cache.format.manifest import CacheInfo, load_cache, tokenizer_fingerprint
from kd_pipeline.cache.format.rows import CacheRows
from kd_pipeline.cache.format.storage import naming_storage_errors
from kd_pipeline.errors import CacheError


def check_tokenizer(info: CacheInfo, tokenizer, allow_vocab_superset: bool = False) -> None:
    """Refuse a student whose token ids do not mean what the teacher's meant."""
    expected = info.manifest.tokenizer
    got = tokenizer_fingerprint(tokenizer)
    if got["sha256"] == expected["sha256"]:
        return
    if not allow_vocab_superset:
        raise CacheError(
            f"the student's tokenizer differs from the teacher's in {info.root} (vocab {got['vocab_size']} vs "
            f"{expected['vocab_size']}, fingerprint {got['sha256'][:12]} vs {expected['sha256'][:12]}). "
            "Cached teacher ids would index the wrong tokens. Pass --cross-tokenizer to distill into the student's own "
            "tokenizer, use the teacher's, or pass --allow-vocab-superset if the student's vocabulary extends the "
            "teacher's with the same ids."
        )
    if not info.store.is_folder(TOKENIZER_DIR):
        raise CacheError(
            f"{info.store.member(TOKENIZER_DIR)}: the cache has no copy of the teacher tokenizer to compare with"
        )
    from transformers import AutoTokenizer

    teacher_vocab = AutoTokenizer.from_pretrained(info.store.local_dir(TOKENIZER_DIR)).get_vocab()
    student_vocab = tokenizer.get_vocab()
    wrong = [tok for tok, idx in teacher_vocab.items() if student_vocab.get(tok) != idx]
    if wrong:
        raise CacheError(
            f"--allow-vocab-superset: {len(wrong)} teacher tokens have another id (or none) in the student's "
            f"vocabulary, e.g. {wrong[:5]}"
        )


@dataclass(frozen=True)
class Chunk:
    shard: int  # index into CacheInfo.shards
    row_group: int
    rows: int
    first_seq_id: int
    offset: int = 0  # first row within the row group (a part of a row group: see split_holdout)


def plan_chunks(info: CacheInfo) -> list[Chunk]:
    rgr = info.manifest.row_group_rows
    chunks = []
    for i, shard in enumerate(info.shards):
        for g, start in enumerate(range(0, shard.rows, rgr)):
            chunks.append(Chunk(i, g, min(rgr, shard.rows - start), shard.first_seq_id + start))
    return chunks


def split_holdout(chunks: list[Chunk], eval_sequences: int) -> tuple[list[Chunk], list[Chunk]]:
    """Hold out the last ``eval_sequences`` sequences of the stream for evaluation: ``(train, held)``.

    Exactly that many: the row group at the boundary is split between the two (so a cache of one row group
    can be held out from too). A holdout that leaves nothing to train on is refused with the numbers.
    """
    if eval_sequences <= 0:
        return chunks, []
    total = sum(c.rows for c in chunks)
    if eval_sequences >= total:
        raise CacheError(
            f"--eval-sequences {eval_sequences} would hold out the whole cache ({total} sequences): give at most "
            f"{total - 1}, 0 for no eval, or --eval-cache to evaluate on another cache"
        )
    train, held, need = list(chunks), [], eval_sequences
    while need:
        last = train.pop()
        if last.rows > need:  # the boundary: its first rows train, its last `need` rows are held out
            keep = last.rows - need
            train.append(replace(last, rows=keep))
            last = replace(last, rows=need, offset=last.offset + keep, first_seq_id=last.first_seq_id + keep)
        held.append(last)
        need -= last.rows
    return train, held[::-1]


@dataclass
class Window:
    chunks: list[int]  # indices into the reader's chunk list
    order: np.ndarray  # [rows] positions into the concatenation of those chunks' rows


class CacheReader:
    """Iterate batches of one rank's share of a cache, forever (epochs roll over) or for one pass.

    Batches are dicts of CPU tensors (pinned if ``pin_memory``):
    input_ids [B, L] int64, target_mask [B, L-1] bool (which next-token targets count),
    topk_ids [B, L-1, k] int32, topk_logprobs [B, L-1, k] float16 (exact) or float32 (compact: decoded
    values are not on the fp16 grid), target_logprob [B, L-1] float16,
    seq_ids [B] int64. ``topk_ids`` keeps the cache's int32, the largest array of a batch: indexing needs
    int64, which the consumer makes on its device at half the host copy and transfer cost.
    """

    def __init__(
        self,
        cache: str | Path | CacheInfo,
        batch_size: int,
        *,
        chunks: list[Chunk] | None = None,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_rows: int = 1024,
        rank: int = 0,
        world_size: int = 1,
        drop_remainder: bool = True,
        verify_checksums: bool = True,
        prefetch: int = 4,
        pin_memory: bool = False,
    ):
        self.info = cache if isinstance(cache, CacheInfo) else load_cache(cache)
        self.manifest = self.info.manifest
        self.encoding = encoding_for(self.manifest)
        self.batch_size = batch_size
        self.chunks = plan_chunks(self.info) if chunks is None else chunks
        self.seed, self.shuffle, self.shuffle_rows = seed, shuffle, max(1, shuffle_rows)
        self.rank, self.world_size = rank, world_size
        self.drop_remainder = drop_remainder
        self.verify_checksums = verify_checksums
        self.prefetch = prefetch
        self.pin_memory = pin_memory
        self._verified: dict[int, tuple[int, ...]] = {}  # shard index -> file identity when verified
        self.epoch = 0
        self.consumed = 0  # samples of this rank's slice already handed out in self.epoch
        total = sum(c.rows for c in self.chunks)
        self.samples_per_rank = total // world_size if drop_remainder else -(-total // world_size)
        if self.samples_per_rank == 0:
            raise CacheError(f"{total} sequences cannot feed {world_size} ranks")

    # ----------------------------------------------------------------------------------- planning
    def _windows(self, epoch: int) -> list[Window]:
        rng = np.random.default_rng([self.seed, epoch])
        chunk_order = rng.permutation(len(self.chunks)) if self.shuffle else np.arange(len(self.chunks))
        windows, current, rows = [], [], 0
        for idx in chunk_order:
            current.append(int(idx))
            rows += self.chunks[idx].rows
            if rows >= self.shuffle_rows:
                windows.append(current)
                current, rows = [], 0
        if current:
            windows.append(current)
        out = []
        for w, members in enumerate(windows):
            n = sum(self.chunks[i].rows for i in members)
            order = np.random.default_rng([self.seed, epoch, w]).permutation(n) if self.shuffle else np.arange(n)
            out.append(Window(members, order))
        return out

    # ------------------------------------------------------------------------------------ reading
    def _check_shard(self, index: int, name: str) -> None:
        """Verify a shard on its first open (sha256 against the manifest) and prove it is the same file on every
        later one: a shard is reopened by path for each of its row groups, and a cache rebuilt or rsynced into
        place under a running job renames new files over the old ones. One ``stat`` (device, inode, size,
        modification time) per open costs microseconds against milliseconds of reading, where holding every
        verified shard open would hold thousands of descriptors. A file whose identity changed is hashed again:
        the same bytes (a copy of the same cache) read on, other bytes stop the run naming the shard. In a bucket the
        identity is the object's size, ETag and modification time (cache/format/storage.py), and a shard is hashed
        by streaming it once in bounded ranges, then read by row-group ranges: twice its bytes in epoch one."""
        shard, store = self.info.shards[index], self.info.store
        path = store.member(name)
        try:
            before = store.identity(name)
        except FileNotFoundError:
            raise CacheError(f"{path}: shard listed in the manifest is missing") from None
        if self._verified.get(index) == before:
            return
        if self.verify_checksums or index in self._verified:
            if store.sha256(name) != shard.sha256:
                changed = index in self._verified
                raise CacheError(
                    f"{path}: the shard changed since this run verified it (the cache was rebuilt or replaced "
                    "under it); stopped rather than train on another teacher's data. Rerun on the new cache as a "
                    "new run (another --out)"
                    if changed
                    else f"{path}: sha256 mismatch; the shard is corrupted (run `pipeline verify`)"
                )
            if store.identity(name) != before:  # replaced while it was being hashed
                raise CacheError(f"{path}: the shard changed while it was being verified (a cache written under a run)")
        self._verified[index] = before

    def _read_chunk(self, chunk: Chunk) -> CacheRows:
        shard, store = self.info.shards[chunk.shard], self.info.store
        path = store.member(shard.name)
        # Arrow's errors name no file (ArrowInvalid is a ValueError, ArrowIOError an OSError): name it here.
        unreadable = (OSError, ValueError, KeyError, IndexError, pa.ArrowException)
        with naming_storage_errors(path):
            self._check_shard(chunk.shard, shard.name)
        try:
            # Locally small reads; in a bucket one ranged request per row group (the store knows which).
            with store.parquet_file(shard.name) as f:
                # After the open: the file arrow holds is the one whose identity is checked (a rename over the
                # path from here on leaves arrow reading the verified file).
                with naming_storage_errors(path):
                    self._check_shard(chunk.shard, shard.name)
                table = f.read_row_group(chunk.row_group)
        except unreadable as e:
            raise CacheError(f"{path}: unreadable shard ({type(e).__name__}: {e})") from e
        expected = min(self.manifest.row_group_rows, shard.rows - chunk.row_group * self.manifest.row_group_rows)
        if table.num_rows != expected:
            raise CacheError(f"{path}: row group {chunk.row_group} has {table.num_rows} rows, expected {expected}")
        if chunk.rows != expected:  # a part of the row group (the holdout's boundary)
            table = table.slice(chunk.offset, chunk.rows)
        try:
            return self.encoding.decode(table)
        except unreadable as e:  # a file that passed its checksum but does not decode
            raise CacheError(f"{path}: row group {chunk.row_group} does not decode ({type(e).__name__}: {e})") from e

    def _read_window(self, window: Window) -> _DecodedWindow:
        return _DecodedWindow([self._read_chunk(self.chunks[i]) for i in window.chunks])

    def _produce(self, epoch: int, skip: int) -> Iterator[tuple[dict[str, torch.Tensor], int]]:
        """Yield (batch, samples consumed after it) for this rank's slice of ``epoch``, from ``skip``."""
        start = self.rank * self.samples_per_rank + skip
        stop = (self.rank + 1) * self.samples_per_rank
        consumed = skip
        batch: _BatchBuilder | None = None
        offset = 0  # global position of the current window's first sample
        for window in self._windows(epoch):
            n = len(window.order)
            lo, hi = max(start, offset), min(stop, offset + n)
            offset += n
            if lo >= hi:
                if offset >= stop:
                    break
                continue
            data = None  # drop the previous window before decoding this one: one window in memory, not two
            data = self._read_window(window)
            picks = window.order[lo - (offset - n) : hi - (offset - n)]
            taken = 0
            while taken < len(picks):
                if batch is None:
                    batch = _BatchBuilder(
                        self.batch_size, self.manifest.seq_len, self.manifest.k, self.pin_memory, data.logprob_dtype
                    )
                part = picks[taken : taken + batch.free]
                batch.add(data, part)
                taken += len(part)
                if batch.free == 0:
                    consumed += batch.rows
                    yield batch.tensors(), consumed
                    batch = None
        if batch is not None:
            consumed += batch.rows
            yield batch.tensors(), consumed

    def iter_epoch(self, epoch: int, skip: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """One pass over this rank's slice of ``epoch`` (no state change), prefetched in a thread."""
        for batch, _ in _prefetched(self._produce(epoch, skip), self.prefetch):
            yield batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Batches forever from the current (epoch, consumed) position; updates the position as it goes."""
        while True:
            for batch, consumed in _prefetched(self._produce(self.epoch, self.consumed), self.prefetch):
                self.consumed = consumed
                yield batch
            self.epoch += 1
            self.consumed = 0

    @property
    def batches_per_epoch(self) -> int:
        return -(-self.samples_per_rank // self.batch_size)

    # --------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "consumed": self.consumed,
            "seed": self.seed,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "cache_fingerprint": self.info.fingerprint(),
        }

    def load_state_dict(self, state: dict, reshard: bool = False) -> None:
        """Continue where ``state`` was taken. With ``reshard``, ``state`` may come from another world size: the
        position becomes the same epoch after as many samples as all ranks had consumed together, split anew (the
        exact samples of the rest of that epoch differ from a run that kept its world size)."""
        for key in ("seed", "batch_size") + (() if reshard else ("world_size",)):
            if state[key] != getattr(self, key):
                raise CacheError(f"cannot resume the reader: {key} was {state[key]}, now {getattr(self, key)}")
        if state["cache_fingerprint"] != self.info.fingerprint():
            raise CacheError("cannot resume the reader: the cache changed since the checkpoint")
        self.epoch, self.consumed = state["epoch"], state["consumed"]
        if state["world_size"] != self.world_size:
            self.consumed = min(state["consumed"] * state["world_size"] // self.world_size, self.samples_per_rank)


class _DecodedWindow:
    """A window's chunks as decoded (views of the arrow buffers where possible), never concatenated:
    a window is up to a shard's worth of rows, and copying it cost more than everything else the reader
    does (bench/RESULTS.md, "Reader")."""

    def __init__(self, chunks: list[CacheRows]):
        self.chunks = chunks
        self.logprob_dtype = torch.from_numpy(np.empty(0, chunks[0].topk_logprobs.dtype)).dtype  # as decoded
        self.starts = np.cumsum([0] + [len(c.seq_ids) for c in chunks])  # window position of each chunk's row 0

    def locate(self, positions: np.ndarray) -> Iterator[tuple[CacheRows, np.ndarray, np.ndarray]]:
        """(chunk, its rows, indices into ``positions``) for each chunk that ``positions`` touch."""
        chunk_of = np.searchsorted(self.starts, positions, side="right") - 1
        for c in np.unique(chunk_of):
            which = np.flatnonzero(chunk_of == c)
            yield self.chunks[c], positions[which] - self.starts[c], which


class _BatchBuilder:
    """One batch's tensors, allocated once (pinned if asked) and filled by gathering rows straight from
    the decoded chunks: one copy per value instead of gather, concatenate, convert and pin."""

    def __init__(self, batch_size: int, seq_len: int, k: int, pin_memory: bool, logprob_dtype: torch.dtype):
        def empty(shape, dtype):
            return torch.empty(shape, dtype=dtype, pin_memory=pin_memory)

        self.size, self.rows = batch_size, 0
        self.input_ids = empty((batch_size, seq_len), torch.int64)
        self.target_mask = empty((batch_size, seq_len - 1), torch.bool)
        self.topk_ids = empty((batch_size, seq_len - 1, k), torch.int32)
        self.topk_logprobs = empty((batch_size, seq_len - 1, k), logprob_dtype)
        self.target_logprob = empty((batch_size, seq_len - 1), torch.float16)
        self.seq_ids = empty((batch_size,), torch.int64)

    @property
    def free(self) -> int:
        return self.size - self.rows

    def add(self, window: _DecodedWindow, picks: np.ndarray) -> None:
        """Append the rows at window positions ``picks``, in that order."""
        for chunk, rows, which in window.locate(picks):
            out = self.rows + which
            for name in ("topk_ids", "topk_logprobs", "target_logprob", "input_ids", "seq_ids"):
                getattr(self, name).numpy()[out] = getattr(chunk, name)[rows]  # ids widen to int64 here
            self.target_mask.numpy()[out] = chunk.loss_mask[rows, 1:]
        self.rows += len(picks)

    def tensors(self) -> dict[str, torch.Tensor]:
        n = self.rows  # < size only for the last batch of a pass without drop_remainder
        return {
            "input_ids": self.input_ids[:n],
            "target_mask": self.target_mask[:n],
            "topk_ids": self.topk_ids[:n],
            "topk_logprobs": self.topk_logprobs[:n],
            "target_logprob": self.target_logprob[:n],
            "seq_ids": self.seq_ids[:n],
        }


_DONE = object()


def _prefetched(items: Iterator, depth: int) -> Iterator:
    """Run ``items`` in a background thread, ``depth`` items ahead (arrow/numpy release the GIL).
    Errors in the thread are re-raised in the consumer; abandoning the iterator stops the thread."""
    if depth <= 0:
        yield from items
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        """Hand ``item`` over unless the consumer stopped: a plain put would block forever on a full queue that
        nobody reads any more (a consumer done just as the last item was made), and the consumer's join with it."""
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run():
        try:
            for item in items:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(e)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()  # the shard files it holds open, in this thread

    thread = threading.Thread(target=run, daemon=True, name="cache-prefetch")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        # Joined, never left running: a daemon thread still inside arrow's C++ code when the interpreter exits is
        # killed there by pthread_exit, and the process aborts ("terminate called without an active exception").
        stop.set()
        thread.join()
