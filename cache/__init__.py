"""Stage one of the pipeline (the teacher cache), and its public read API: ``from cache import read_cache``."""

from cache.format import CacheRows
from cache.reading import read_all, read_cache

__all__ = ["CacheRows", "read_all", "read_cache"]
