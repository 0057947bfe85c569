"""Teacher backends: turn token sequences into the teacher's top-k next-token log-probabilities.

Every backend subclasses :class:`TeacherBackend` and registers itself with :func:`register` (in the spirit of
the encoding registry, cache/format/encodings/base.py). Stage one's driver (cache/build.py) only
calls :func:`select_backend` and the class it returns: it never knows which backend it drives, so a new backend
is one new module holding a registered subclass (plus its import in ``_BUILT_IN`` below, for a built-in one)
and its test; docs/backends.md walks through one. Modules register on import; the built-ins are imported on
the first lookup, and none imports torch at module level, so naming the backends stays cheap.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from kd_pipeline.errors import ConfigError
from kd_pipeline.models import dtype_name

AUTO = "auto"  # --backend auto: the available backend of highest priority that accepts the config


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


class TeacherBackend(ABC):
    """A teacher that scores token sequences. The class-level hooks are what the driver asks before it builds
    one; ``config`` is stage one's config object, read by attribute (``config.teacher``, ``config.top_k``, ...)."""

    name: ClassVar[str]  # the --backend value
    priority: ClassVar[int] = 0  # --backend auto prefers the higher
    k: int

    @classmethod
    def available(cls) -> bool:
        """Whether ``--backend auto`` may choose this backend on this machine (an explicit --backend is
        always tried, and fails in :meth:`from_config` with what to install)."""
        return True

    @classmethod
    def refusal(cls, config) -> str | None:
        """Why this backend cannot produce the cache ``config`` asks for (one line naming the option to
        change), or None."""
        return None

    @classmethod
    def teacher_dtype(cls, config) -> str:
        """The dtype the teacher runs in (``bfloat16``, ...), "auto" resolved where this backend runs: part of
        the cache identity, so a resume on another device cannot mix float32 and bf16 numbers. By default
        the backend picks its device itself (CUDA where torch sees it)."""
        return dtype_name(config.dtype, AUTO)

    @classmethod
    def identity(cls, config) -> dict:
        """Entries this backend adds to the manifest's teacher identity: settings that may change the
        numbers (vLLM's --vllm-arg quantization, ...). The backend's name is always added by the driver."""
        return {}

    @classmethod
    @abstractmethod
    def from_config(cls, config) -> TeacherBackend:
        """Load the teacher ``config`` names; the instance is ready to :meth:`score`."""

    @abstractmethod
    def describe(self) -> dict:
        """Teacher identity and backend facts for the manifest: {"teacher": {...}, "backend": {...}}."""

    @abstractmethod
    def close(self) -> None:
        """Release the model (and any processes it runs in); the backend is unusable afterwards."""

    @abstractmethod
    def score(
        self, input_ids: np.ndarray, progress: Callable[[int], None] | None = None, first_seq_id: int = 0
    ) -> TeacherScores:
        """Score ``input_ids`` [B, L] int32 (stream positions ``first_seq_id``...); call ``progress(n)``
        after each n sequences are done. ``first_seq_id`` seeds sampled supports, so a resumed run draws
        the same samples."""


_REGISTRY: dict[str, type[TeacherBackend]] = {}
# The backends that ship with the tool, imported (and so registered) on the first lookup.
_BUILT_IN = ("kd_pipeline.cache.backends.hf", "kd_pipeline.cache.backends.vllm")


def register(cls: type[TeacherBackend]) -> type[TeacherBackend]:
    if cls.name in _REGISTRY or cls.name == AUTO:
        raise ValueError(f"teacher backend {cls.name!r} registered twice (or named {AUTO!r})")
    _REGISTRY[cls.name] = cls
    return cls


def _registry() -> dict[str, type[TeacherBackend]]:
    for module in _BUILT_IN:
        importlib.import_module(module)  # a no-op after the first time
    return _REGISTRY


def backend_names() -> list[str]:
    """The registered backends, by name."""
    return sorted(_registry())


def backend_class(name: str) -> type[TeacherBackend]:
    try:
        return _registry()[name]
    except KeyError:
        raise ConfigError(f"unknown --backend {name!r}; choose from {', '.join([AUTO, *backend_names()])}") from None


def select_backend(config) -> type[TeacherBackend]:
    """The backend class ``config.backend`` names, or for ``auto`` the available one of highest priority that
    accepts ``config``; a backend that cannot produce the asked-for cache is refused here, before any work."""
    if config.backend != AUTO:
        chosen = backend_class(config.backend)
        reason = chosen.refusal(config)
        if reason is not None:
            raise ConfigError(reason)
        return chosen
    ranked = sorted(_registry().values(), key=lambda cls: (-cls.priority, cls.name))
    for cls in ranked:
        if cls.available() and cls.refusal(config) is None:
            return cls
    raise ConfigError(
        "--backend auto: no backend here can produce this cache ("
        + "; ".join(f"{cls.name}: {cls.refusal(config) or 'not available'}" for cls in ranked)
        + ")"
    )


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
