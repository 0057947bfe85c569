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
- ``vllm/v1/engine/logprobs.py`` (``LogprobsProcessor``): the prompt container is made with
  ``create_prompt_logprobs(sampling_params.flat_logprobs)``; prompt logprobs arrive as three arrays,
  token ids and logprobs of shape [num_prompt_tokens - 1, num_logprobs + 1] plus the actual tokens'
  ranks [num_prompt_tokens - 1], and each row is appended as one position. An early V1 version of the
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
- ``vllm/config`` (ModelConfig): a ``max_model_len`` above the length derived from the model's config is
  rejected ("User-specified max_model_len (X) is greater than the derived max_model_len ...") unless
  VLLM_ALLOW_LONG_MAX_MODEL_LEN=1; we translate that into a clear error about ``seq_len``.
- ``vllm/outputs.py``: ``RequestOutput`` has ``request_id``, ``prompt``, ``prompt_token_ids``,
  ``prompt_logprobs``, ``outputs``, ``finished`` and ``num_cached_tokens``.
  ``vllm/entrypoints/llm.py``: ``LLM.generate`` returns finished outputs sorted by their integer request
  id, i.e. in prompt order (we still check every output's ``prompt_token_ids`` against its row).
- Prefix caching skips computing cached prefix positions, which then get no prompt logprobs: we turn
  it off.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from cache.teacher import TeacherScores

INSTALL_HINT = (
    "the vLLM backend needs the 'vllm' package: install the [vllm] extra on a CUDA machine "
    "(pip install 'kd-pipeline[vllm]'); on a machine without a GPU use the HF backend (--backend hf)"
)

# A FlatLogprobs holds ~4 Python objects per (position, candidate), ~80-90 bytes in all; cap how many a
# single generate() call may return (2^24 entries ~ 1.4 GB), so a large block is scored in chunks.
DEFAULT_MAX_ENTRIES_PER_CALL = 1 << 24


class VLLMNotInstalledError(ImportError):
    """vLLM is not importable here."""


def _request_label(request_ids: Sequence[Any] | None, index: int) -> str:
    if request_ids is not None and index < len(request_ids):
        return f"request {index} ({request_ids[index]})"
    return f"request {index}"


def _is_flat(prompt_logprobs: Any) -> bool:
    return all(
        hasattr(prompt_logprobs, name) for name in ("start_indices", "end_indices", "token_ids", "logprobs", "ranks")
    )


def _flat_request(
    pl: Any, targets: np.ndarray, k: int, label: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FlatLogprobs of one request → (topk_ids [L-1, k] int64, topk_lp [L-1, k] f32, target_lp [L-1])."""
    n_pos = targets.shape[0]  # L - 1
    width = k + 1
    starts = np.asarray(pl.start_indices, dtype=np.int64)
    ends = np.asarray(pl.end_indices, dtype=np.int64)
    if starts.shape != ends.shape or starts.shape[0] != n_pos + 1:
        raise ValueError(
            f"{label}: prompt_logprobs has {starts.shape[0]} positions ({ends.shape[0]} end indices), "
            f"expected one per prompt token ({n_pos + 1})"
        )
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

    def column(values: list, dtype, name: str) -> np.ndarray:
        if len(values) < stop:
            raise ValueError(f"{label}: FlatLogprobs.{name} has {len(values)} entries, indices need {stop}")
        part = values if (base == 0 and len(values) == stop) else values[base:stop]
        try:
            # fromiter is ~3x faster than asarray for a list of Python ints; asarray is as fast for floats.
            if dtype == np.int64:
                flat = np.fromiter(part, dtype=np.int64, count=n_pos * width)
            else:
                flat = np.asarray(part, dtype=dtype)
            return flat.reshape(n_pos, width)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{label}: FlatLogprobs.{name} is not numeric ({e})") from None

    ids = column(pl.token_ids, np.int64, "token_ids")
    lps = column(pl.logprobs, np.float32, "logprobs")
    ranks = column(pl.ranks, np.int64, "ranks")

    bad = np.flatnonzero(ids[:, 0] != targets)
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{label}, prompt position {i + 1}: vLLM's actual token is {int(ids[i, 0])} but "
            f"input_ids[{i + 1}] is {int(targets[i])} (outputs out of order, or a different prompt?)"
        )
    expected_ranks = np.arange(1, k + 1, dtype=np.int64)
    bad = np.flatnonzero((ranks[:, 1:] != expected_ranks).any(axis=1))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{label}, prompt position {i + 1}: top-k ranks are {ranks[i, 1:].tolist()}, expected 1..{k}"
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
    ``SamplingParams(prompt_logprobs=k)``. Both vLLM forms are accepted: ``FlatLogprobs`` (read with numpy
    reshapes of its flat lists, no per-token objects) and ``list[dict[int, Logprob] | None]`` (sorted by
    rank). Raises ValueError naming the request and prompt position when the structure is not the one
    expected: entry 0 not empty, not L positions, not k+1 entries per position, or an actual token that
    is not ``input_ids[b, t+1]``. (The dict form does not mark which entry is the actual token: a wrong
    ``input_ids`` token is caught when it is not among the entries or contradicts their count, but not
    when both it and the true token are in the top-k. The flat form always catches it.)
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
    for r, pl in enumerate(prompt_logprobs_per_request):
        label = _request_label(request_ids, r)
        targets = input_ids[r, 1:].astype(np.int64)
        if pl is None:
            raise ValueError(
                f"{label}: no prompt_logprobs (SamplingParams.prompt_logprobs unset, or prefix caching on?)"
            )
        if _is_flat(pl):
            ids, lps, tgt = _flat_request(pl, targets, k, label)
        else:
            ids, lps, tgt = _dict_request(pl, targets, k, label)
        topk_ids[r] = ids
        topk_lp[r] = lps
        target_lp[r] = tgt
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


class VLLMTeacher:
    """Teacher backed by a vLLM ``LLM`` engine (CUDA only); implements :class:`cache.teacher.TeacherBackend`.

    Each sequence is one prompt scored with ``prompt_logprobs=k`` and ``max_tokens=1``; vLLM batches and
    schedules the prompts itself. The engine holds up to ``seq_len + 1`` tokens per request (the prompt
    plus the one generated token).
    """

    def __init__(
        self,
        model: str,
        k: int,
        seq_len: int,
        tensor_parallel_size: int = 1,
        dtype: str = "bfloat16",
        gpu_memory_utilization: float = 0.9,
        revision: str | None = None,
        trust_remote_code: bool = False,
        seed: int = 0,
        max_entries_per_call: int = DEFAULT_MAX_ENTRIES_PER_CALL,
        llm_kwargs: dict | None = None,
    ):
        if int(k) != k or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if int(seq_len) != seq_len or seq_len < 2:
            raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
        vllm, LLM, SamplingParams, TokensPrompt = import_vllm()
        self._vllm_version = str(getattr(vllm, "__version__", "unknown"))
        self._tokens_prompt = TokensPrompt
        self.name = str(model)
        self.k = int(k)
        self.seq_len = int(seq_len)
        self.tensor_parallel_size = int(tensor_parallel_size)
        self.dtype = dtype
        self.revision = revision
        self.max_entries_per_call = int(max_entries_per_call)
        kwargs = dict(
            model=self.name,
            revision=revision,
            trust_remote_code=trust_remote_code,
            dtype=dtype,
            tensor_parallel_size=self.tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            seed=seed,
            # vLLM rejects requests asking for more logprobs than this (default 20).
            max_logprobs=self.k,
            # Prompt logprobs are a float32 log-softmax of the raw logits in any mode; this makes the
            # (unused) sample logprobs the same kind of number.
            logprobs_mode="raw_logprobs",
            max_model_len=self.seq_len + 1,
            # Cached prefix positions are not recomputed and would get no prompt logprobs.
            enable_prefix_caching=False,
        )
        kwargs.update(llm_kwargs or {})
        try:
            self.llm = LLM(**kwargs)
        except Exception as e:  # vLLM raises pydantic ValidationError / ValueError from its config
            text = str(e)
            if "max_model_len" in text and ("greater than" in text or "exceeds" in text):
                raise ValueError(
                    f"seq_len + 1 = {self.seq_len + 1} tokens exceeds the context length of teacher "
                    f"{self.name!r}; use a smaller --seq-len (vLLM said: {text.splitlines()[0]})"
                ) from e
            raise
        vocab = _vocab_size(self.llm)
        if vocab is not None and self.k > vocab:
            raise ValueError(f"k = {self.k} exceeds the teacher's vocabulary size {vocab}")
        # One generated token per prompt (the prompt logprobs are what we want); no detokenization.
        self.sampling_params = SamplingParams(
            max_tokens=1,
            prompt_logprobs=self.k,
            flat_logprobs=True,
            detokenize=False,
        )

    def describe(self) -> dict:
        return {
            "teacher": {"name_or_path": self.name, "revision": self.revision, "dtype": self.dtype},
            "backend": {
                "name": "vllm",
                "version": self._vllm_version,
                "tensor_parallel_size": self.tensor_parallel_size,
            },
        }

    def _sequences_per_call(self, length: int) -> int:
        return max(1, self.max_entries_per_call // max(1, (length - 1) * (self.k + 1)))

    def score(
        self, input_ids: np.ndarray, progress: Callable[[int], None] | None = None, first_seq_id: int = 0
    ) -> TeacherScores:
        """Score ``input_ids`` [B, L] (L <= seq_len); returns scores in input order."""
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
        for start in range(0, b, step):
            stop = min(b, start + step)
            rows = input_ids[start:stop]
            prompts = [self._tokens_prompt(prompt_token_ids=row.tolist()) for row in rows]
            outputs = self.llm.generate(prompts, self.sampling_params, use_tqdm=False)
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
            if progress is not None:
                progress(stop - start)
        return TeacherScores(topk_ids=topk_ids, topk_logprobs=topk_lp, target_logprob=target_lp)
