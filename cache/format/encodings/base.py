"""The encoding contract and registry (the package's __init__ imports every built-in encoding, which registers
itself here); see the package docstring."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
import pyarrow as pa

from kd_pipeline.cache.format.rows import CacheRows
from kd_pipeline.errors import ConfigError

LEGACY_ENCODING = {"name": "exact"}  # what a manifest of format v1/v2 (no "encoding" entry) holds


class Encoding(ABC):
    """One shard layout. Bound to a cache's geometry and the encoding's parameters from its manifest."""

    name: ClassVar[str]
    versions: ClassVar[tuple[int, ...]]  # format versions this encoding exists in

    def __init__(self, *, version: int, seq_len: int, k: int, params: dict):
        if version not in self.versions:
            raise ValueError(f"encoding {self.name!r} does not exist in cache format version {version}")
        self.version, self.seq_len, self.k, self.params = version, seq_len, k, params

    @classmethod
    def new_params(cls, *, first_block_input_ids: np.ndarray, vocab_size: int, min_logprob: float | None) -> dict:
        """Parameters of a new cache (stored in its manifest and part of its identity): a pure function
        of the arguments, so a resumed run or another worker derives the same ones."""
        return {}

    @property
    @abstractmethod
    def schema(self) -> pa.Schema: ...

    @property
    @abstractmethod
    def write_options(self) -> dict:
        """Keyword arguments of ``pyarrow.parquet.write_table`` for this encoding's shards."""

    @abstractmethod
    def encode(self, rows: CacheRows) -> pa.Table: ...

    @abstractmethod
    def decode(self, table: pa.Table | pa.RecordBatch) -> CacheRows:
        """Shard rows (one row group, a whole file) to numpy; ``topk_logprobs`` as float16 or float32."""

    @property
    def cuts_support(self) -> bool:
        """Whether positions may hold fewer than k entries (decoded as log-prob -inf)."""
        return False

    def validate(self) -> None:  # noqa: B027 - an optional hook
        """Raise ValueError if the parameters are unusable (called when a manifest is loaded)."""

    def error_bound(self) -> float:
        """Largest |decoded - teacher| of a kept support log-probability (nats), beyond fp32 rounding."""
        return 0.0

    def check(self, table: pa.Table) -> list[str]:
        """Encoding-specific sanity of stored values that decoding alone would not reveal."""
        return []

    def describe(self) -> str:
        """One line for `pipeline inspect`."""
        return self.name


_REGISTRY: dict[str, type[Encoding]] = {}


def register(cls: type[Encoding]) -> type[Encoding]:
    if cls.name in _REGISTRY:
        raise ValueError(f"encoding {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def encoding_names() -> list[str]:
    return sorted(_REGISTRY)


def encoding_class(name: str) -> type[Encoding]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown encoding {name!r}; choose from {', '.join(encoding_names())}") from None


def encoding_for(manifest) -> Encoding:
    """The encoding a cache's shards are written in, as its manifest says (a
    :class:`~kd_pipeline.cache.format.manifest.Manifest`, or anything with its ``encoding``, ``format_version``,
    ``seq_len`` and ``k``)."""
    params = dict(manifest.encoding or LEGACY_ENCODING)
    cls = encoding_class(params.pop("name"))
    return cls(version=manifest.format_version, seq_len=manifest.seq_len, k=manifest.k, params=params)
