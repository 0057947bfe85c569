"""ULD (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for
LLMs", arXiv 2402.12030).

Reading of the official code (Nicolas-BZRD/llm-recipes, models/distillation_model.py) and of TRL's GOLD trainer
(trl/experimental/gold/gold_trainer.py, ULDLoss):

- both distributions are sorted descending and compared rank by rank, the smaller vocabulary padded with zeros:
  ``Σ_r |p_(r) - q_(r)|`` per position (the closed-form Wasserstein-1 distance under a uniform cost between
  the sorted vectors), averaged over positions; no vocabulary mapping is needed;
- defaults: teacher and student temperature 1, distillation weight 1; cross-entropy weight 1 in the official
  code (``L = CE + λ·ULD``), 0 in GOLD; GOLD's hybrid variant uses it only for the ids without an exact match.

Over the cache's k + 1 bins (the teacher's sorted top-k and its tail; the student's own sorted top-k and the
mass outside it) the tail pair is one term, ``|p_rest - q_rest|``: a lower bound of the dense distance over the
remaining ranks (triangle inequality) that equals it once k covers both vocabularies.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kd_pipeline.train.losses.base import DistillLoss, KDBatch, register
from kd_pipeline.train.losses.bins import Bins, StudentBins, join_bins, student_bins, teacher_bin_logprobs
from kd_pipeline.train.losses.numerics import NEG_INF, _compute_dtype


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


@register
class ULD(DistillLoss):
    name = "uld"
    needs_logits = True

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
