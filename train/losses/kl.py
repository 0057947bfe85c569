"""The KL family on bins: fkl, rkl, js, sfkl, srkl (DistiLLM's skew KLs) and tvd."""

from __future__ import annotations

from torch import Tensor

from kd_pipeline.train.losses.base import DistillLoss, register
from kd_pipeline.train.losses.bins import Bins
from kd_pipeline.train.losses.numerics import (
    LOG_P_FLOOR,
    _kl_sum,
    _log_mix,
    forward_kl,
)


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


def total_variation(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Total variation distance ``½·Σ |p - q|`` per position [N], in [0, 1]. Empty bins (both -inf) add 0.

    Its gradient is ``±½·q`` per bin in log q (the sign of q - p; 0 where they are equal): bounded, and it does
    not grow where the student misses mass the way KL's does.
    """
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


@register
class ForwardKL(DistillLoss):
    name = "fkl"

    def per_position(self, bins: Bins) -> Tensor:
        return forward_kl(bins.log_p, bins.log_q)


@register
class ReverseKL(DistillLoss):
    name = "rkl"

    def per_position(self, bins: Bins) -> Tensor:
        return reverse_kl(bins.log_p, bins.log_q)


@register
class JensenShannon(DistillLoss):
    name = "js"

    def per_position(self, bins: Bins) -> Tensor:
        return js_divergence(bins.log_p, bins.log_q, beta=self.options.js_beta)


@register
class SkewForwardKL(DistillLoss):
    name = "sfkl"

    def per_position(self, bins: Bins) -> Tensor:
        return skew_forward_kl(bins.log_p, bins.log_q, alpha=self.options.skew_alpha)


@register
class SkewReverseKL(DistillLoss):
    name = "srkl"

    def per_position(self, bins: Bins) -> Tensor:
        return skew_reverse_kl(bins.log_p, bins.log_q, alpha=self.options.skew_alpha)


@register
class TotalVariation(DistillLoss):
    name = "tvd"

    def per_position(self, bins: Bins) -> Tensor:
        return total_variation(bins.log_p, bins.log_q)
