"""kd_pipeline: distill causal LMs from an offline teacher cache.

Stage one (``pipeline cache-teacher``, :mod:`kd_pipeline.cache`) runs a teacher once and writes its top-k
log-probabilities; stage two (``pipeline distill``, :mod:`kd_pipeline.train`) trains any number of students from
that cache. The public API::

    from kd_pipeline import read_cache          # numpy row groups of a cache (kd_pipeline.cache.format)
    from kd_pipeline import PipelineError       # the root of every error a user can act on

Names are imported on first use, so ``import kd_pipeline`` stays cheap (no torch, no pyarrow).
"""

from __future__ import annotations

import importlib

from kd_pipeline.errors import PipelineError

__version__ = "0.2.0"

# public name -> module that defines it (imported on first access: PEP 562)
_LAZY = {
    "read_cache": "kd_pipeline.cache.format.reading",
    "read_all": "kd_pipeline.cache.format.reading",
    "load_cache": "kd_pipeline.cache.format.manifest",
    "CacheRows": "kd_pipeline.cache.format.rows",
    "CacheInfo": "kd_pipeline.cache.format.manifest",
    "tail_mass": "kd_pipeline.cache.format.rows",
    "CacheDataset": "kd_pipeline.train.dataset",
}

__all__ = ["PipelineError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kd_pipeline' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
