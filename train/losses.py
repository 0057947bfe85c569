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
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, is_dataclass, make_dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

from kd_pipeline.cache.format.rows import tail_mass
from kd_pipeline.config import option
from kd_pipeline.errors import ConfigError

NEG_INF = float("-inf")

# Reverse-KL-type terms weigh log p by q: a bin the teacher gives exactly zero mass (p_rest = 0 after fp16
# rounding, or an underflowed log-prob) would cost +inf. Floor the teacher's log-prob there: p >= e^-100
# (~3.7e-44, below fp32's normal range), a large but finite penalty. Only `rkl` needs it (the mixtures in
# js/sfkl/srkl stay positive wherever q does).
LOG_P_FLOOR = -100.0

Scalar = float | Tensor


# ---------------------------------------------------------------------------------------------------------
# Small numerics helpers


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32, or float64 if any input is float64 (never fp16/bf16: log-sum-exp over V needs the range)."""
    dtype = torch.float32
    for x in tensors:
        if x is not None and x.dtype == torch.float64:
            dtype = torch.float64
    return dtype


def _safe_logsumexp(x: Tensor, dim: int = -1) -> Tensor:
    """logsumexp that returns -inf with a zero (not nan) gradient on rows whose entries are all -inf.

    ``torch.logsumexp`` gives the right value there but its backward computes ``exp(-inf - -inf) = nan``.
    """
    m = x.detach().amax(dim=dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # the shift cancels exactly; detached is fine
    s = (x - m).exp().sum(dim=dim)
    nonzero = s > 0
    out = torch.log(torch.where(nonzero, s, torch.ones_like(s))) + m.squeeze(dim)
    return torch.where(nonzero, out, torch.full_like(out, NEG_INF))


def _log_mix(log_x: Tensor, log_y: Tensor, w: float) -> Tensor:
    """``log(w·x + (1-w)·y)`` from log-inputs; -inf (zero gradient) where both are zero."""
    terms = []
    if w > 0:
        terms.append(log_x + math.log(w))
    if w < 1:
        terms.append(log_y + math.log1p(-w))
    return _safe_logsumexp(torch.stack(terms, dim=-1), dim=-1)


def _kl_sum(log_a: Tensor, log_b: Tensor) -> Tensor:
    """``Σ_bins a·(log a - log b)`` over the last dim, with ``0·log(0/b) = 0`` (xlogy-style).

    Bins with ``a = 0`` contribute 0 and pass no gradient to either side, whatever ``log b`` is (it may be -inf
    there: an empty bin). ``a > 0`` with ``b = 0`` is a genuine +inf.
    """
    pos = ~torch.isneginf(log_a)
    la = log_a.masked_fill(~pos, 0.0)
    lb = log_b.masked_fill(~pos, 0.0)
    return torch.where(pos, la.exp() * (la - lb), torch.zeros_like(la)).sum(-1)


def _scale_log(w: Tensor, log_x: Tensor) -> Tensor:
    """``w · log x`` with ``0 · log 0 = 0`` (so t = 0 / t = 1 in TAID give exactly q / p). No gradient use."""
    return torch.where(w == 0, torch.zeros_like(log_x), w * log_x)


def _as_column(value: Scalar, like: Tensor) -> Tensor:
    """A float, 0-d tensor or per-position [N] tensor as something that broadcasts against [N, B]."""
    v = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return v.unsqueeze(-1) if v.dim() >= 1 else v


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` [N] over positions where ``mask`` [N] (bool) is set; 0 if none is.

    Uses ``where`` rather than multiplication, so inf/nan at masked-out positions neither leak into the value
    nor into the gradient.
    """
    mask = mask.to(torch.bool)
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / mask.sum().clamp_min(1).to(values.dtype)


# ---------------------------------------------------------------------------------------------------------
# Bins


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


# ---------------------------------------------------------------------------------------------------------
# Per-position losses on bins: log_p, log_q [N, B] -> [N]. Gradients flow through log_q only.


def forward_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(p ‖ q) = Σ p (log p - log q)`` per position [N]."""
    return _kl_sum(log_p, log_q)


def reverse_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(q ‖ p) = Σ q (log q - log p)`` per position [N]; teacher log-probs floored at :data:`LOG_P_FLOOR`."""
    return _kl_sum(log_q, log_p.clamp_min(LOG_P_FLOOR))


def js_divergence(log_p: Tensor, log_q: Tensor, beta: float = 0.5) -> Tensor:
    """Generalized Jensen-Shannon per position [N]: ``β·KL(p ‖ m) + (1-β)·KL(q ‖ m)``, ``m = β p + (1-β) q``.

    β = 0.5 is the symmetric JS divergence (GKD's JSD(β) convention; TAID/DistiLLM's ``JS`` with teacher
    weight β is the same formula). Requires 0 < β < 1.
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"js beta must be in (0, 1), got {beta}")
    log_m = _log_mix(log_p, log_q, beta)
    return beta * _kl_sum(log_p, log_m) + (1.0 - beta) * _kl_sum(log_q, log_m)


def skew_forward_kl(log_p: Tensor, log_q: Tensor, alpha: float = 0.1) -> Tensor:
    """DistiLLM skew KL per position [N]: ``SKL_α = KL(p ‖ α p + (1-α) q)``. 0 < α <= 1."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"skew alpha must be in (0, 1], got {alpha}")
    return _kl_sum(log_p, _log_mix(log_p, log_q, alpha))


def skew_reverse_kl(log_p: Tensor, log_q: Tensor, alpha: float = 0.1) -> Tensor:
    """DistiLLM skew reverse KL per position [N]: ``SRKL_α = KL(q ‖ (1-α) p + α q)``. 0 < α <= 1."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"skew alpha must be in (0, 1], got {alpha}")
    return _kl_sum(log_q, _log_mix(log_p, log_q, 1.0 - alpha))


def taid_target(log_p: Tensor, log_q: Tensor, t: Scalar) -> Tensor:
    """TAID's intermediate target, log-probs [N, B]: ``log_softmax((1-t)·stopgrad(log q) + t·log p)``.

    Official TAID interpolates raw logits; per-row constants (the log-partition functions) cancel in the
    softmax, so log-probs give the same target. Fully detached. ``t``: float, 0-d or [N] tensor in [0, 1].
    """
    log_q = log_q.detach()
    t = _as_column(t, log_q)
    mixed = _scale_log(1.0 - t, log_q) + _scale_log(t, log_p.detach())
    return mixed - _safe_logsumexp(mixed, dim=-1).unsqueeze(-1)


def taid_kl(log_p: Tensor, log_q: Tensor, t: Scalar) -> Tensor:
    """TAID loss per position [N]: ``KL(p_t ‖ q)`` with ``p_t`` from :func:`taid_target`.

    Reading note: the official code (SakanaAI/TAID, src/distil_losses/taid.py) returns the cross-entropy
    ``-Σ p_t log q`` (its ``forward_kl`` helper drops the ``p_t log p_t`` term). That differs from this KL by
    H(p_t), which has no gradient w.r.t. the student, so the gradients are identical; but the *value* fed to
    :class:`TAIDSchedule` differs. We follow the paper (KL); docs/losses.md.
    """
    return _kl_sum(taid_target(log_p, log_q, t), log_q)


def cross_entropy(log_q_target: Tensor) -> Tensor:
    """``-log q_g`` per position [N] for the true next token g (which may lie outside the support)."""
    return -log_q_target


def total_variation(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Total variation distance ``½·Σ |p - q|`` per position [N], in [0, 1]. Empty bins (both -inf) add 0.

    Its gradient is ``±½·q`` per bin in log q (the sign of q - p; 0 where they are equal): bounded, and it does
    not grow where the student misses mass the way KL's does.
    """
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


def soft_cross_entropy(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``-Σ p log q`` per position [N] = ``KL(p ‖ q) + H(p)``: the cross-entropy form of the forward KL.

    Bins with ``p = 0`` contribute 0 (whatever ``log q`` is).
    """
    pos = ~torch.isneginf(log_p)
    return -torch.where(pos, log_p.masked_fill(~pos, 0.0).exp() * log_q.masked_fill(~pos, 0.0), 0.0).sum(-1)


# ---------------------------------------------------------------------------------------------------------
# ULD (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for
# LLMs", arXiv 2402.12030). Reading of the official code (Nicolas-BZRD/llm-recipes, models/distillation_model.py)
# and of TRL's GOLD trainer (trl/experimental/gold/gold_trainer.py, ULDLoss):
# - both distributions are sorted descending and compared rank by rank, the smaller vocabulary padded with zeros:
#   ``Σ_r |p_(r) - q_(r)|`` per position (the closed-form Wasserstein-1 distance under a uniform cost between
#   the sorted vectors), averaged over positions; no vocabulary mapping is needed;
# - defaults: teacher and student temperature 1, distillation weight 1; cross-entropy weight 1 in the official
#   code (``L = CE + λ·ULD``), 0 in GOLD; GOLD's hybrid variant uses it only for the ids without an exact match.
# Over the cache's k + 1 bins (the teacher's sorted top-k and its tail; the student's own sorted top-k and the
# mass outside it) the tail pair is one term, ``|p_rest - q_rest|``: a lower bound of the dense distance over the
# remaining ranks (triangle inequality) that equals it once k covers both vocabularies.


def student_sorted_bins(student_logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The student's own top-k log-probs, sorted descending, and the log-mass outside them: ``([N, k], [N])``.

    ``student_logits`` [N, V]. With k > V the missing ranks are empty bins (-inf: zero probability, as ULD pads the
    smaller vocabulary). Gradients flow through the values; the ranking itself is not differentiated.
    """
    m = min(k, student_logits.shape[-1])
    ids = student_logits.detach().topk(m, dim=-1).indices
    bins = student_bins(student_logits, ids)
    log_q = bins.log_q_support
    if m < k:
        log_q = torch.cat([log_q, log_q.new_full((log_q.shape[0], k - m), NEG_INF)], dim=-1)
    return log_q, bins.log_q_rest


def uld_distance(log_p: Tensor, log_q: Tensor) -> Tensor:
    """ULD per position [N]: ``Σ_r |p_(r) - q_(r)|`` between two bin vectors [N, B] whose support bins are each
    sorted descending (rank r of the teacher against rank r of the student) and whose last bin is the rest.

    Which ids sit in rank r does not matter (no vocabulary mapping); the teacher's cached top-k is sorted already.
    Range [0, 2]; empty bins are 0 probability.
    """
    return (log_p.exp() - log_q.exp()).abs().sum(-1)


def uld_unmatched(log_p_unmatched: Tensor, student_logits: Tensor, student_unmatched: Tensor) -> Tensor:
    """ULD on the part of the vocabularies without an exact match (GOLD's hybrid loss), per position [N].

    ``log_p_unmatched`` [N, k]: the teacher's top-k log-probs with the ids that have a student counterpart set to
    -inf; ``student_logits`` [N, V]; ``student_unmatched`` [V] bool: student ids no teacher id maps to. Both sides
    are probabilities over the full vocabulary (not renormalized over their part, as in GOLD), each sorted
    descending and compared rank by rank over the k ranks: ``Σ_{r<=k} |u_(r) - v_(r)|``. With k covering both
    parts this is GOLD's unmatched term exactly; the matched part is left to the projected bin loss.
    """
    k = log_p_unmatched.shape[-1]
    dtype = _compute_dtype(student_logits, log_p_unmatched)
    log_q = torch.log_softmax(student_logits.to(dtype), dim=-1).masked_fill(~student_unmatched.to(torch.bool), NEG_INF)
    m = min(k, log_q.shape[-1])
    v = log_q.topk(m, dim=-1).values.exp()
    u = log_p_unmatched.to(dtype).sort(dim=-1, descending=True).values.exp()
    if m < k:
        v = torch.cat([v, v.new_zeros(v.shape[0], k - m)], dim=-1)
    return (u - v).abs().sum(-1)


# ---------------------------------------------------------------------------------------------------------
# ATKD (Zhong et al. 2024, "Revisiting Knowledge Distillation for Autoregressive Language Models").
# Reading of the official code (WHU-ZQH/ATKD, distill/distill_trainer.py, method `atkd` and `get_tckd_nckd`):
# - UNC is the teacher's non-target mass 1 - p_g; the threshold is torch.median over the non-padding positions
#   of the batch (lower middle value for an even count); easy = UNC < median, hard = the rest (UNC >= median).
# - DKD is NOT weighted by 1 - p_g: `get_tckd_nckd` has the weighting behind `use_pnt=False` and is never
#   called with it. TKD and DKD are each averaged over the non-padding positions of their own group.
# - loss = alpha·DKD_easy + (1 - alpha)·(TKD_hard + DKD_hard), alpha defaulting to 0.2 (distill/train.py).
# - Its "reverse" setting (swapping teacher and student) is not implemented here.


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


def atkd_bins(
    student: StudentBins,
    support_ids: Tensor,
    target_ids: Tensor,
    teacher_logprobs: Tensor,
    teacher_target_logprob: Tensor,
    p_rest: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Bins ``S ∪ {g} ∪ rest`` for ATKD: ``(log_p [N, k+2], log_q [N, k+2], is_target [N, k+2] bool)``.

    ``student`` must come from :func:`student_bins` with ``include_target=True`` (``log_q_support`` [N, k+1]).
    Where g is outside the support it gets its own bin with the teacher's ``p_g = exp(target_logprob)`` (cached
    even outside the top-k) and the teacher's rest shrinks to ``max(p_rest - p_g, 0)``; where g is in the support
    the extra bin is empty for both sides and the support column is g's bin.
    """
    k = support_ids.shape[-1]
    if student.log_q_support.shape[-1] != k + 1:
        raise ValueError(
            f"ATKD needs student bins over support + target (k+1 = {k + 1} columns), got "
            f"{student.log_q_support.shape[-1]}: build them with student_bins(..., include_target=True)"
        )
    log_p_support, log_p_rest = teacher_bin_logprobs(teacher_logprobs, p_rest, dtype=student.log_q_rest.dtype)
    support_ids = support_ids.long()
    target_ids = target_ids.long()
    # g's bin is the first column holding g: a later column repeating an id is an empty bin (a projected support,
    # train/cross_tokenizer.py, fills its unused columns so).
    in_support = (support_ids == target_ids.unsqueeze(-1)) & first_occurrence(support_ids)  # [N, k]
    outside = ~in_support.any(-1)  # [N]
    log_p_g = teacher_target_logprob.to(log_p_support.dtype)
    log_p_extra = log_p_g.masked_fill(~outside, NEG_INF)
    p_rest_left = (log_p_rest.exp() - log_p_extra.exp()).clamp_min(0.0)
    log_p, log_q = join_bins(
        torch.cat([log_p_support, log_p_extra.unsqueeze(-1)], dim=-1),
        torch.log(p_rest_left),
        student.log_q_support,
        student.log_q_rest,
    )
    is_target = torch.cat([in_support, outside.unsqueeze(-1), torch.zeros_like(outside).unsqueeze(-1)], dim=-1)
    return log_p, log_q, is_target


def atkd_terms(log_p: Tensor, log_q: Tensor, is_target: Tensor) -> tuple[Tensor, Tensor]:
    """Per-position ``(TKD [N], DKD [N])`` so that ``KL(p ‖ q) = TKD + (1 - p_g)·DKD``.

    TKD = KL between the two-way splits ``(p_g, 1-p_g)`` and ``(q_g, 1-q_g)``; DKD = KL between ``p̂`` and ``q̂``,
    the distributions renormalized without g. ``is_target`` [N, B] marks g's bin (one per row). DKD is 0 where
    the teacher puts all its mass on g (p̂ undefined; its weight 1 - p_g is 0 there anyway).
    """
    is_target = is_target.to(torch.bool)
    empty = torch.isneginf(log_p) & torch.isneginf(log_q)
    other = ~is_target & ~empty
    zero = torch.zeros_like(log_q)
    # Exactly one target bin per row: a masked sum picks it without touching -inf elsewhere.
    log_p_g = torch.where(is_target, log_p, zero).sum(-1)
    log_q_g = torch.where(is_target, log_q, zero).sum(-1)
    # The non-target masses as log-sum-exp over the other bins (no 1 - p_g cancellation when p_g ~ 1).
    log_p_ng = _safe_logsumexp(log_p.masked_fill(~other, NEG_INF))
    log_q_ng = _safe_logsumexp(log_q.masked_fill(~other, NEG_INF))
    tkd = _kl_sum(torch.stack([log_p_g, log_p_ng], -1), torch.stack([log_q_g, log_q_ng], -1))

    p_ng_pos = torch.isfinite(log_p_ng)
    log_p_hat = (log_p - torch.where(p_ng_pos, log_p_ng, 0.0).unsqueeze(-1)).masked_fill(~other, NEG_INF)
    q_norm = torch.where(torch.isfinite(log_q_ng), log_q_ng, torch.zeros_like(log_q_ng))
    log_q_hat = (log_q - q_norm.unsqueeze(-1)).masked_fill(~other, NEG_INF)
    dkd = torch.where(p_ng_pos, _kl_sum(log_p_hat, log_q_hat), torch.zeros_like(tkd))
    return tkd, dkd


def atkd_hard_mask(unc: Tensor, mask: Tensor) -> Tensor:
    """Hard tokens: ``mask & (UNC >= median of UNC over the masked positions)`` [N] bool.

    The median is torch's (the lower of the two middle values for an even count), taken over this call's
    positions, as the official code does per device batch. Sort-based, so no host sync; an empty mask gives
    no hard tokens.
    """
    mask = mask.to(torch.bool)
    if mask.numel() == 0:  # no positions at all (a batch with no trained token): nothing to gather a median from
        return mask
    unc = unc.detach()
    n = mask.sum()
    ordered = torch.sort(unc.masked_fill(~mask, float("inf"))).values
    median = ordered.gather(0, torch.div(n - 1, 2, rounding_mode="floor").clamp_min(0).view(1))
    return mask & (unc >= median)


def atkd_loss(tkd: Tensor, dkd: Tensor, unc: Tensor, mask: Tensor, alpha: float = 0.2) -> Tensor:
    """ATKD scalar: ``α·mean_easy(DKD) + (1-α)·mean_hard(TKD + DKD)``.

    ``tkd``, ``dkd`` from :func:`atkd_terms`, ``unc = 1 - p_g`` [N] (teacher), ``mask`` [N]. Each group is averaged
    over its own masked positions (as the official code does), so this is not a mean of per-position values. An
    empty group contributes 0 (the official code would give nan).
    """
    mask = mask.to(torch.bool)
    hard = atkd_hard_mask(unc, mask)
    easy = mask & ~hard
    return alpha * masked_mean(dkd, easy) + (1.0 - alpha) * masked_mean(tkd + dkd, hard)


# ---------------------------------------------------------------------------------------------------------
# TAID schedule


class TAIDSchedule:
    """TAID's adaptive interpolation parameter t (Shing et al. 2025, arXiv 2501.16937).

    Call :meth:`update` once per OPTIMIZER step with that step's KD loss (mean over its micro-batches), never per
    micro-batch and never during eval. (The official code updates on every loss call, i.e. per micro-batch under
    gradient accumulation, a quirk not copied here.) Rule, with L the new loss::

        first call: L_prev <- L, nothing else
        δ = (L_prev - L) / (L_prev + 1e-15);  m <- β·m + (1-β)·δ
        Δt = α·sigmoid(m)·(1 - t);  t_lin = t_start + (t_end - t_start)·step/total_steps
        t <- min(t_end, max(t_lin, t + Δt))      (t <- min(t_end, t_lin) with disable_adaptive)

    ``step`` is 0-based: the number of optimizer steps completed *before* the step that produced ``loss_value``,
    as in the official code (it passes Lightning's ``trainer.global_step`` read inside ``training_step``, 0 on
    the first step). So t_lin starts at t_start and reaches t_end only at step == total_steps.

    Non-finite losses are ignored (state unchanged), so one bad batch cannot poison the momentum. State is
    plain Python floats (the official code keeps float32 buffers).
    """

    def __init__(
        self,
        t_start: float = 0.4,
        t_end: float = 1.0,
        alpha: float = 5e-4,
        beta: float = 0.99,
        disable_adaptive: bool = False,
    ):
        if not (0.0 <= t_start < 1.0 and 0.0 < t_end <= 1.0 and t_start <= t_end):
            raise ValueError(f"need 0 <= t_start < 1, 0 < t_end <= 1, t_start <= t_end; got {t_start}, {t_end}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        self.t_start = float(t_start)
        self.t_end = float(t_end)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.disable_adaptive = bool(disable_adaptive)
        self._t = float(t_start)
        self.momentum = 0.0
        self.prev_loss: float | None = None

    @property
    def t(self) -> float:
        return self._t

    def update(self, loss_value: float, step: int, total_steps: int) -> float:
        """Advance t after optimizer step ``step`` (0-based) of ``total_steps``; returns the new t."""
        loss = float(loss_value)
        if not math.isfinite(loss):
            return self._t
        if self.prev_loss is None:
            self.prev_loss = loss
            return self._t
        delta = (self.prev_loss - loss) / (self.prev_loss + 1e-15)
        self.momentum = self.beta * self.momentum + (1.0 - self.beta) * delta
        t_lin = self.t_start + (self.t_end - self.t_start) * (step / max(int(total_steps), 1))
        if self.disable_adaptive:
            new_t = t_lin
        else:
            dt = self.alpha * _sigmoid(self.momentum) * (1.0 - self._t)
            new_t = max(t_lin, self._t + dt)
        self._t = min(self.t_end, new_t)
        self.prev_loss = loss
        return self._t

    def state_dict(self) -> dict:
        return {"t": self._t, "m": self.momentum, "prev_loss": self.prev_loss}

    def load_state_dict(self, state: dict) -> None:
        self._t = float(state["t"])
        self.momentum = float(state["m"])
        prev = state["prev_loss"]
        self.prev_loss = None if prev is None else float(prev)

    def __repr__(self) -> str:
        return f"TAIDSchedule(t={self._t:.6f}, m={self.momentum:.3e}, prev_loss={self.prev_loss})"


def _sigmoid(x: float) -> float:
    # Overflow-free for large |x| (δ can be huge when L_prev ~ 0).
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


# ---------------------------------------------------------------------------------------------------------
# The contract


@dataclass
class KDBatch:
    """One batch of cached teacher data, flattened to ``N`` positions (leading dims are flattened if given).

    - ``support_ids`` [N, k] int (int32 from the cache is fine): the teacher's top-k ids.
    - ``teacher_logprobs`` [N, k] float (fp16 from the cache is fine): their log-probs over the full vocab.
    - ``mask`` [N] bool: which positions are trained (loss_mask of the *target* token).
    - ``target_ids`` [N] int: the true next token (needed by ``atkd`` and for the CE term).
    - ``teacher_target_logprob`` [N] float: the teacher's log-prob of the true next token (needed by ``atkd``).
    - ``p_rest`` [N] float, optional: overrides ``tail_mass(teacher_logprobs)``.
    - ``teacher_own_logprobs`` [N, k'] float, optional: the teacher's top-k log-probs in its own vocabulary, where
      ``teacher_logprobs`` are something else (moved onto a student vocabulary, train/cross_tokenizer.py); ULD,
      which needs no vocabulary mapping, ranks these. Their tail is ``tail_mass`` of them.
    """

    support_ids: Tensor
    teacher_logprobs: Tensor
    mask: Tensor
    target_ids: Tensor | None = None
    teacher_target_logprob: Tensor | None = None
    p_rest: Tensor | None = None
    teacher_own_logprobs: Tensor | None = None

    def flat(self) -> KDBatch:
        k = self.support_ids.shape[-1]

        def f(x: Tensor | None) -> Tensor | None:
            return None if x is None else x.reshape(-1)

        return KDBatch(
            support_ids=self.support_ids.reshape(-1, k),
            teacher_logprobs=self.teacher_logprobs.reshape(-1, k),
            mask=self.mask.reshape(-1).to(torch.bool),
            target_ids=f(self.target_ids),
            teacher_target_logprob=f(self.teacher_target_logprob),
            p_rest=f(self.p_rest),
            teacher_own_logprobs=None
            if self.teacher_own_logprobs is None
            else self.teacher_own_logprobs.reshape(-1, self.teacher_own_logprobs.shape[-1]),
        )


class KDLossOutput(NamedTuple):
    """What a loss returns for one batch; all scalars, masked means over the trained positions.

    - ``total``: what is backpropagated, ``kd + ce_weight·ce`` (``ce`` alone for the ``ce`` baseline).
    - ``kd``: the loss's distillation term, ``T²·D(p_T, q_T)`` at temperature T.
    - ``ce``: ``-log q_g`` on the true next token at T = 1 (None when the batch has no targets).
    - ``kl``: ``KL(p ‖ q)`` on the k+1 bins at T = 1, whatever the loss: one measure comparable across losses
      and temperatures (what eval reports as ``eval_kl``). Detached.
    - ``soft_ce``: its cross-entropy form ``-Σ p log q = kl + H(p)`` on the same bins (the number peers and
      papers plot as the distillation loss). Detached.
    """

    total: Tensor
    kd: Tensor
    ce: Tensor | None
    kl: Tensor
    soft_ce: Tensor


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


class FitTerms(NamedTuple):
    """How close the student is to the teacher and the data, masked means: ``ce`` (true token, None without
    targets), ``kl`` and ``soft_ce`` (k+1 bins, T = 1). ``ce`` keeps its gradient; the other two are detached."""

    ce: Tensor | None
    kl: Tensor
    soft_ce: Tensor


def fit_terms(student: StudentBins, batch: KDBatch) -> FitTerms:
    """:class:`FitTerms` of a flat batch; ``student`` as for :meth:`DistillLoss.__call__`."""
    ce = None
    if batch.target_ids is not None:
        if student.log_q_target is None:
            raise ValueError("target_ids given but the precomputed StudentBins have no log_q_target")
        ce = masked_mean(cross_entropy(student.log_q_target), batch.mask)
    with torch.no_grad():
        bins = coarse_bins(StudentBins(*(None if x is None else x.detach() for x in student)), batch)
        kl = masked_mean(forward_kl(bins.log_p, bins.log_q), batch.mask)
        soft_ce = masked_mean(soft_cross_entropy(bins.log_p, bins.log_q), batch.mask)
    return FitTerms(ce, kl, soft_ce)


def fit_metrics(batch: KDBatch, student_logits: Tensor) -> FitTerms:
    """:func:`fit_terms` from student logits [N, V] (eval): the loss-independent numbers."""
    b = batch.flat()
    return fit_terms(student_bins(student_logits.reshape(-1, student_logits.shape[-1]), b.support_ids, b.target_ids), b)


# Each option of a loss is a config field declared with cache.options.option (its default and --help text):
# DistillConfig inherits every registered loss's option fields (via LossOptions below), so each option is declared
# once, here, and the CLI shows it as --field-name. (Field names are global across losses: two losses share an
# option by sharing its dataclass.)
TEMPERATURE_HELP = (
    "Distillation temperature T (every loss): both sides' k+1 bins (the top-k and the tail as one bin, each at "
    "T = 1) become log_softmax(log b / T) and the KD term is scaled by T²; with k = V exactly softmax(z / T). CE on "
    "the true tokens, kl and soft_ce stay at T = 1 (README: Temperature)."
)


@dataclass
class KDOptions:
    """Options every loss takes."""

    temperature: float = option(1.0, TEMPERATURE_HELP)
    ce_weight: float = option(0.0, "Weight w of cross-entropy on the true next token: loss = KD + w·CE.")

    def check(self) -> None:
        """Raise ValueError naming the option (as its --flag) if a value is out of range."""
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(f"--temperature must be a positive number, got {self.temperature}")
        if not (math.isfinite(self.ce_weight) and self.ce_weight >= 0):
            raise ConfigError(f"--ce-weight must be >= 0, got {self.ce_weight}")


class DistillLoss:
    """One loss behind the contract the trainer uses; :func:`register` puts a subclass in the registry.

    A subclass sets ``name``, ``summary`` (one line for ``--loss``'s help) and, if it has options beyond
    :class:`KDOptions`, ``Options`` (a dataclass subclassing it, fields declared with their help); then defines
    :meth:`per_position` on the bins, or :meth:`divergence` for a loss that is not a mean of per-position values.
    Optional: ``needs_target_column`` (the student's bins are built on support ∪ {true token}, see :func:`atkd_ids`),
    ``needs_logits`` (its bins are read from the student's whole distribution, not the support: ULD ranks it; no
    fused bins then), ``requires`` (KDBatch fields it cannot do without), :meth:`bins` (other bins than the k+1 of
    the support),
    and state: :meth:`state_dict` / :meth:`load_state_dict` (checkpointed with the run) and
    :meth:`optimizer_step`, called once per optimizer step (never per micro-batch, never in eval).

    Calling the loss on a batch gives :class:`KDLossOutput`; temperature, the CE term and the comparable
    ``kl`` / ``soft_ce`` are handled here, the same for every loss.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type] = KDOptions
    needs_target_column: ClassVar[bool] = False
    needs_logits: ClassVar[bool] = False
    requires: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: KDOptions | None = None):
        self.options = self.Options() if options is None else options
        if not isinstance(self.options, self.Options):
            raise TypeError(f"the {self.name} loss takes {self.Options.__name__}, got {type(self.options).__name__}")
        self.options.check()

    # -- what a loss defines ---------------------------------------------------------------------------------

    def per_position(self, bins: Bins) -> Tensor:
        """The divergence per position [N] on (tempered) bins."""
        raise NotImplementedError(f"{type(self).__name__} defines neither per_position nor divergence")

    def divergence(self, bins: Bins, batch: KDBatch) -> Tensor:
        """The distillation term (scalar) of a flat batch on (tempered) bins: by default the masked mean of
        :meth:`per_position`."""
        return masked_mean(self.per_position(bins), batch.mask)

    def bins(self, student: StudentBins, batch: KDBatch, logits: Tensor | None = None) -> Bins:
        """The bins the loss compares, at T = 1: by default the k+1 bins of the support. ``logits`` [N, V]: the
        student's, given to a loss with ``needs_logits``."""
        return coarse_bins(student, batch)

    def combine(self, kd: Tensor, ce: Tensor | None) -> Tensor:
        """The training loss from its two terms."""
        return kd + self.options.ce_weight * ce if self.options.ce_weight else kd

    # -- state -----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"the {self.name} loss keeps no state, but the checkpoint holds {sorted(state)}")

    def optimizer_step(self, kd: float, step: int, total_steps: int) -> None:
        """After optimizer step ``step`` (0-based: steps completed before it) of ``total_steps``, with that step's
        ``kd`` averaged over its micro-batches and ranks (every rank passes the same value)."""

    def metrics(self) -> dict[str, float]:
        """Numbers to log beside the loss (e.g. TAID's t)."""
        return {}

    # -- the call --------------------------------------------------------------------------------------------

    def __call__(
        self, batch: KDBatch, student_logits: Tensor | None = None, *, student: StudentBins | None = None
    ) -> KDLossOutput:
        """The loss of one batch.

        Student side: ``student_logits`` [N, V] (or [..., V]; any float dtype, computed in fp32, fp64 if
        given fp64), or precomputed ``student`` bins (a fused path, or a support with repeated ids made empty bins),
        built on ``batch.support_ids`` (with ``include_target=self.needs_target_column``, and ``target_ids`` so that
        ``log_q_target`` is set); a loss with ``needs_logits`` takes the logits too.
        """
        b = batch.flat()
        for name in self.requires:
            if getattr(b, name) is None:
                raise ValueError(f"the {self.name} loss needs batch.{name}")
        if self.options.ce_weight and b.target_ids is None:
            raise ValueError("ce_weight > 0 needs batch.target_ids")
        if student_logits is None and (student is None or self.needs_logits):
            raise ValueError(
                f"the {self.name} loss needs the student's logits"
                if self.needs_logits
                else "pass exactly one of student_logits and student (precomputed StudentBins)"
            )
        if student_logits is not None and student is not None and not self.needs_logits:
            raise ValueError("pass exactly one of student_logits and student (precomputed StudentBins)")
        logits = None if student_logits is None else student_logits.reshape(-1, student_logits.shape[-1])
        if student is None:
            student = student_bins(logits, b.support_ids, b.target_ids, include_target=self.needs_target_column)
        else:
            want = b.support_ids.shape[-1] + int(self.needs_target_column)
            if student.log_q_support.shape[-1] != want:
                columns = "the support and the true token" if self.needs_target_column else "the support"
                raise ValueError(
                    f"the {self.name} loss needs student bins on {want} columns ({columns}), "
                    f"got {student.log_q_support.shape[-1]}"
                )
        bins = self.bins(student, b, logits)
        t = self.options.temperature
        kd = self.divergence(bins, b) if t == 1 else t * t * self.divergence(temper(bins, t), b)
        fit = fit_terms(student, b)
        return KDLossOutput(self.combine(kd, fit.ce), kd, fit.ce, fit.kl, fit.soft_ce)


LOSSES: dict[str, type[DistillLoss]] = {}


def register(cls: type[DistillLoss]) -> type[DistillLoss]:
    """Class decorator: add a loss to the registry under ``cls.name`` (in this module, before LossOptions)."""
    if cls.name in LOSSES:
        raise ValueError(f"a loss named {cls.name!r} is registered already")
    if not (is_dataclass(cls.Options) and issubclass(cls.Options, KDOptions)):
        raise TypeError(f"{cls.__name__}.Options must be a dataclass subclassing KDOptions")
    LOSSES[cls.name] = cls
    return cls


@register
class TAID(DistillLoss):
    name = "taid"
    summary = "TAID (Sakana AI): KL to an interpolation of student and teacher, t scheduled up to the teacher"

    @dataclass
    class Options(KDOptions):
        taid_t_start: float = option(0.4, "TAID initial interpolation t.")
        taid_t_end: float = option(1.0, "TAID final t.")
        taid_alpha: float = option(5e-4, "TAID adaptive step size α.")
        taid_beta: float = option(0.99, "TAID momentum β of the relative loss change.")

        def check(self) -> None:
            super().check()
            try:
                TAIDSchedule(self.taid_t_start, self.taid_t_end, self.taid_alpha, self.taid_beta)
            except ValueError as error:
                raise ConfigError(f"--taid-t-start/--taid-t-end/--taid-alpha/--taid-beta: {error}") from None

    def __init__(self, options=None):
        super().__init__(options)
        o = self.options
        self.schedule = TAIDSchedule(t_start=o.taid_t_start, t_end=o.taid_t_end, alpha=o.taid_alpha, beta=o.taid_beta)

    def per_position(self, bins: Bins) -> Tensor:
        return taid_kl(bins.log_p, bins.log_q, t=self.schedule.t)

    def optimizer_step(self, kd: float, step: int, total_steps: int) -> None:
        self.schedule.update(kd, step, total_steps)

    def state_dict(self) -> dict:
        return self.schedule.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if not state:
            raise ConfigError("the taid loss needs its schedule state (t, m, prev_loss); the checkpoint has none")
        self.schedule.load_state_dict(state)

    def metrics(self) -> dict[str, float]:
        return {"taid_t": self.schedule.t}


@register
class ForwardKL(DistillLoss):
    name = "fkl"
    summary = "forward KL(p‖q)"

    def per_position(self, bins: Bins) -> Tensor:
        return forward_kl(bins.log_p, bins.log_q)


@register
class ReverseKL(DistillLoss):
    name = "rkl"
    summary = "reverse KL(q‖p)"

    def per_position(self, bins: Bins) -> Tensor:
        return reverse_kl(bins.log_p, bins.log_q)


@register
class JensenShannon(DistillLoss):
    name = "js"
    summary = "generalized Jensen-Shannon, mixture β·p + (1-β)·q"

    @dataclass
    class Options(KDOptions):
        js_beta: float = option(0.5, "Mixture weight β of the JS divergence (0.5: symmetric).")

        def check(self) -> None:
            super().check()
            if not 0.0 < self.js_beta < 1.0:
                raise ConfigError(f"--js-beta must be in (0, 1), got {self.js_beta}")

    def per_position(self, bins: Bins) -> Tensor:
        return js_divergence(bins.log_p, bins.log_q, beta=self.options.js_beta)


@dataclass
class SkewOptions(KDOptions):
    skew_alpha: float = option(0.1, "Skew KL mixing α (DistiLLM) for sfkl/srkl.")

    def check(self) -> None:
        super().check()
        if not 0.0 < self.skew_alpha <= 1.0:
            raise ConfigError(f"--skew-alpha must be in (0, 1], got {self.skew_alpha}")


@register
class SkewForwardKL(DistillLoss):
    name = "sfkl"
    summary = "DistiLLM skew KL(p ‖ α·p + (1-α)·q)"
    Options = SkewOptions

    def per_position(self, bins: Bins) -> Tensor:
        return skew_forward_kl(bins.log_p, bins.log_q, alpha=self.options.skew_alpha)


@register
class SkewReverseKL(DistillLoss):
    name = "srkl"
    summary = "DistiLLM skew reverse KL(q ‖ (1-α)·p + α·q)"
    Options = SkewOptions

    def per_position(self, bins: Bins) -> Tensor:
        return skew_reverse_kl(bins.log_p, bins.log_q, alpha=self.options.skew_alpha)


@register
class TotalVariation(DistillLoss):
    name = "tvd"
    summary = "total variation distance ½·Σ|p - q|"

    def per_position(self, bins: Bins) -> Tensor:
        return total_variation(bins.log_p, bins.log_q)


@register
class ATKD(DistillLoss):
    name = "atkd"
    summary = "ATKD (Zhong et al. 2024): target/diversity split, hard tokens weighted apart"
    needs_target_column = True
    requires = ("target_ids", "teacher_target_logprob")

    @dataclass
    class Options(KDOptions):
        atkd_alpha: float = option(0.2, "ATKD weight of the easy tokens' diversity term.")

        def check(self) -> None:
            super().check()
            if not 0.0 <= self.atkd_alpha <= 1.0:
                raise ConfigError(f"--atkd-alpha must be in [0, 1], got {self.atkd_alpha}")

    def bins(self, student: StudentBins, batch: KDBatch, logits: Tensor | None = None) -> Bins:
        return Bins(
            *atkd_bins(
                student,
                batch.support_ids,
                batch.target_ids,
                batch.teacher_logprobs,
                batch.teacher_target_logprob,
                batch.p_rest,
            )
        )

    def divergence(self, bins: Bins, batch: KDBatch) -> Tensor:
        tkd, dkd = atkd_terms(bins.log_p, bins.log_q, bins.is_target)
        # Hard or easy is a property of the token under the teacher as cached (T = 1): UNC = 1 - p_g.
        unc = -torch.expm1(batch.teacher_target_logprob.to(tkd.dtype))
        return atkd_loss(tkd, dkd, unc, batch.mask, alpha=self.options.atkd_alpha)


@register
class ULD(DistillLoss):
    name = "uld"
    summary = (
        "ULD (Boizard et al. 2024): Σ_r |p_(r) - q_(r)|, teacher and student probabilities each sorted descending "
        "and compared rank by rank (the teacher's k + tail against the student's own top-k + the rest), no "
        "vocabulary mapping; loss = uld_weight·ULD + ce_weight·CE, defaults as TRL's GOLD (ULD weight 1, CE weight "
        "0, T 1; the paper's code uses CE weight 1: pass --ce-weight 1); needs the full logits (no --fused-loss)"
    )
    needs_logits = True

    @dataclass
    class Options(KDOptions):
        uld_weight: float = option(
            1.0,
            "ULD: weight λ of the distillation term (GOLD's uld_distillation_weight, default 1; CE's is --ce-weight).",
        )

        def check(self) -> None:
            super().check()
            if not (math.isfinite(self.uld_weight) and self.uld_weight >= 0):
                raise ConfigError(f"--uld-weight must be >= 0, got {self.uld_weight}")

    def bins(self, student: StudentBins, batch: KDBatch, logits: Tensor | None = None) -> Bins:
        # Rank r of the teacher against rank r of the student: which ids hold them does not matter.
        own, p_rest = batch.teacher_own_logprobs, None
        if own is None:
            own, p_rest = batch.teacher_logprobs, batch.p_rest
        log_p_support, log_p_rest = teacher_bin_logprobs(own, p_rest, dtype=student.log_q_rest.dtype)
        log_p_support = log_p_support.sort(dim=-1, descending=True).values  # a sampled support is not sorted
        log_q_sorted, log_q_rest = student_sorted_bins(logits, own.shape[-1])
        return Bins(*join_bins(log_p_support, log_p_rest, log_q_sorted.to(log_p_support.dtype), log_q_rest))

    def per_position(self, bins: Bins) -> Tensor:
        return self.options.uld_weight * uld_distance(bins.log_p, bins.log_q)


@register
class CrossEntropyOnly(DistillLoss):
    name = "ce"
    summary = "no distillation: cross-entropy on the true tokens only (the baseline; kd is 0)"
    requires = ("target_ids",)

    def divergence(self, bins: Bins, batch: KDBatch) -> Tensor:
        return bins.log_q.new_zeros(())

    def combine(self, kd: Tensor, ce: Tensor | None) -> Tensor:
        return ce


def _merged_options() -> type:
    """Every registered loss's option fields in one dataclass (DistillConfig inherits it: one declaration each)."""
    classes = list(dict.fromkeys(cls.Options for cls in LOSSES.values()))
    leaves = [c for c in classes if not any(o is not c and issubclass(o, c) for o in classes)]
    owners: dict[str, type] = {}
    for c in leaves:
        for f in fields(c):
            owner = next(base for base in c.__mro__ if f.name in getattr(base, "__annotations__", {}))
            if owners.setdefault(f.name, owner) is not owner:
                raise TypeError(f"option {f.name!r} is declared by both {owners[f.name].__name__} and {owner.__name__}")
    return make_dataclass("LossOptions", [], bases=tuple(leaves))


LossOptions = _merged_options()
LossOptions.__doc__ = "The option fields of every registered loss, flat (DistillConfig inherits them)."
LOSS_NAMES: tuple[str, ...] = tuple(LOSSES)
DEFAULT_LOSS = "fkl"


def loss_help() -> str:
    """``--loss``'s help: every registered loss with its summary."""
    return "KD loss over the teacher's top-k + tail: " + "; ".join(f"{n}: {c.summary}" for n, c in LOSSES.items()) + "."


def build_loss(name: str, source: object = None, **options) -> DistillLoss:
    """A fresh loss ``name`` (no state yet) with its options read from ``source`` (any object with the option
    attributes, such as a DistillConfig, or a mapping), then from ``options``; missing ones keep their defaults.

    Option names that belong to other losses are ignored (one config serves every loss); unknown ones raise.
    """
    if name not in LOSSES:
        raise ConfigError(f"unknown loss {name!r}; valid names: {', '.join(LOSSES)}")
    known = {f.name for f in fields(LossOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown loss options {unknown}; the options are {sorted(known)}")
    cls = LOSSES[name]
    values = {}
    for f in fields(cls.Options):
        if f.name in options:
            values[f.name] = options[f.name]
        elif isinstance(source, dict) and f.name in source:
            values[f.name] = source[f.name]
        elif source is not None and not isinstance(source, dict) and hasattr(source, f.name):
            values[f.name] = getattr(source, f.name)
    return cls(cls.Options(**values))
