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


class TeacherBackend(Protocol):
    k: int

    def describe(self) -> dict:
        """Teacher identity and backend facts for the manifest: {"teacher": {...}, "backend": {...}}."""
        ...

    def score(
        self, input_ids: np.ndarray, progress: Callable[[int], None] | None = None
    ) -> TeacherScores:
        """Score ``input_ids`` [B, L] int32; call ``progress(n)`` after each n sequences are done."""
        ...
