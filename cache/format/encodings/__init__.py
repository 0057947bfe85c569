"""Shard encodings: how the rows of a cache are laid out in Parquet, one module per encoding.

A cache's manifest names its encoding (``manifest.encoding["name"]``, with that encoding's parameters
next to it); :func:`encoding_for` returns the matching :class:`Encoding`, bound to the manifest's
``seq_len``, ``k`` and format version. The writer, the reader, ``verify`` and ``inspect`` only ever call
it: nothing else knows the bytes. A new encoding is one new module that subclasses :class:`Encoding`
and registers itself with :func:`register` (in the spirit of mosaicml/streaming's format registry).

Every encoding decodes to the same :class:`kd_pipeline.cache.format.rows.CacheRows`, so the tail mass keeps its one
definition (:func:`kd_pipeline.cache.format.rows.tail_mass` of the decoded support) whatever the bytes.
"""

# The contract and registry live in base.py; importing the built-in encodings registers them, so every encoding the
# tool knows is available from here (and the encodings import base, never this package: no import cycle).
from kd_pipeline.cache.format.encodings import compact, exact  # noqa: F401
from kd_pipeline.cache.format.encodings.base import (
    LEGACY_ENCODING,
    Encoding,
    encoding_class,
    encoding_for,
    encoding_names,
    register,
)

__all__ = ["LEGACY_ENCODING", "Encoding", "encoding_class", "encoding_for", "encoding_names", "register"]
