"""Bins: the ``k + 1`` categories (the teacher's support and one rest bin) every loss compares, for the student
(:class:`StudentBins`, from logits or from a fused path) and for the teacher, and both joined (:class:`Bins`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from kd_pipeline.cache.format.rows import tail_mass
from kd_pipeline.train.losses.numerics import NEG_INF, _compute_dtype, _safe_logsumexp

if TYPE_CHECKING:
    from kd_pipeline.train.losses.base import KDBatch


class StudentBins(NamedTuple):
    """The student's side of the bins; everything a loss needs from the student.

    - ``log_q_support`` [N, m]: log q of each id in the support (``-inf`` for columns marked invalid).
    - ``log_q_rest`` [N]: log q of everything outside the support (``-inf`` if the support is the whole vocab).
    - ``lse`` [N]: ``logsumexp(z)`` over the vocabulary (kept for a fused path and for diagnostics).
    - ``log_q_target`` [N] or None: log q of the true next token (it may lie outside the support).
    """

    log_q_support: Tensor
    log_q_rest: Tensor
    lse: Tensor
    log_q_target: Tensor | None = None


def student_bin_logprobs(
    student_logits: Tensor, support_ids: Tensor, valid: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Student log-probs on the bins: ``(log_q_support [N, m], log_q_rest [N])``.

    ``student_logits`` [N, V] (any float dtype; upcast to fp32), ``support_ids`` [N, m] integer ids in [0, V),
    distinct within a row except where ``valid`` [N, m] (bool, optional) is False: such columns are empty bins
    (``log q = -inf``), used when an id repeats one already in the row (ATKD's extra target column).

    ``log_q_rest`` is logsumexp over the complement minus logsumexp over all, so it stays exact (and its gradient
    finite) when q_rest is far below fp32 resolution of ``1 - Σ q``; it is ``-inf`` with zero gradient when the
    support covers the whole vocabulary.
    """
    bins = student_bins(student_logits, support_ids)
    log_q_support = bins.log_q_support
    if valid is not None:
        log_q_support = log_q_support.masked_fill(~valid.to(torch.bool), NEG_INF)
    return log_q_support, bins.log_q_rest


def student_bins(
    student_logits: Tensor,
    support_ids: Tensor,
    target_ids: Tensor | None = None,
    *,
    include_target: bool = False,
) -> StudentBins:
    """:class:`StudentBins` from full logits [N, V].

    ``support_ids`` [N, k]; ``target_ids`` [N] (optional) fills ``log_q_target``. With ``include_target=True``
    (ATKD) the bins are the support *plus the target as an extra column* (m = k + 1, see :func:`atkd_ids`):
    the rest bin then excludes the target as well, and the extra column is empty where the target is already
    in the support (no double count). A repeated id always counts once in the rest bin and in ``lse``.

    Cost: one exponential pass over [N, V] forward and one backward (:class:`_DenseStudentBins`), about what
    ``logsumexp`` alone costs under autograd; one [N, V] buffer is kept for the backward.
    """
    dtype = _compute_dtype(student_logits)
    z = student_logits.to(dtype)
    ids = support_ids.long()
    valid = None
    if include_target:
        if target_ids is None:
            raise ValueError("include_target=True needs target_ids")
        ids, valid = atkd_ids(ids, target_ids)
    target = None if target_ids is None else target_ids.long()
    log_q_support, log_q_rest, lse, log_q_target = _DenseStudentBins.apply(z, ids, target)
    if valid is not None:
        log_q_support = log_q_support.masked_fill(~valid, NEG_INF)
    return StudentBins(log_q_support, log_q_rest, lse, log_q_target)


def atkd_ids(support_ids: Tensor, target_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Support plus the true next token as an extra column: ``(ids [N, k+1], valid [N, k+1])``.

    The extra column is invalid (an empty bin) where the target already is in the support. A fused student path
    builds its :class:`StudentBins` on these ids for ATKD.
    """
    support_ids = support_ids.long()
    target_ids = target_ids.long()
    in_support = (support_ids == target_ids.unsqueeze(-1)).any(-1, keepdim=True)
    ids = torch.cat([support_ids, target_ids.unsqueeze(-1)], dim=-1)
    valid = torch.cat([torch.ones_like(support_ids, dtype=torch.bool), ~in_support], dim=-1)
    return ids, valid


def first_occurrence(ids: Tensor) -> Tensor:
    """[N, m] bool: the first column of each distinct id in its row (a repeated id's mass counts once)."""
    ordered, order = ids.sort(dim=-1, stable=True)
    repeat = torch.zeros_like(ids, dtype=torch.bool)
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    return torch.empty_like(repeat).scatter_(-1, order, ~repeat)


class _DenseStudentBins(torch.autograd.Function):
    """``z`` [N, V], ``ids`` [N, m], ``target`` [N] or None -> ``(log_q_support, log_q_rest, lse, log_q_target)``.

    Composed from ``logsumexp``/``gather``/``scatter`` under autograd, these cost about ten passes over [N, V] and
    as many [N, V] temporaries: two log-sum-exps (all ids, and a masked copy for the complement), each with its own
    exponential pass in the backward, and a zeros-then-scatter per ``gather`` in the backward. Here the forward
    makes one masked copy ``y``, turns it into ``e^{z - m_rest}`` in place (0 on the support) and sums it; the
    support's share of ``lse`` comes from the k gathered logits. The backward is one pass over ``y``.

    Numerics are those of the masked log-sum-exp: the complement is shifted by its own maximum ``m_rest``, so a tail
    e^-200 below the support stays exact and finite in fp32 (no ``1 - Σ q`` cancellation, no underflow to -inf).

    Gradient (the derivation of train/fused.py's module docstring): with ``p = softmax(z)``, upstream gradients
    ``G_lse, G_i, G_rest, G_g`` and ``a = G_lse - Σ_i G_i - G_rest - G_g``,
    ``dL/dz_j = a·p_j + G_rest·[j ∉ S]·e^{z_j - lse_rest} + Σ_i G_i·[j = s_i] + G_g·[j = g]``. Outside S the first
    two terms are ``y_j·(a·e^{m_rest - lse} + G_rest·e^{m_rest - lse_rest})``, both factors <= 1 (no overflow).
    """

    @staticmethod
    def forward(ctx, z: Tensor, ids: Tensor, target: Tensor | None):
        y = z.scatter(-1, ids, NEG_INF)  # the only [N, V] allocation; a repeated id is the same entry
        # An empty complement (support = V) is all -inf: the lowest finite shift keeps exp(-inf) = 0 there.
        m_rest = y.amax(-1, keepdim=True).clamp_(min=torch.finfo(y.dtype).min)
        y.sub_(m_rest).exp_()
        lse_rest = y.sum(-1).log_() + m_rest.squeeze(-1)  # log 0 = -inf: empty rest bin
        z_support = z.gather(-1, ids)
        lse_support = torch.logsumexp(z_support.masked_fill(~first_occurrence(ids), NEG_INF), dim=-1)
        lse = torch.logaddexp(lse_rest, lse_support)
        log_q_support = z_support - lse.unsqueeze(-1)
        log_q_target = None
        if target is not None:
            log_q_target = z.gather(-1, target.unsqueeze(-1)).squeeze(-1) - lse
        ctx.save_for_backward(y, ids, target, m_rest, log_q_support, lse, lse_rest)
        return log_q_support, lse_rest - lse, lse, log_q_target

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_support, g_rest, g_lse, g_target):
        y, ids, target, m_rest, log_q_support, lse, lse_rest = ctx.saved_tensors
        rest_empty = torch.isneginf(lse_rest)
        g_rest = g_rest.masked_fill(rest_empty, 0.0)  # an empty rest bin is a constant -inf
        a = g_lse - g_support.sum(-1) - g_rest
        if target is not None:
            a = a - g_target
        m = m_rest.squeeze(-1)
        rest_factor = torch.where(rest_empty, 0.0, (m - lse_rest).exp())
        grad = y * (a * (m - lse).exp() + g_rest * rest_factor).unsqueeze(-1)  # 0 on the support (y is)
        # The support: a·p_j written once per distinct id (a repeat writes the same value), then each column's
        # own upstream gradient added (repeats add up, as gather's backward does).
        grad.scatter_(-1, ids, a.unsqueeze(-1) * log_q_support.exp())
        grad.scatter_add_(-1, ids, g_support)
        if target is not None:
            grad.scatter_add_(-1, target.unsqueeze(-1), g_target.unsqueeze(-1))
        return grad, None, None


def teacher_bin_logprobs(
    topk_logprobs: Tensor, p_rest: Tensor | None = None, dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """Teacher log-probs on the bins: ``(log_p_support [N, k], log_p_rest [N])``.

    ``topk_logprobs`` [N, k] as cached (fp16 is upcast). ``p_rest`` [N] defaults to
    :func:`kd_pipeline.cache.format.rows.tail_mass` (fp32, clamped >= 0); pass it to override (e.g. float64 in tests).
    ``log_p_rest`` is ``-inf`` where ``p_rest == 0`` (the losses treat ``0·log 0`` as 0).

    fp16 rounding can make ``Σ exp(lp)`` exceed 1 (tail_mass then gives 0); such rows are renormalized so the
    bins stay a distribution. Rows summing to <= 1 are left exactly as cached.
    """
    dtype = dtype or _compute_dtype(topk_logprobs)
    if p_rest is None:
        p_rest = tail_mass(topk_logprobs)
    lp = topk_logprobs.to(dtype)
    excess = torch.logsumexp(lp, dim=-1).clamp_min(0.0)
    log_p_support = lp - excess.unsqueeze(-1)
    log_p_rest = torch.log(p_rest.to(dtype).clamp_min(0.0))  # log 0 = -inf, no gradient needed (teacher)
    return log_p_support, log_p_rest


def join_bins(
    log_p_support: Tensor, log_p_rest: Tensor, log_q_support: Tensor, log_q_rest: Tensor
) -> tuple[Tensor, Tensor]:
    """Stack support and rest into ``(log_p [N, m+1], log_q [N, m+1])``, rest last.

    Where the student's rest bin is empty (the support is the whole vocabulary) the teacher's is emptied too:
    a tail mass there can only be rounding noise (tail_mass works in fp32), and keeping it would cost +inf.
    """
    log_p_rest = log_p_rest.to(log_p_support.dtype).masked_fill(torch.isneginf(log_q_rest), NEG_INF)
    log_p = torch.cat([log_p_support, log_p_rest.unsqueeze(-1)], dim=-1)
    log_q = torch.cat([log_q_support, log_q_rest.unsqueeze(-1)], dim=-1)
    return log_p, log_q


class Bins(NamedTuple):
    """Teacher and student on the same bins: ``log_p``, ``log_q`` [N, B] (an empty bin is -inf on both sides);
    ``is_target`` [N, B] bool marks the true token's bin where a loss needs it (ATKD), else None."""

    log_p: Tensor
    log_q: Tensor
    is_target: Tensor | None = None


def coarse_bins(student: StudentBins, batch: KDBatch) -> Bins:
    """The k+1 bins (support, then rest) of a flat batch at T = 1.

    ``student`` may carry columns beyond the k support ids (ATKD's target column): they are folded into the
    student's rest bin, so these are always the bins of the teacher's support.
    """
    k = batch.support_ids.shape[-1]
    log_q_rest = student.log_q_rest
    if student.log_q_support.shape[-1] > k:
        extra = student.log_q_support[:, k:]  # -inf where a column repeats a support id: nothing to fold
        log_q_rest = _safe_logsumexp(torch.cat([log_q_rest.unsqueeze(-1), extra], dim=-1))
    log_p_s, log_p_r = teacher_bin_logprobs(batch.teacher_logprobs, batch.p_rest, dtype=log_q_rest.dtype)
    return Bins(*join_bins(log_p_s, log_p_r, student.log_q_support[:, :k], log_q_rest))


def temper(bins: Bins, temperature: float) -> Bins:
    """Both sides at temperature T: each bin distribution raised to 1/T and renormalized over the bins,
    ``log_softmax(log b / T)``. The rest bin is tempered as one category (the cache knows only its total mass);
    with k = V this is the usual ``softmax(z / T)``. Empty bins stay empty."""

    def tempered(log_b: Tensor) -> Tensor:
        scaled = log_b / temperature
        return scaled - _safe_logsumexp(scaled).unsqueeze(-1)

    return bins._replace(log_p=tempered(bins.log_p), log_q=tempered(bins.log_q))
