"""Distillation losses over the teacher's sparse support (docs/losses.md).

Every loss works on ``k + 1`` *bins* per position: the teacher's ``k`` support ids plus one "rest" bin holding
all other tokens. Both sides are given as log-probabilities over the bins:

- teacher: ``log p_i`` = the cached top-k log-probs (normalized over the full vocabulary), and
  ``p_rest = kd_pipeline.cache.format.rows.tail_mass(...)`` (may be exactly 0);
- student: ``log q_i = z_i - logsumexp(z)`` and ``log q_rest`` = logsumexp of ``z`` over the complement of the
  support, minus ``logsumexp(z)`` (exact: no ``1 - Σ q`` cancellation, finite while any token lies outside).

With ``k = V`` (the rest bin is empty for both sides) every loss equals the dense loss over the vocabulary;
with ``k < V`` it equals the dense loss between the two coarse-grained ``k + 1`` bin distributions.

The student side is factorized through :class:`StudentBins` (``log_q_support``, ``log_q_rest``, ``lse``,
``log_q_target``) so that a fused path (hidden states × lm_head in row/vocab chunks, never materializing
``[N, V]``) can produce the same four tensors and reuse every loss unchanged.

Conventions: ``N`` positions (flatten batch × time first), ``V`` vocabulary, ``k`` support size, ``B`` bins.
Zero probabilities are ``-inf`` log-probs; a term ``a·log(a/b)`` with ``a = 0`` is 0 and passes no gradient.
Losses compute in float32 (float64 if given float64: the tests use it); fp16/bf16 inputs are upcast.

The package: :mod:`~kd_pipeline.train.losses.options` declares each loss (name, summary, Options dataclass) without
torch; :mod:`~kd_pipeline.train.losses.base` is the contract and the registry (:class:`DistillLoss`, :class:`KDBatch`,
:class:`KDLossOutput`, :func:`register`, :func:`build_loss`); :mod:`~kd_pipeline.train.losses.bins` and
:mod:`~kd_pipeline.train.losses.numerics` are shared; one module per family implements the losses: ``kl``
(fkl, rkl, js, sfkl, srkl, tvd), ``taid``, ``atkd``, ``uld``, ``ce``. docs/contributing.md: Add a loss.

The declarations are imported here at once; everything else (torch) on first use of one of its names (PEP 562),
so that ``pipeline distill --help`` and config files read the losses without importing torch.
"""

from __future__ import annotations

import importlib

from kd_pipeline.train.losses.options import (
    DECLARED,
    DEFAULT_LOSS,
    LOSS_NAMES,
    TEMPERATURE_HELP,
    ATKDOptions,
    JSOptions,
    KDOptions,
    LossDeclaration,
    LossOptions,
    SkewOptions,
    TAIDOptions,
    ULDOptions,
    declare,
    loss_help,
)

# Every implementation module, imported together on first use: registering every declared loss takes all of them.
_MODULES = ("numerics", "bins", "base", "kl", "taid", "atkd", "uld", "ce")
# public name -> the module that defines it
_LAZY = {
    **dict.fromkeys(
        ("NEG_INF", "LOG_P_FLOOR", "Scalar", "masked_mean", "forward_kl", "soft_cross_entropy", "cross_entropy"),
        "numerics",
    ),
    **dict.fromkeys(
        (
            "StudentBins",
            "student_bin_logprobs",
            "student_bins",
            "first_occurrence",
            "atkd_ids",
            "teacher_bin_logprobs",
            "join_bins",
            "Bins",
            "coarse_bins",
            "temper",
        ),
        "bins",
    ),
    **dict.fromkeys(
        ("KDBatch", "KDLossOutput", "FitTerms", "fit_terms", "DistillLoss", "LOSSES", "register", "build_loss"),
        "base",
    ),
    **dict.fromkeys(
        (
            "reverse_kl",
            "js_divergence",
            "skew_forward_kl",
            "skew_reverse_kl",
            "total_variation",
            "ForwardKL",
            "ReverseKL",
            "JensenShannon",
            "SkewForwardKL",
            "SkewReverseKL",
            "TotalVariation",
        ),
        "kl",
    ),
    **dict.fromkeys(("taid_target", "taid_kl", "TAIDSchedule", "TAID"), "taid"),
    **dict.fromkeys(("atkd_bins", "atkd_terms", "atkd_hard_mask", "atkd_loss", "ATKD"), "atkd"),
    **dict.fromkeys(("student_sorted_bins", "uld_distance", "uld_unmatched", "ULD"), "uld"),
    "CrossEntropyOnly": "ce",
    "tail_mass": "bins",  # the teacher's rest bin, kd_pipeline.cache.format.rows.tail_mass
}

__all__ = [
    "DECLARED",
    "DEFAULT_LOSS",
    "LOSS_NAMES",
    "TEMPERATURE_HELP",
    "ATKDOptions",
    "JSOptions",
    "KDOptions",
    "LossDeclaration",
    "LossOptions",
    "SkewOptions",
    "TAIDOptions",
    "ULDOptions",
    "declare",
    "loss_help",
    *_LAZY,
]


_loaded = False


def _load_implementations() -> None:
    global _loaded
    if _loaded:
        return
    for name in _MODULES:
        importlib.import_module(f"{__name__}.{name}")
    from kd_pipeline.train.losses.base import LOSSES

    missing = [name for name in DECLARED if name not in LOSSES]
    if missing:  # a declaration without its implementation would be a --loss choice that cannot run
        raise TypeError(f"losses declared in options.py but not registered by any module: {missing}")
    ordered = {name: LOSSES[name] for name in DECLARED}  # --loss's order, whatever order the modules loaded in
    LOSSES.clear()
    LOSSES.update(ordered)
    _loaded = True


def __getattr__(name: str):
    if name in _LAZY:
        _load_implementations()
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
