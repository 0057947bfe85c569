"""Stage one, ``pipeline cache-teacher``: tokenize a dataset, run the teacher, write the top-k cache.

The cache's format, which stage two reads too, is the subpackage :mod:`kd_pipeline.cache.format`; stage one's
drivers are :mod:`~kd_pipeline.cache.data` (dataset to packed token sequences), :mod:`~kd_pipeline.cache.backends`
(teachers: HF transformers, vLLM) and :mod:`~kd_pipeline.cache.build` (the resumable writer).
"""
