"""Teacher backends: turn token sequences into the teacher's top-k next-token log-probabilities.

Every backend implements :class:`TeacherBackend`; the cache writer never knows which one it drives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from kd_pipeline.errors import ConfigError


@dataclass
class TeacherScores:
    """Teacher output for ``B`` sequences of ``L`` tokens (see cache/format/rows.py for the alignment).

    topk_ids [B, L-1, k] int32, sorted by descending log-probability;
    topk_logprobs [B, L-1, k] float32, log-softmax over the full vocabulary at temperature 1;
    target_logprob [B, L-1] float32, log-probability of input_ids[:, 1:].
    """

    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    target_logprob: np.ndarray


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
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "max_sequence_length",
    "max_seq_length",
    "seq_len",
)
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
        raise ConfigError(
            f"--seq-len {seq_len} is longer than the context of teacher {teacher} ({found[1]}): "
            f"use --seq-len {found[0]} or less"
        )
