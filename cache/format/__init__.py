"""The cache format: what both stages share about a teacher cache, and nothing of either stage's drivers.

- :mod:`~kd_pipeline.cache.format.layout`: where things are in a cache directory, format versions;
- :mod:`~kd_pipeline.cache.format.rows`: :class:`CacheRows` (the rows in memory), the tail mass, value rules;
- :mod:`~kd_pipeline.cache.format.encodings`: how rows are laid out in a shard, one module per encoding;
- :mod:`~kd_pipeline.cache.format.manifest`: the manifest (identity + commit log) and :func:`load_cache`;
- :mod:`~kd_pipeline.cache.format.files`: durable writes and checksums; :mod:`~kd_pipeline.cache.format.lock`: one
  writer per output;
- :mod:`~kd_pipeline.cache.format.reading`: :func:`read_cache`, the public read API;
- :mod:`~kd_pipeline.cache.format.verify`: ``pipeline verify`` and ``pipeline inspect``.

docs/cache-format.md is the specification a third party can implement a reader from.
"""

from kd_pipeline.cache.format.manifest import CacheInfo, Manifest, load_cache
from kd_pipeline.cache.format.reading import read_all, read_cache
from kd_pipeline.cache.format.rows import CacheRows, tail_mass

__all__ = ["CacheInfo", "CacheRows", "Manifest", "load_cache", "read_all", "read_cache", "tail_mass"]
