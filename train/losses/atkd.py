"""ATKD (Zhong et al. 2024, "Revisiting Knowledge Distillation for Autoregressive Language Models").

Reading of the official code (WHU-ZQH/ATKD, distill/distill_trainer.py, method `atkd` and `get_tckd_nckd`):

- UNC is the teacher's non-target mass 1 - p_g; the threshold is torch.median over the non-padding positions
  of the batch (lower middle value for an even count); easy = UNC < median, hard = the rest (UNC >= median).
- DKD is NOT weighted by 1 - p_g: `get_tckd_nckd` has the weighting behind `use_pnt=False` and is never
  called with it. TKD and DKD are each averaged over the non-padding positions of their own group.
- loss = alpha·DKD_easy + (1 - alpha)·(TKD_hard + DKD_hard), alpha defaulting to 0.2 (distill/train.py).
- Its "reverse" setting (swapping teacher and student) is not implemented here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kd_pipeline.train.losses.base import DistillLoss, KDBatch, register
from kd_pipeline.train.losses.bins import Bins, StudentBins, first_occurrence, join_bins, teacher_bin_logprobs
from kd_pipeline.train.losses.numerics import NEG_INF, _kl_sum, _safe_logsumexp, masked_mean


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


@register
class ATKD(DistillLoss):
    name = "atkd"
    needs_target_column = True
    requires = ("target_ids", "teacher_target_logprob")

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
