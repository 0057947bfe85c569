"""TAID (Shing et al. 2025, arXiv 2501.16937): KL to an interpolation of student and teacher, with the
interpolation weight t scheduled adaptively up to the teacher (:class:`TAIDSchedule`, the loss's state)."""

from __future__ import annotations

import math

from torch import Tensor

from kd_pipeline.errors import ConfigError
from kd_pipeline.train.losses.base import DistillLoss, register
from kd_pipeline.train.losses.bins import Bins
from kd_pipeline.train.losses.numerics import Scalar, _as_column, _kl_sum, _safe_logsumexp, _scale_log


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


@register
class TAID(DistillLoss):
    name = "taid"

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
