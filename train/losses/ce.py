"""The baseline without distillation: cross-entropy on the true tokens only."""

from __future__ import annotations

from torch import Tensor

from kd_pipeline.train.losses.base import DistillLoss, KDBatch, register
from kd_pipeline.train.losses.bins import Bins


@register
class CrossEntropyOnly(DistillLoss):
    name = "ce"
    requires = ("target_ids",)

    def divergence(self, bins: Bins, batch: KDBatch) -> Tensor:
        return bins.log_q.new_zeros(())

    def combine(self, kd: Tensor, ce: Tensor | None) -> Tensor:
        return ce
