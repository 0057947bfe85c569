"""Several cached teachers (same tokenizer, aligned positions) combined into one k+1-bin target (docs/multi-teacher.md).

Per position, with weights ``w_i`` (``Σ w_i = 1``), supports ``S_i``, tails ``r_i`` and ``U = ∪ S_i``::

    p(u)   = Σ_{i: u ∈ S_i} w_i p_i(u)          u ∈ U   (teacher i's unknown mass on u ∉ S_i stays in its tail)
    p_rest = Σ_i w_i r_i
    log p(g) = logsumexp_i(log w_i + target_logprob_i)   (exact: each teacher's p_i(g) is cached)

The result is a support of width ``K = Σ k_i`` that every loss in train/losses.py takes unchanged, provided the
student's side of the empty (repeated-id) columns is emptied, as ``train.cross_tokenizer.empty_repeats`` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

NEG_INF = float("-inf")
_LAST = torch.iinfo(torch.int64).max  # sort key of empty columns: after every real id


def target_weights(target_logprobs: Sequence[Tensor], tau: float = 1.0, prior: Tensor | None = None) -> Tensor:
    """Per-position teacher weights ``w [N, T] = softmax_i(log prior_i + target_logprob_i / tau)``.

    ``target_logprobs``: T tensors [N], each teacher's log-prob of the true next token (cached even outside its
    top-k). ``tau`` > 0 (finite): 1 with a uniform prior gives ``w_i = p_i(g) / Σ_j p_j(g)``, the posterior over
    teachers after seeing g; large tau tends to the prior, small tau to the teacher best at g. ``prior`` [T]
    (default uniform). Rows where every teacher has ``-inf`` get the prior.
    """
    if not (0.0 < tau < float("inf")):
        raise ValueError(f"tau must be finite and > 0, got {tau}")
    x = torch.stack([t.double() for t in target_logprobs], dim=-1) / tau
    x = x.masked_fill(~torch.isfinite(x).any(-1, keepdim=True), 0.0)  # no information: fall back on the prior
    if prior is not None:
        x = x + prior.to(x).log()
    dtype = torch.promote_types(target_logprobs[0].dtype, torch.float32)
    return torch.softmax(x, dim=-1).to(dtype)


def combine_teachers(
    support_ids: Sequence[Tensor],
    logprobs: Sequence[Tensor],
    target_logprobs: Sequence[Tensor] | None,
    weights: Tensor,
    p_rests: Sequence[Tensor | None] | None = None,
    target_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The mixture ``Σ_i w_i p_i`` of T teachers on the union of their supports plus one rest bin.

    Inputs (i = 0..T-1, N positions):

    - ``support_ids[i]`` [N, k_i] int: teacher i's top-k ids (k_i may differ between teachers).
    - ``logprobs[i]`` [N, k_i] float: their log-probs over the full vocabulary. A ``-inf`` column is empty: its id
      is ignored (so padded or repeated columns may hold any id). Finite columns must have distinct ids within a
      row (the cache's contract). Rows whose ``Σ exp`` exceeds 1 (fp16 rounding) are renormalized, as
      ``train.losses.teacher_bin_logprobs`` does.
    - ``target_logprobs[i]`` [N] float, or None: teacher i's log-prob of the true next token.
    - ``weights`` [T] or [N, T], >= 0: static or per-position (:func:`target_weights`); normalized over T here.
    - ``p_rests[i]`` [N] or None: teacher i's tail mass, overriding ``max(0, 1 - Σ exp(logprobs[i]))``.
    - ``target_ids`` [N] int, optional: the true next token g. Where g is in the union but outside some ``S_i``,
      teacher i's mass on g is *known* (``exp(target_logprobs[i])``): it is moved from that teacher's tail into
      g's bin, so g's bin is exact (and agrees with the combined target log-prob, as ATKD expects). No other id
      is touched. Needs ``target_logprobs``.

    Returns, with ``K = Σ k_i`` and compute dtype float32 (float64 if any float input is float64):

    - ``ids`` [N, K] int64: the union, sorted by descending combined probability (ties: smaller id first), so
      column 0 is the argmax of the combined bins. Empty columns (the union is smaller than K, or an id's
      combined mass is 0) repeat column 0's id; a row with no mass at all gets id 0 everywhere.
    - ``logprobs`` [N, K]: ``log p(u)``, ``-inf`` in empty columns.
    - ``p_rest`` [N]: ``Σ_i w_i r_i`` (pass it as ``KDBatch.p_rest``: ``1 - Σ p`` would cancel badly).
    - ``target_logprob`` [N] or None: ``logsumexp_i(log w_i + target_logprobs[i])``.

    Teacher-side only: nothing here needs gradients. No loop over positions.
    """
    floats = [*logprobs, weights, *(target_logprobs or ()), *(r for r in (p_rests or ()) if r is not None)]
    dtype = torch.float64 if any(x.dtype == torch.float64 for x in floats) else torch.float32
    n, t = support_ids[0].shape[0], len(support_ids)
    if target_ids is not None and target_logprobs is None:
        raise ValueError("target_ids needs target_logprobs")
    w = weights.to(dtype).expand(n, t)
    w = w / w.sum(-1, keepdim=True)
    log_w = w.log()  # w_i = 0 -> -inf: that teacher adds nothing

    lps, rests = [], []
    for i, lp in enumerate(logprobs):
        lp = lp.to(dtype)
        lse = torch.logsumexp(lp, dim=-1, keepdim=True)  # -inf for an all-empty row
        lp = lp - lse.clamp_min(0.0)
        rest = p_rests[i] if p_rests is not None and p_rests[i] is not None else -torch.expm1(lse.squeeze(-1))
        lps.append(lp)
        rests.append(rest.to(dtype).clamp_min(0.0))
    ids = [s.long() for s in support_ids]
    cols_id = list(ids)
    cols_a = [log_w[:, i : i + 1] + lp for i, lp in enumerate(lps)]

    if target_ids is not None:  # move each teacher's known mass on g out of its tail, where g has a bin
        g = target_ids.long().unsqueeze(-1)
        has = torch.stack([((s == g) & torch.isfinite(lp)).any(-1) for s, lp in zip(ids, lps)], dim=-1)  # [N, T]
        move = has.any(-1, keepdim=True) & ~has
        for i, tlp in enumerate(target_logprobs):
            moved = torch.where(move[:, i], torch.minimum(tlp.to(dtype).exp(), rests[i]), 0.0)
            rests[i] = rests[i] - moved
            cols_id.append(g)
            cols_a.append(log_w[:, i : i + 1] + moved.log().unsqueeze(-1))

    # Merge by id: sort the concatenated ids (empty columns last), log-sum-exp each run of equal ids.
    a = torch.cat(cols_a, dim=-1)
    key, order = torch.cat(cols_id, dim=-1).masked_fill(torch.isneginf(a), _LAST).sort(dim=-1)
    a = a.gather(-1, order)
    new_run = torch.ones_like(key, dtype=torch.bool)
    new_run[:, 1:] = key[:, 1:] != key[:, :-1]
    slot = new_run.long().cumsum(-1) - 1
    m = torch.full_like(a, NEG_INF).scatter_reduce(-1, slot, a, "amax")
    m = torch.where(torch.isfinite(m), m, 0.0)
    s = torch.zeros_like(a).scatter_add(-1, slot, (a - m.gather(-1, slot)).exp())
    merged = s.log() + m  # -inf for the empty run and unused slots
    merged_id = torch.zeros_like(key).scatter(-1, slot, key)

    # By descending probability; a stable sort keeps ties in id order. Empty columns repeat column 0's id.
    out_lp, order = merged.sort(dim=-1, descending=True, stable=True)
    out_id = merged_id.gather(-1, order)
    valid = torch.isfinite(out_lp)
    first = torch.where(valid[:, :1], out_id[:, :1], 0)
    out_id = torch.where(valid, out_id, first)
    k_total = sum(s.shape[-1] for s in support_ids)  # distinct non-empty ids <= Σ k_i, even with the g columns

    p_rest = (w * torch.stack(rests, dim=-1)).sum(-1)
    target = None
    if target_logprobs is not None:
        target = torch.logsumexp(log_w + torch.stack([x.to(dtype) for x in target_logprobs], dim=-1), dim=-1)
    return out_id[:, :k_total], out_lp[:, :k_total], p_rest, target
