"""vLLM teacher: the teacher's top-k next-token log-probabilities from vLLM's *prompt* logprobs.

vLLM is an optional extra that installs only where CUDA is; nothing here imports it at module level,
so this file (and its pure converter, :func:`prompt_logprobs_to_scores`) works on any machine.

Facts about vLLM (0.32/0.33, V1 engine) this module relies on, as read in the vllm-project/vllm
sources (paths relative to that repository; the converter uses duck typing only, so a class moving to
another module does not matter):

- ``vllm/logprobs.py``: ``Logprob`` is a dataclass with ``logprob`` (float), ``rank`` (int or None,
  1-based rank over the vocabulary) and ``decoded_token`` (str or None). ``FlatLogprobs`` is a dataclass
  of six plain Python lists: ``start_indices`` and ``end_indices`` (one entry per prompt position;
  position i owns the half-open range [start, end) of the four flat lists) and ``token_ids``,
  ``logprobs``, ``ranks``, ``decoded_tokens`` (one entry per (position, candidate)). ``len()`` is the
  number of positions; indexing one position builds a ``dict[int, Logprob]``; slicing rebases the
  indices to 0. ``PromptLogprobs`` is ``FlatLogprobs | list[dict[int, Logprob] | None]``.
- Same file: the prompt container is created with one empty first position (``append(None)``), so
  entry 0 is an empty block (start == end) in the flat form and ``None`` in the list form. Each further
  position is appended from ``token_ids[pos]`` / ``logprobs[pos]`` zipped with the rank sequence
  (actual token's rank, 1, 2, ..., num_logprobs); the zip stops at num_logprobs + 1 entries. The flat
  form appends all of them in that order, so the actual token is first and a duplicate of it is kept
  when it is also in the top-k. The dict form builds a dict from the same pairs, so when the actual
  token is also in the top-k its key is inserted once: it keeps the first (insertion) slot but holds
  the later top-k value (rank = its top-k position); otherwise it adds a (k+1)-th key with its own rank.
  Dict order therefore says nothing about rank.
- ``vllm/v1/engine/logprobs.py`` (``LogprobsProcessor``, in the front-end process, i.e. ours): the
  prompt container is made with ``create_prompt_logprobs(sampling_params.flat_logprobs)``; prompt
  logprobs arrive in ``_update_prompt_logprobs(LogprobsTensors)`` (once per prefill chunk) as three CPU
  tensors, token ids and logprobs of shape [chunk positions, num_logprobs + 1] plus the actual tokens'
  ranks, which it turns into Python lists (``.tolist()``) and appends position by position. That list
  building costs the front end several times what reading the lists back costs
  (bench/bench_vllm_convert.py), so while our ``generate()`` runs, :func:`keep_prompt_logprob_arrays`
  has that method keep the tensors instead (:class:`PromptLogprobArrays`) for requests made as ours are
  (``prompt_logprobs=k``, no detokenization); any other request, or a vLLM without the method, goes
  through vLLM's own code and its lists, which the converter reads as well. An early V1 version of the
  same file (stored at commit 016e747a) gave an injected actual token the rank num_logprobs + 1
  instead of its true rank: never rely on the actual token's rank.
- ``vllm/v1/worker/gpu_model_runner.py`` (``_get_prompt_logprobs_dict``): prompt logits come from
  ``model.compute_logits``; ``sampler.compute_logprobs`` (a float32 log-softmax over the full vocab, no
  temperature, independent of ``logprobs_mode``) and ``sampler.gather_logprobs(logprobs,
  num_prompt_logprobs, next prompt token)`` give the rows; chunked prefill fills a CPU buffer of
  [num_prompt_tokens - 1, num_prompt_logprobs + 1] chunk by chunk, so the result has the same shape.
- ``vllm/v1/sample/ops/logprobs.py`` (``batched_count_greater_than``): the actual token's rank is the
  number of vocabulary entries whose logprob is >= its own (ties count ahead of it); gather_logprobs
  puts the actual token first, then ``torch.topk``'s sorted top-k.
- ``vllm/sampling_params.py``: ``prompt_logprobs: int | None`` (-1 = full vocab), ``flat_logprobs: bool
  = False``, ``detokenize: bool = True``. ``vllm/v1/engine/processor.py`` (later ``input_processor.py``):
  a request asking for more prompt logprobs than ``model_config.max_logprobs`` (default 20) is rejected
  ("Requested prompt logprobs of N, which is greater than max allowed: M"); we set max_logprobs = k.
- ``vllm/config/model.py`` (``_get_and_verify_max_len``): a ``max_model_len`` above the length derived
  from the model's config (smallest of the context keys, times a rope ``factor`` except for su, longrope,
  llama3 and the yarn types; also capped by the tokenizer's ``model_max_length``) is rejected unless
  VLLM_ALLOW_LONG_MAX_MODEL_LEN=1. ``vllm/v1/engine/input_processor.py`` (``_validate_prompt_len``)
  rejects a prompt as long as ``max_model_len`` ("plus the number of requested output tokens (at least
  1)"), so a prompt filling the context needs ``max_model_len = context + 1``: we set that variable while
  the engine starts and apply our own context rule (``kd_pipeline.cache.backends.check_seq_len``) instead.
- ``vllm/entrypoints/common/offline.py`` (``_run_engine``): ``use_tqdm`` may be a tqdm factory; its bar
  gets ``update(1)`` per finished request (and vLLM reads ``format_dict["elapsed"]``): our progress hook.
- ``vllm/v1/engine/core_client.py`` (``MPClient.shutdown``): stops the engine processes (SIGTERM, then a
  kill after 5 s); at interpreter exit the same runs from a finalizer, late, and ends in "force killing".
- ``vllm/v1/worker/cpu_worker.py``: on CPU ``gpu_memory_utilization`` x the node's RAM is what the worker
  reserves (weights, activations, KV cache) and must be free at start, else "Available memory on node 0
  ... is less than desired CPU memory utilization"; the 0.9 default fails on any machine in use.
- ``vllm/outputs.py``: ``RequestOutput`` has ``request_id``, ``prompt``, ``prompt_token_ids``,
  ``prompt_logprobs``, ``outputs``, ``finished`` and ``num_cached_tokens``.
  ``vllm/entrypoints/llm.py``: ``LLM.generate`` returns finished outputs sorted by their integer request
  id, i.e. in prompt order (we still check every output's ``prompt_token_ids`` against its row).
- Prefix caching skips computing cached prefix positions, which then get no prompt logprobs: we turn
  it off.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kd_pipeline.cache.backends import TeacherBackend, TeacherScores, register
from kd_pipeline.errors import ConfigError, MissingDependency, PipelineError

INSTALL_HINT = (
    "the vLLM backend needs the 'vllm' package: install the [vllm] extra on a CUDA machine "
    "(pip install 'kd-pipeline[vllm]'); on a machine without a GPU use the HF backend (--backend hf)"
)

# A FlatLogprobs holds ~4 Python objects per (position, candidate), ~80-90 bytes in all (the kept arrays
# 12); cap how many a single generate() call may return (2^24 entries ~ 1.4 GB as lists), so a large
# block is scored in chunks.
DEFAULT_MAX_ENTRIES_PER_CALL = 1 << 24


class VLLMNotInstalledError(MissingDependency):
    """vLLM is not importable here."""


def _numpy_copy(values: Any) -> np.ndarray:
    """A numpy copy of a CPU tensor (or array): with the engine in this process, the tensors may be views
    of a buffer it reuses."""
    to_numpy = getattr(values, "numpy", None)  # torch's __array__ does not take numpy 2's copy argument
    return np.array(to_numpy() if callable(to_numpy) else values)


class PromptLogprobArrays:
    """One request's prompt logprobs as vLLM's engine sends them: per prefill chunk, token ids and
    log-probs [chunk positions, k+1] (the actual token first, then ``torch.topk``'s sorted top-k), with no
    Python object per entry. Like vLLM's containers it counts prompt position 0 (which has no logprobs)."""

    __slots__ = ("token_id_chunks", "logprob_chunks")

    def __init__(self):
        self.token_id_chunks: list[np.ndarray] = []
        self.logprob_chunks: list[np.ndarray] = []

    def add(self, token_ids: Any, logprobs: Any) -> None:
        self.token_id_chunks.append(_numpy_copy(token_ids))
        self.logprob_chunks.append(_numpy_copy(logprobs))

    def __len__(self) -> int:
        return 1 + sum(len(chunk) for chunk in self.token_id_chunks)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, log-probs), each [positions after the first, k+1]."""
        if len(self.token_id_chunks) == 1:
            return self.token_id_chunks[0], self.logprob_chunks[0]
        return np.concatenate(self.token_id_chunks), np.concatenate(self.logprob_chunks)


@contextlib.contextmanager
def keep_prompt_logprob_arrays(processor_class: Any, k: int):
    """While in this block, ``processor_class._update_prompt_logprobs`` (vLLM's ``LogprobsProcessor``)
    stores the engine's prompt-logprob tensors in a :class:`PromptLogprobArrays` instead of building
    Python lists, for requests with ``prompt_logprobs == k`` and no detokenization (ours); every other
    request runs vLLM's own method. Yields whether the method was found (False: vLLM's lists, unchanged)."""
    original = getattr(processor_class, "_update_prompt_logprobs", None)
    if original is None:
        yield False
        return

    def update_prompt_logprobs(processor, tensors):
        if processor.num_prompt_logprobs != k or processor.tokenizer is not None:
            return original(processor, tensors)
        if not isinstance(processor.prompt_logprobs, PromptLogprobArrays):
            processor.prompt_logprobs = PromptLogprobArrays()  # replaces vLLM's empty container
        token_ids, logprobs = tensors[0], tensors[1]
        processor.prompt_logprobs.add(token_ids, logprobs)

    processor_class._update_prompt_logprobs = update_prompt_logprobs
    try:
        yield True
    finally:
        processor_class._update_prompt_logprobs = original


def _logprobs_processor_class() -> Any:
    try:
        from vllm.v1.engine.logprobs import LogprobsProcessor
    except ImportError:  # another vLLM layout: its lists are read instead
        return None
    return LogprobsProcessor


def _request_label(request_ids: Sequence[Any] | None, index: int) -> str:
    if request_ids is not None and index < len(request_ids):
        return f"request {index} ({request_ids[index]})"
    return f"request {index}"


def _is_flat(prompt_logprobs: Any) -> bool:
    return all(
        hasattr(prompt_logprobs, name) for name in ("start_indices", "end_indices", "token_ids", "logprobs", "ranks")
    )


def _flat_span(pl: Any, n_pos: int, width: int, label: str) -> tuple[int, int]:
    """Check one FlatLogprobs' block layout; return the [start, stop) of its entries in the flat lists."""
    if len(pl.start_indices) != n_pos + 1 or len(pl.end_indices) != n_pos + 1:
        raise ValueError(
            f"{label}: prompt_logprobs has {len(pl.start_indices)} positions ({len(pl.end_indices)} end "
            f"indices), expected one per prompt token ({n_pos + 1})"
        )
    starts = np.fromiter(pl.start_indices, np.int64, count=n_pos + 1)
    ends = np.fromiter(pl.end_indices, np.int64, count=n_pos + 1)
    if ends[0] != starts[0]:
        raise ValueError(f"{label}: prompt position 0 should be empty, it has {ends[0] - starts[0]} entries")
    sizes = ends[1:] - starts[1:]
    if not (sizes == width).all():
        i = int(np.flatnonzero(sizes != width)[0]) + 1
        raise ValueError(
            f"{label}, prompt position {i}: {sizes[i - 1]} logprob entries, expected k+1 = {width} "
            "(actual token + top-k; was SamplingParams.prompt_logprobs set to k?)"
        )
    base = int(starts[1]) if n_pos else 0
    if n_pos and not (starts[1:] == base + width * np.arange(n_pos)).all():
        raise ValueError(f"{label}: prompt logprob blocks are not contiguous in the flat lists")
    stop = base + n_pos * width
    for name in ("token_ids", "logprobs", "ranks"):
        if len(getattr(pl, name)) < stop:
            raise ValueError(f"{label}: FlatLogprobs.{name} has {len(getattr(pl, name))} entries, indices need {stop}")
    return base, stop


def _flat_column(pls: Sequence[Any], spans: Sequence[tuple[int, int]], name: str, dtype, labels: Sequence[str]):
    """One flat list of every request, converted in a single pass (no per-request arrays)."""
    parts = []
    for pl, (base, stop) in zip(pls, spans):
        values = getattr(pl, name)
        parts.append(values if base == 0 and len(values) == stop else values[base:stop])
    count = sum(stop - base for base, stop in spans)
    try:
        # fromiter over the chained lists is the fastest list -> array path measured (bench/bench_vllm_convert.py).
        return np.fromiter(itertools.chain.from_iterable(parts), dtype=dtype, count=count)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{labels[0]}..{labels[-1]}: FlatLogprobs.{name} is not numeric ({e})") from None


def _flat_requests(
    pls: Sequence[Any], targets: np.ndarray, k: int, labels: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FlatLogprobs of R requests → (topk_ids [R, L-1, k] int32, topk_lp [R, L-1, k] f32, target_lp [R, L-1]).

    Token ids and log-probs are converted; the ranks only validate, so only each request's first position
    is read (the converter relies on the layout, actual token then ranks 1..k, which those entries show).
    """
    r, n_pos = targets.shape
    width = k + 1
    spans = [_flat_span(pl, n_pos, width, label) for pl, label in zip(pls, labels)]
    ids = _flat_column(pls, spans, "token_ids", np.int32, labels).reshape(r, n_pos, width)
    lps = _flat_column(pls, spans, "logprobs", np.float32, labels).reshape(r, n_pos, width)
    bad = np.argwhere(ids[:, :, 0] != targets)
    if bad.size:
        j, i = (int(v) for v in bad[0])
        raise ValueError(
            f"{labels[j]}, prompt position {i + 1}: vLLM's actual token is {int(ids[j, i, 0])} but "
            f"input_ids[{i + 1}] is {int(targets[j, i])} (outputs out of order, or a different prompt?)"
        )
    expected_ranks = list(range(1, k + 1))
    for pl, (base, _), label in zip(pls, spans, labels):
        ranks = pl.ranks[base + 1 : base + width]
        if n_pos and ranks != expected_ranks:
            raise ValueError(f"{label}, prompt position 1: top-k ranks are {list(ranks)}, expected 1..{k}")
    return ids[:, :, 1:], lps[:, :, 1:], lps[:, :, 0]


def _array_request(
    pl: PromptLogprobArrays, targets: np.ndarray, k: int, label: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:class:`PromptLogprobArrays` of one request → same triple as :func:`_flat_requests`."""
    n_pos = targets.shape[0]
    ids, lps = pl.arrays()
    if ids.shape != (n_pos, k + 1) or lps.shape != ids.shape:
        raise ValueError(
            f"{label}: prompt logprob arrays of shapes {ids.shape} and {lps.shape}, expected "
            f"{(n_pos, k + 1)} (one row per prompt position after the first, actual token + top-k)"
        )
    bad = np.flatnonzero(ids[:, 0] != targets)
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{label}, prompt position {i + 1}: vLLM's actual token is {int(ids[i, 0])} but "
            f"input_ids[{i + 1}] is {int(targets[i])} (outputs out of order, or a different prompt?)"
        )
    return ids[:, 1:], lps[:, 1:], lps[:, 0]


def _dict_request(
    pl: Sequence[Any], targets: np.ndarray, k: int, label: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """list[dict[int, Logprob] | None] of one request → same triple as :func:`_flat_request`."""
    n_pos = targets.shape[0]
    if len(pl) != n_pos + 1:
        raise ValueError(
            f"{label}: prompt_logprobs has {len(pl)} positions, expected one per prompt token ({n_pos + 1})"
        )
    if pl[0]:
        raise ValueError(f"{label}: prompt position 0 should be empty (None or {{}}), it has {len(pl[0])} entries")
    ids = np.empty((n_pos, k), np.int64)
    lps = np.empty((n_pos, k), np.float32)
    target_lp = np.empty(n_pos, np.float32)
    expected_ranks = list(range(1, k + 1))
    for i in range(n_pos):
        position = pl[i + 1]
        actual = int(targets[i])
        if not position:
            raise ValueError(f"{label}, prompt position {i + 1}: no logprobs")
        entry = position.get(actual)
        if entry is None:
            raise ValueError(
                f"{label}, prompt position {i + 1}: input_ids[{i + 1}] = {actual} is not among vLLM's "
                f"entries {sorted(position)} (outputs out of order, or a different prompt?)"
            )
        ranked = sorted(
            (lp.rank, token, lp.logprob) for token, lp in position.items() if lp.rank is not None and lp.rank <= k
        )
        if [r for r, _, _ in ranked] != expected_ranks:
            raise ValueError(
                f"{label}, prompt position {i + 1}: ranks {[r for r, _, _ in ranked]} among the entries "
                f"ranked <= k, expected 1..{k}"
            )
        # The actual token adds a key only when it is outside the top-k.
        in_topk = entry.rank is not None and entry.rank <= k
        expected_len = k if in_topk else k + 1
        if len(position) != expected_len:
            raise ValueError(
                f"{label}, prompt position {i + 1}: {len(position)} entries, expected {expected_len} "
                f"(k = {k}, actual token {'inside' if in_topk else 'outside'} the top-k)"
            )
        ids[i] = [token for _, token, _ in ranked]
        lps[i] = [lp for _, _, lp in ranked]
        target_lp[i] = entry.logprob
    return ids, lps, target_lp


def prompt_logprobs_to_scores(
    prompt_logprobs_per_request: Sequence[Any],
    input_ids: np.ndarray,
    k: int,
    request_ids: Sequence[Any] | None = None,
) -> TeacherScores:
    """Convert vLLM prompt logprobs (one ``PromptLogprobs`` per row of ``input_ids``) to :class:`TeacherScores`.

    ``input_ids`` is [B, L]; request b must be the prompt ``input_ids[b]`` scored with
    ``SamplingParams(prompt_logprobs=k)``. Three forms are accepted: :class:`PromptLogprobArrays` (the
    engine's arrays, kept by :func:`keep_prompt_logprob_arrays`: sliced, no per-entry work), and vLLM's
    two, ``FlatLogprobs`` (its flat lists read in one pass per column for all requests) and
    ``list[dict[int, Logprob] | None]`` (sorted by rank). Raises ValueError naming the request and prompt
    position when the structure is not the one expected: entry 0 not empty, not L positions, not k+1
    entries per position, or an actual token that is not ``input_ids[b, t+1]``. (The dict form does not
    mark which entry is the actual token: a wrong ``input_ids`` token is caught when it is not among the
    entries or contradicts their count, but not when both it and the true token are in the top-k. The
    other two forms always catch it.)
    """
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, L], got shape {input_ids.shape}")
    b, length = input_ids.shape
    if length < 2:
        raise ValueError("sequences must have at least 2 tokens")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if len(prompt_logprobs_per_request) != b:
        raise ValueError(f"got prompt logprobs for {len(prompt_logprobs_per_request)} requests, expected {b}")
    topk_ids = np.empty((b, length - 1, k), np.int32)
    topk_lp = np.empty((b, length - 1, k), np.float32)
    target_lp = np.empty((b, length - 1), np.float32)
    labels = [_request_label(request_ids, r) for r in range(b)]
    targets = input_ids[:, 1:].astype(np.int64)
    for r, pl in enumerate(prompt_logprobs_per_request):
        if pl is None:
            raise ValueError(
                f"{labels[r]}: no prompt_logprobs (SamplingParams.prompt_logprobs unset, or prefix caching on?)"
            )
    if all(_is_flat(pl) for pl in prompt_logprobs_per_request):  # what vLLM returns: one pass over all
        topk_ids[:], topk_lp[:], target_lp[:] = _flat_requests(prompt_logprobs_per_request, targets, k, labels)
        return TeacherScores(topk_ids=topk_ids, topk_logprobs=topk_lp, target_logprob=target_lp)
    for r, pl in enumerate(prompt_logprobs_per_request):
        if isinstance(pl, PromptLogprobArrays):
            ids, lps, tgt = _array_request(pl, targets[r], k, labels[r])
        elif _is_flat(pl):
            ids, lps, tgt = (a[0] for a in _flat_requests([pl], targets[r : r + 1], k, labels[r : r + 1]))
        else:
            ids, lps, tgt = _dict_request(pl, targets[r], k, labels[r])
        topk_ids[r], topk_lp[r], target_lp[r] = ids, lps, tgt
    return TeacherScores(topk_ids=topk_ids, topk_logprobs=topk_lp, target_logprob=target_lp)


def import_vllm():
    """Import vLLM or raise :class:`VLLMNotInstalledError` with the install hint."""
    try:
        import vllm
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
    except ImportError as e:
        raise VLLMNotInstalledError(f"{INSTALL_HINT} ({e})") from e
    return vllm, LLM, SamplingParams, TokensPrompt


def _vocab_size(llm: Any) -> int | None:
    try:
        return int(llm.llm_engine.model_config.get_vocab_size())
    except Exception:  # attribute layout differs across vLLM versions; the check is best effort
        return None


# LLM arguments this backend sets itself: the cache is only right with these values, or they have options.
_OWN_ARGS = {
    "model": "--teacher",
    "revision": "--revision",
    "trust_remote_code": "--trust-remote-code",
    "dtype": "--dtype",
    "tensor_parallel_size": "--tensor-parallel-size",
    "pipeline_parallel_size": "--pipeline-parallel-size",
    "gpu_memory_utilization": "--gpu-memory-utilization",
    "enforce_eager": "--enforce-eager",
    "max_num_seqs": "--max-num-seqs",
    "max_num_batched_tokens": "--max-num-batched-tokens",
    "max_model_len": "--seq-len",
    "max_logprobs": "--top-k",
    "logprobs_mode": None,
    "enable_prefix_caching": None,
}

# On CPU vLLM's worker reserves gpu_memory_utilization x the node's RAM (its weights, activations, and the
# rest as KV cache, allocated and touched at start) and refuses to start when that is more than is free:
# its 0.9 default fails on any machine in use. We ask for the teacher's weights (twice the files: bf16
# checkpoints run in float32 on CPU) plus CPU_KV_HEADROOM, at most half the free RAM.
CPU_FREE_RAM_SHARE = 0.5
CPU_KV_HEADROOM = 2 << 30


def parse_vllm_args(items: Sequence[str]) -> dict:
    """``["KEY=VALUE", ...]`` → kwargs for ``vllm.LLM``; VALUE is read as JSON when it parses (numbers, true,
    {"a": 1}), else kept as a string."""
    import json

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise ConfigError(f"--vllm-arg {item!r}: expected KEY=VALUE, e.g. --vllm-arg kv_cache_dtype=fp8")
        if key in _OWN_ARGS:
            own = _OWN_ARGS[key]
            raise ConfigError(
                f"--vllm-arg {key}: set by cache-teacher itself"
                + (f"; use {own}" if own else " (the cache is only right with its value)")
            )
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _ram_available_and_total() -> tuple[int, int]:
    """Bytes of RAM available (as the kernel estimates it, page cache counted free) and in total."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        return int(fields["MemAvailable"].split()[0]) * 1024, int(fields["MemTotal"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):  # not Linux
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page


def _weight_bytes(model: str) -> int | None:
    files = (
        [p for p in Path(model).glob("*") if p.suffix in (".safetensors", ".bin", ".pt")]
        if Path(model).is_dir()
        else []
    )
    return sum(p.stat().st_size for p in files) or None


def default_gpu_memory_utilization(on_cuda: bool, model: str | None = None) -> float:
    """vLLM's own 0.9 on a GPU. On CPU the share of RAM that holds the teacher plus a modest KV cache
    (see CPU_KV_HEADROOM), at most half the RAM free now; half the free RAM when the weights are not local."""
    if on_cuda:
        return 0.9
    available, total = _ram_available_and_total()
    wanted = CPU_FREE_RAM_SHARE * available
    weights = _weight_bytes(model) if model else None
    if weights is not None:
        wanted = min(wanted, 2 * weights + CPU_KV_HEADROOM)
    return round(max(0.01, wanted / total), 3)


class EngineStartError(PipelineError, ValueError):
    """vLLM's engine did not start, or died on its first work; the message gives vLLM's root cause and the
    option to change."""


# vLLM's own messages that only point at the real error elsewhere in the log.
_WRAPPERS = ("Engine core initialization failed", "stack trace above", "See stack trace", "encountered an issue")


# Root-cause patterns → the option that usually fixes them.
_START_HINTS = (
    (
        ("memory", "kv cache", "cache blocks", "out of memory", "oom"),
        "change --gpu-memory-utilization{now} (on CPU the share of the node's RAM that vLLM reserves;"
        " VLLM_CPU_KVCACHE_SPACE=GiB sets its KV cache directly), or lower --max-num-seqs,"
        " --max-num-batched-tokens or --seq-len",
    ),
    (("max_model_len", "max_position_embeddings", "context length"), "use a smaller --seq-len"),
    (
        ("tensor parallel", "tensor_parallel", "world size", "world_size", "pipeline parallel", "number of gpus"),
        "check --tensor-parallel-size / --pipeline-parallel-size against the devices you have",
    ),
    (("dtype", "bfloat16", "float16"), "choose another --dtype"),
    (("trust_remote_code", "remote code"), "pass --trust-remote-code if you trust the model's code"),
)


def _root_cause(log_lines: Sequence[str]) -> str | None:
    """The last 'SomeError: message' line of the engine's log, other than vLLM's generic wrapper."""
    import re

    pattern = re.compile(r"\b([A-Za-z_][\w.]*(?:Error|Exception)): (.+)$")
    for line in reversed(log_lines):
        found = pattern.search(line.rstrip())
        if found and not any(wrapper in found.group(2) for wrapper in _WRAPPERS):
            return f"{found.group(1).rsplit('.', 1)[-1]}: {found.group(2).strip()}"
    return None


def explain_start_failure(
    error: BaseException, log_lines: Sequence[str], gpu_memory_utilization: float, what: str = "did not start"
) -> str:
    """One short message for an engine that did not start (or died): vLLM's root cause and what to change."""
    text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    # The engine runs in other processes: their exception reaches us only as a generic error whose cause
    # is in the log they printed; errors raised here (config validation) carry it in their text.
    cause = _root_cause(log_lines) if any(wrapper in text for wrapper in _WRAPPERS) else None
    if cause is None:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        cause = next((line for line in lines if "Value error" in line or "Error" in line), first)
        cause = cause.removeprefix("Value error, ")
    low = cause.lower()
    hint = next(
        (h for keys, h in _START_HINTS if any(key in low for key in keys)),
        "see vLLM's log above; --vllm-arg KEY=VALUE passes any other engine setting",
    )
    return f"the vLLM engine {what}: {cause}\n  what to change: " + hint.format(now=f" (now {gpu_memory_utilization})")


class _OutputTee:
    """Copy file descriptors 1 and 2 (ours and those of the engine processes spawned meanwhile) to where they
    went and keep their last lines: vLLM reports an engine's failure to start only in its log, which its
    processes write to stdout (vLLM's default log handler) and stderr (tracebacks)."""

    def __init__(self, keep: int = 2000, fds: tuple[int, ...] = (1, 2)):
        import collections

        self.lines = collections.deque(maxlen=keep)
        self.fds = fds
        self._saved: dict[int, int] = {}
        self._threads = []

    def __enter__(self):
        import threading

        sys.stdout.flush()
        sys.stderr.flush()
        for fd in self.fds:
            read_end, write_end = os.pipe()
            self._saved[fd] = os.dup(fd)
            os.dup2(write_end, fd)
            os.close(write_end)
            thread = threading.Thread(target=self._pump, args=(read_end, self._saved[fd]), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _pump(self, read_end: int, terminal: int) -> None:
        # Runs until every process holding the pipe (the engine's included) has exited or closed it.
        pending = b""
        with os.fdopen(read_end, "rb", buffering=0) as source:
            while chunk := source.read(65536):
                try:
                    os.write(terminal, chunk)
                except OSError:
                    pass
                pending += chunk
                *done, pending = pending.split(b"\n")
                self.lines.extend(line.decode(errors="replace") for line in done)
        if pending:
            self.lines.append(pending.decode(errors="replace"))
        os.close(terminal)

    def __exit__(self, *exc):
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)  # ours go where they went again; the engine keeps the pipes
        return False

    def recent(self, wait: float = 5.0) -> list[str]:
        """The kept lines, after giving a failed engine a moment to finish its traceback."""
        for thread in self._threads:
            thread.join(timeout=wait / len(self._threads))
        return list(self.lines)


@contextlib.contextmanager
def _environment(**values: str):
    """Set environment variables for the duration (the engine processes spawned meanwhile inherit them)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _gpu_memory_utilization(given: float | None, model: str) -> float:
    """``--gpu-memory-utilization`` as given, or for None the default for where the engine runs (said on stderr)."""
    if given is not None:
        return float(given)
    import torch

    share = default_gpu_memory_utilization(torch.cuda.is_available(), model)
    print(f"vLLM: gpu_memory_utilization {share} (auto)", file=sys.stderr, flush=True)
    return share


@register
class VLLMTeacher(TeacherBackend):
    """Teacher backed by a vLLM ``LLM`` engine (a :class:`kd_pipeline.cache.backends.TeacherBackend`).

    Each sequence is one prompt scored with ``prompt_logprobs=k`` and ``max_tokens=1``; vLLM batches and
    schedules the prompts itself. vLLM wants room for the generated token (``max_model_len = seq_len + 1``)
    although that token is never run through the model: an L-token prompt's logprobs need only L
    positions. So ``seq_len`` may equal the teacher's context, and the caller checks that it does not
    exceed it (``kd_pipeline.cache.backends.check_seq_len``; cache-teacher does, for both backends), while vLLM's
    own check, which would count the extra token, is told to allow it. Call :meth:`close` (or use it as a
    context manager) to shut the engine's processes down.
    """

    name = "vllm"
    priority = 10  # the faster engine, where it can run

    @classmethod
    def available(cls) -> bool:
        import importlib.util

        import torch

        return torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None

    @classmethod
    def refusal(cls, config) -> str | None:
        if config.support != "topk":  # vLLM returns the top-k log-probs, never the full softmax
            return f"--support {config.support} needs the full softmax: use --backend hf"
        return None

    @classmethod
    def identity(cls, config) -> dict:
        # --vllm-arg may change the numbers (quantization, kv_cache_dtype, ...): part of the cache identity.
        return {"vllm_args": parse_vllm_args(config.vllm_args)} if config.vllm_args else {}

    @classmethod
    def from_config(cls, config) -> VLLMTeacher:
        return cls(
            config.teacher,
            k=config.top_k,
            seq_len=config.seq_len,
            tensor_parallel_size=config.tensor_parallel_size,
            pipeline_parallel_size=config.pipeline_parallel_size,
            dtype=cls.teacher_dtype(config),
            gpu_memory_utilization=config.gpu_memory_utilization,
            enforce_eager=config.enforce_eager,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            revision=config.revision,
            trust_remote_code=config.trust_remote_code,
            llm_kwargs=parse_vllm_args(config.vllm_args),
        )

    def __init__(
        self,
        model: str,
        k: int,
        seq_len: int,
        tensor_parallel_size: int = 1,
        dtype: str = "bfloat16",
        gpu_memory_utilization: float | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
        seed: int = 0,
        max_entries_per_call: int = DEFAULT_MAX_ENTRIES_PER_CALL,
        llm_kwargs: dict | None = None,
        pipeline_parallel_size: int = 1,
        enforce_eager: bool = False,
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int | None = None,
    ):
        if int(k) != k or k < 1:
            raise ConfigError(f"k must be a positive integer, got {k!r}")
        if int(seq_len) != seq_len or seq_len < 2:
            raise ConfigError(f"seq_len must be an integer >= 2, got {seq_len!r}")
        vllm, LLM, SamplingParams, TokensPrompt = import_vllm()
        self.llm = None
        self._vllm_version = str(getattr(vllm, "__version__", "unknown"))
        self._tokens_prompt = TokensPrompt
        self._logprobs_processor = _logprobs_processor_class()
        self.name = str(model)
        self.k = int(k)
        self.seq_len = int(seq_len)
        self.dtype = dtype
        self.revision = revision
        self.max_entries_per_call = int(max_entries_per_call)
        extra = dict(llm_kwargs or {})
        clash = sorted(set(extra) & set(_OWN_ARGS))
        if clash:
            raise ConfigError(f"llm_kwargs may not set {clash}: this backend sets them")
        # What the manifest records about the engine (none of it changes the numbers but llm_kwargs): the
        # options as given, so that reruns write the same bytes ("auto" depends on the RAM free at start).
        self.engine = {
            "tensor_parallel_size": int(tensor_parallel_size),
            "pipeline_parallel_size": int(pipeline_parallel_size),
            "gpu_memory_utilization": "auto" if gpu_memory_utilization is None else float(gpu_memory_utilization),
            "enforce_eager": bool(enforce_eager),
            "max_num_seqs": max_num_seqs,
            "max_num_batched_tokens": max_num_batched_tokens,
            "llm_kwargs": extra,
        }
        self.gpu_memory_utilization = _gpu_memory_utilization(gpu_memory_utilization, self.name)
        self._start(LLM, self._llm_args(revision, trust_remote_code, seed))
        # One generated token per prompt (the prompt logprobs are what we want); no detokenization.
        self.sampling_params = SamplingParams(
            max_tokens=1,
            prompt_logprobs=self.k,
            flat_logprobs=True,
            detokenize=False,
        )

    def _llm_args(self, revision: str | None, trust_remote_code: bool, seed: int) -> dict:
        """``vllm.LLM``'s arguments: the engine settings of ``self.engine`` and the ones the cache is only right with."""
        engine = self.engine
        kwargs = dict(
            model=self.name,
            revision=revision,
            trust_remote_code=trust_remote_code,
            dtype=self.dtype,
            tensor_parallel_size=engine["tensor_parallel_size"],
            pipeline_parallel_size=engine["pipeline_parallel_size"],
            enforce_eager=engine["enforce_eager"],
            seed=seed,
            # vLLM rejects requests asking for more logprobs than this (default 20).
            max_logprobs=self.k,
            # Prompt logprobs are a float32 log-softmax of the raw logits in any mode; this makes the
            # (unused) sample logprobs the same kind of number.
            logprobs_mode="raw_logprobs",
            max_model_len=self.seq_len + 1,
            # Cached prefix positions are not recomputed and would get no prompt logprobs.
            enable_prefix_caching=False,
            gpu_memory_utilization=self.gpu_memory_utilization,
        )
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            if engine[name] is not None:
                kwargs[name] = int(engine[name])
        kwargs.update(engine["llm_kwargs"])
        return kwargs

    def _start(self, LLM, kwargs: dict) -> None:
        """Start the engine (a failure becomes one :class:`EngineStartError` with vLLM's root cause) and check
        ``k`` against the teacher's vocabulary."""
        self._log = _OutputTee()
        try:
            with self._log, _environment(VLLM_ALLOW_LONG_MAX_MODEL_LEN="1"):
                self.llm = LLM(**kwargs)
        except Exception as e:  # config validation (ValueError, pydantic) or the engine process dying
            raise EngineStartError(explain_start_failure(e, self._log.recent(), self.gpu_memory_utilization)) from e
        vocab = _vocab_size(self.llm)
        if vocab is not None and self.k > vocab:
            self.close()
            raise ConfigError(f"k = {self.k} exceeds the teacher's vocabulary size {vocab}")

    def describe(self) -> dict:
        return {
            "teacher": {"name_or_path": self.name, "revision": self.revision, "dtype": self.dtype},
            "backend": {"name": "vllm", "version": self._vllm_version, **self.engine},
        }

    def close(self) -> None:
        """Shut the engine's processes down now (vLLM otherwise force-kills them at interpreter exit)."""
        llm, self.llm = self.llm, None
        if llm is None:
            return
        engine = getattr(llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        shutdown = getattr(core, "shutdown", None)
        if callable(shutdown):
            # The engine process waits up to VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS (5) for its workers; vLLM's
            # default 5 s for the engine itself then ends in "force killing". Give it the time to exit.
            shutdown(timeout=60)
        del llm, engine, core
        import gc

        gc.collect()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def _sequences_per_call(self, length: int) -> int:
        return max(1, self.max_entries_per_call // max(1, (length - 1) * (self.k + 1)))

    def score(
        self, input_ids: np.ndarray, progress: Callable[[int], None] | None = None, first_seq_id: int = 0
    ) -> TeacherScores:
        """Score ``input_ids`` [B, L] (L <= seq_len); returns scores in input order. ``progress(n)`` is
        called as vLLM finishes requests (n of them at a time)."""
        if self.llm is None:
            raise RuntimeError("this VLLMTeacher is closed")
        input_ids = np.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, L], got shape {input_ids.shape}")
        b, length = input_ids.shape
        if length > self.seq_len:
            raise ValueError(f"sequences of {length} tokens exceed this teacher's seq_len {self.seq_len}")
        if length < 2:
            raise ValueError("sequences must have at least 2 tokens")
        k = self.k
        topk_ids = np.empty((b, length - 1, k), np.int32)
        topk_lp = np.empty((b, length - 1, k), np.float32)
        target_lp = np.empty((b, length - 1), np.float32)
        step = self._sequences_per_call(length)
        counter = _request_counter(progress) if progress is not None else False
        for start in range(0, b, step):
            stop = min(b, start + step)
            rows = input_ids[start:stop]
            prompts = [self._tokens_prompt(prompt_token_ids=row.tolist()) for row in rows]
            try:
                with keep_prompt_logprob_arrays(self._logprobs_processor, k):
                    outputs = self.llm.generate(prompts, self.sampling_params, use_tqdm=counter)
            except Exception as e:
                if type(e).__name__ != "EngineDeadError":
                    raise
                # e.g. a kernel the CPU build lacks for this model's shapes: say which, not a traceback
                raise EngineStartError(
                    explain_start_failure(e, self._log.recent(), self.gpu_memory_utilization, "died")
                ) from e
            if len(outputs) != len(prompts):
                raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
            for j, out in enumerate(outputs):
                got = out.prompt_token_ids
                if got is None or len(got) != length or not np.array_equal(np.asarray(got), rows[j]):
                    raise RuntimeError(
                        f"vLLM output {j} (request id {out.request_id!r}) is not the prompt of row "
                        f"{start + j}: outputs are not in input order"
                    )
            scores = prompt_logprobs_to_scores(
                [out.prompt_logprobs for out in outputs],
                rows,
                k,
                request_ids=[f"row {start + j}, vLLM request id {out.request_id}" for j, out in enumerate(outputs)],
            )
            del outputs
            topk_ids[start:stop] = scores.topk_ids
            topk_lp[start:stop] = scores.topk_logprobs
            target_lp[start:stop] = scores.target_logprob
        return TeacherScores(topk_ids=topk_ids, topk_logprobs=topk_lp, target_logprob=target_lp)


def _request_counter(progress: Callable[[int], None]):
    """A tqdm factory for ``LLM.generate(use_tqdm=...)`` that reports finished requests to ``progress``
    and draws nothing (vLLM reads its rate fields, so it stays a real tqdm, writing to nowhere)."""
    import functools
    import io

    from tqdm import tqdm

    class RequestCounter(tqdm):
        def update(self, n=1):
            progress(int(n))
            return super().update(n)

    return functools.partial(RequestCounter, file=io.StringIO(), mininterval=3600)
