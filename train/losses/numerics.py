"""Shared numerics of the losses: log-space helpers, masked means, and the three measures every loss reports
(``forward_kl`` as ``kl``, ``soft_cross_entropy`` as ``soft_ce``, ``cross_entropy`` as ``ce``).

Per-position measures take bins ``log_p, log_q`` [N, B] (teacher, student log-probs; an empty bin is ``-inf``) and
return [N]; gradients flow through ``log_q`` only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

NEG_INF = float("-inf")

# Reverse-KL-type terms weigh log p by q: a bin the teacher gives exactly zero mass (p_rest = 0 after fp16
# rounding, or an underflowed log-prob) would cost +inf. Floor the teacher's log-prob there: p >= e^-100
# (~3.7e-44, below fp32's normal range), a large but finite penalty. Only `rkl` needs it (the mixtures in
# js/sfkl/srkl stay positive wherever q does).
LOG_P_FLOOR = -100.0

Scalar = float | Tensor


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


def forward_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(p ‖ q) = Σ p (log p - log q)`` per position [N]."""
    return _kl_sum(log_p, log_q)


def soft_cross_entropy(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``-Σ p log q`` per position [N] = ``KL(p ‖ q) + H(p)``: the cross-entropy form of the forward KL.

    Bins with ``p = 0`` contribute 0 (whatever ``log q`` is).
    """
    pos = ~torch.isneginf(log_p)
    return -torch.where(pos, log_p.masked_fill(~pos, 0.0).exp() * log_q.masked_fill(~pos, 0.0), 0.0).sum(-1)


def cross_entropy(log_q_target: Tensor) -> Tensor:
    """``-log q_g`` per position [N] for the true next token g (which may lie outside the support)."""
    return -log_q_target
