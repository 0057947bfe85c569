"""The errors a user can act on, under one root: :class:`PipelineError`.

The rule (docs/reliability.md): a ``PipelineError`` is bad input, a mismatch or a damaged file; its message says
what, where and what to do, and the CLI prints it as one line and exits 2. Any other exception is a bug in this
tool and keeps its traceback. So raise one of these for what the user can fix, and a plain exception for what
they cannot.

The kinds that subclass ``ValueError`` too (bad option values, bad data) stay catchable as ``ValueError`` by
code written against earlier versions.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Something the user can fix; the message says what, where and what to do."""


class ConfigError(PipelineError, ValueError):
    """An option value, a combination of options or a config file that cannot work."""


class DataError(PipelineError, ValueError):
    """A problem with the input data (stage one's dataset), worded for the person running the command."""


class CacheError(PipelineError):
    """A cache that cannot be used as asked: another teacher or tokenizer, damaged, incomplete, changed."""


class LockHeld(PipelineError):
    """Another live process writes this output."""


class ModelLoadError(PipelineError, ValueError):
    """A teacher, student or tokenizer that cannot be loaded (missing, damaged, or custom code not allowed)."""


class TrainingError(PipelineError):
    """A training run that cannot go on as asked (a non-finite step, no usable checkpoint, ...)."""


class BadCheckpoint(TrainingError):
    """A checkpoint that cannot be used (named file missing, truncated, damaged or unreadable)."""


class NonFiniteStep(TrainingError):
    """A training step with a non-finite loss or gradient norm, beyond --skip-nonfinite-steps."""


class GenerateError(PipelineError):
    """`pipeline generate` cannot run as asked."""


class MissingDependency(PipelineError, ImportError):
    """An optional extra that is not installed here; the message names what to ``pip install``."""


class OutputError(PipelineError):
    """An output that cannot be written where asked: a read-only file system, no permission, a full disk."""
