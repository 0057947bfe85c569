"""Teacher backends: turn token sequences into the teacher's top-k next-token log-probabilities.

Every backend implements :class:`TeacherBackend`; the cache writer never knows which one it drives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np


@dataclass
class TeacherScores:
    """Teacher output for ``B`` sequences of ``L`` tokens (see cache/format.py for the alignment).

    topk_ids [B, L-1, k] int32, sorted by descending log-probability;
    topk_logprobs [B, L-1, k] float32, log-softmax over the full vocabulary at temperature 1;
    target_logprob [B, L-1] float32, log-probability of input_ids[:, 1:].
    """

    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    target_logprob: np.ndarray


def invalid_rows(topk_logprobs: np.ndarray, target_logprob: np.ndarray, sampled: bool = False) -> np.ndarray:
    """Indices of the sequences (rows of topk_logprobs [B, L-1, k], target_logprob [B, L-1]) holding values
    no teacher may give: NaN, +inf, or -inf, which only a sampled support's zero-weight pads may hold (see
    :func:`sample_support`). One rule for the writer, which refuses to commit such a block, and for verify."""
    support = np.asarray(topk_logprobs)
    target = np.asarray(target_logprob)
    bad = np.isnan(support) | (support == np.inf) if sampled else ~np.isfinite(support)
    rows = bad.reshape(len(support), -1).any(1) | ~np.isfinite(target).reshape(len(target), -1).any(1)
    return np.flatnonzero(rows)


def id_list(ids, show: int = 8) -> str:
    """``3, 4, 9 and 12 more``: sequence ids for a message."""
    ids = [int(i) for i in ids]
    more = f" and {len(ids) - show} more" if len(ids) > show else ""
    return ", ".join(map(str, ids[:show])) + more


class TeacherBackend(Protocol):
    k: int

    def describe(self) -> dict:
        """Teacher identity and backend facts for the manifest: {"teacher": {...}, "backend": {...}}."""
        ...

    def close(self) -> None:
        """Release the model (and any processes it runs in); the backend is unusable afterwards."""
        ...

    def score(
        self, input_ids: np.ndarray, progress: Callable[[int], None] | None = None, first_seq_id: int = 0
    ) -> TeacherScores:
        """Score ``input_ids`` [B, L] int32 (stream positions ``first_seq_id``...); call ``progress(n)``
        after each n sequences are done. ``first_seq_id`` seeds sampled supports, so a resumed run draws
        the same samples."""
        ...


# Config keys that bound a model's positions, as vLLM 0.32 reads them (vllm/config/model.py: the derived
# max_model_len is the smallest of those present, times the rope scaling factor for the rope types that do
# not already count it in max_position_embeddings).
CONTEXT_KEYS = (
    "max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length",
    "max_seq_length", "seq_len",
)  # fmt: skip
_UNSTRETCHED_ROPE = ("default", "su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling")


def context_length(config) -> tuple[int, str] | None:
    """(positions the model was built for, how that was found) from a transformers config, or None."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    found = [(v, key) for key in CONTEXT_KEYS if isinstance(v := getattr(text, key, None), int) and v > 0]
    if not found:
        return None
    length, key = min(found)
    rope = getattr(text, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
    factor = rope.get("factor") if isinstance(rope, dict) else None
    if kind not in _UNSTRETCHED_ROPE and isinstance(factor, (int, float)) and factor > 1:
        return int(length * factor), f"{key} = {length} x rope factor {factor}"
    return length, f"{key} = {length}"


def check_seq_len(seq_len: int, config, teacher: str) -> None:
    """One rule for every backend: a sequence may fill the teacher's context, never exceed it."""
    found = context_length(config)
    if found is not None and seq_len > found[0]:
        raise ValueError(
            f"--seq-len {seq_len} is longer than the context of teacher {teacher} ({found[1]}): "
            f"use --seq-len {found[0]} or less"
        )


def sample_support(
    logprobs: "torch.Tensor", k: int, num_samples: int, temperature: float, generator: "torch.Generator"
) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Importance-sampled support (RS-KD, Anshumann et al. 2025, arXiv 2503.16870).

    Draw ``num_samples`` tokens per position from the proposal ``r ∝ p^temperature``, weight each draw by
    ``p/r`` and keep the unique ids with self-normalized weights. At temperature 1 every weight is 1
    and the estimate is the draw frequency, an exactly unbiased estimate of p (so the sparse forward-KL
    gradient is unbiased for the dense one); at other temperatures self-normalization makes it
    consistent, with a bias of order 1/num_samples.

    logprobs [M, V] fp32 (full-vocabulary log-softmax) → (ids [M, k] int64, log weights [M, k] fp32),
    sorted by weight. Positions with fewer than k distinct draws are padded with distinct unsampled ids of
    weight 0 (log weight -inf); with more, the k heaviest are kept and the rest becomes tail mass.
    """
    import torch

    log_r = torch.log_softmax(logprobs * temperature, dim=-1) if temperature != 1.0 else logprobs
    draws = torch.multinomial(log_r.exp(), num_samples, replacement=True, generator=generator)
    weights = (logprobs.gather(-1, draws) - log_r.gather(-1, draws)).exp()
    totals = torch.zeros_like(logprobs).scatter_add_(-1, draws, weights)
    totals /= totals.sum(-1, keepdim=True)
    values, ids = torch.topk(totals, k, dim=-1, sorted=True)
    return ids, values.log()
