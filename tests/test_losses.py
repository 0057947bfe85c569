"""Sparse-support KD losses (train/losses/) against dense float64 references written from the formulas."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from kd_pipeline.cache.format.rows import tail_mass
from kd_pipeline.train.losses import (
    LOSS_NAMES,
    KDBatch,
    StudentBins,
    TAIDSchedule,
    atkd_hard_mask,
    atkd_loss,
    atkd_terms,
    build_loss,
    coarse_bins,
    forward_kl,
    join_bins,
    masked_mean,
    student_bin_logprobs,
    student_bins,
    taid_kl,
    taid_target,
    teacher_bin_logprobs,
)

F64 = torch.float64
ALL = ["taid", "fkl", "rkl", "js", "sfkl", "srkl", "tvd", "atkd"]  # every distilling loss, each with a reference
T_TAID = 0.63
BETA_JS = 0.5
ALPHA_SKEW = 0.1
ALPHA_ATKD = 0.2


# ---------------------------------------------------------------------------------------------------------
# Dense references (float64, straight from the formulas; probabilities assumed > 0)


def ref_kl(P, Q):
    return (P * (P.log() - Q.log())).sum(-1)


def ref_per_position(name, P, Q):
    if name == "fkl":
        return ref_kl(P, Q)
    if name == "rkl":
        return ref_kl(Q, P)
    if name == "js":
        M = BETA_JS * P + (1 - BETA_JS) * Q
        return BETA_JS * ref_kl(P, M) + (1 - BETA_JS) * ref_kl(Q, M)
    if name == "sfkl":
        return ref_kl(P, ALPHA_SKEW * P + (1 - ALPHA_SKEW) * Q)
    if name == "srkl":
        return ref_kl(Q, (1 - ALPHA_SKEW) * P + ALPHA_SKEW * Q)
    if name == "taid":
        Pt = torch.softmax((1 - T_TAID) * Q.detach().log() + T_TAID * P.log(), dim=-1)
        return ref_kl(Pt, Q)
    if name == "tvd":
        return 0.5 * (P - Q).abs().sum(-1)
    raise KeyError(name)


def ref_temper(P, T):
    """A distribution over its last dim at temperature T: P^(1/T), renormalized."""
    return torch.softmax(P.log() / T, dim=-1)


def ref_atkd_terms_row(P, Q, g):
    """TKD and DKD of one position from probabilities P, Q [B] and the target's bin index g."""
    pg, qg = P[g], Q[g]
    tkd = pg * torch.log(pg / qg) + (1 - pg) * torch.log((1 - pg) / (1 - qg))
    others = torch.arange(P.shape[0]) != g
    ph, qh = P[others] / (1 - pg), Q[others] / (1 - qg)
    return tkd, (ph * torch.log(ph / qh)).sum()


def ref_atkd(tkd, dkd, unc, mask, alpha=ALPHA_ATKD):
    med = torch.median(unc[mask])  # torch: lower of the two middle values, as in the official code
    hard = mask & (unc >= med)
    easy = mask & ~hard
    e = dkd[easy].mean() if easy.any() else torch.zeros((), dtype=F64)
    h = (tkd + dkd)[hard].mean() if hard.any() else torch.zeros((), dtype=F64)
    return alpha * e + (1 - alpha) * h


def ref_masked_mean(v, mask):
    return v[mask].mean()


# ---------------------------------------------------------------------------------------------------------
# Cases


def make_case(n, v, k, seed, t_scale=2.0, s_scale=2.0):
    """Dense teacher/student over V, the teacher's support (top-k, or all ids shuffled when k == V), targets
    both inside and outside the support, and a mask with some positions off."""
    gen = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(torch.randn(n, v, generator=gen, dtype=F64) * t_scale, -1)
    z = (torch.randn(n, v, generator=gen, dtype=F64) * s_scale).requires_grad_(True)
    if k == v:
        ids = torch.argsort(torch.rand(n, v, generator=gen), dim=-1)
    else:
        ids = torch.topk(logp, k, dim=-1).indices
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[0] = ids[0, min(1, k - 1)]  # inside the support
    if k < v:  # and outside it
        outside = torch.ones(v, dtype=torch.bool)
        outside[ids[1]] = False
        targets[1] = torch.nonzero(outside)[0, 0]
    mask = torch.rand(n, generator=gen) > 0.25
    mask[:2] = True
    compl = torch.ones(n, v, dtype=torch.bool).scatter(-1, ids, False)
    p_rest64 = (logp.exp() * compl).sum(-1)
    return dict(
        logp=logp,
        z=z,
        ids=ids,
        targets=targets,
        mask=mask,
        compl=compl,
        p_rest64=p_rest64,
        tlp=logp.gather(-1, targets[:, None]).squeeze(-1),
    )


def batch_of(c, p_rest=None):
    return KDBatch(
        support_ids=c["ids"],
        teacher_logprobs=c["logp"].gather(-1, c["ids"]),
        mask=c["mask"],
        target_ids=c["targets"],
        teacher_target_logprob=c["tlp"],
        p_rest=p_rest,
    )


def make_loss(name, t=T_TAID, **options):
    """The registered loss ``name`` with these options (others' ignored); TAID's schedule state set to ``t``."""
    loss = build_loss(name, **options)
    if name == "taid":  # its t is schedule state: start it at t
        loss.load_state_dict({"t": t, "m": 0.0, "prev_loss": None})
    return loss


def kd(name, batch, z=None, *, student=None, t=T_TAID, **options):
    """The loss's output (KDLossOutput) on a batch."""
    return make_loss(name, t=t, **options)(batch, z, student=student)


def loss_of(name, c, z=None, p_rest=None, **kw):
    options = dict(js_beta=BETA_JS, skew_alpha=ALPHA_SKEW, atkd_alpha=ALPHA_ATKD, **kw)
    return kd(name, batch_of(c, p_rest), c["z"] if z is None else z, **options).total


def coarse(prob, c):
    """[N, V] probabilities -> [N, k+1] on the support and the rest (summed over the complement)."""
    return torch.cat([prob.gather(-1, c["ids"]), (prob * c["compl"]).sum(-1, keepdim=True)], -1)


def ref_atkd_coarse(P_dense, Q_dense, c, T=1.0):
    """ATKD reference on the bins S ∪ {g} ∪ rest, built row by row from the dense distributions."""
    tk, dk = [], []
    for i in range(P_dense.shape[0]):
        ids = c["ids"][i].tolist()
        g = int(c["targets"][i])
        if g not in ids:
            ids = ids + [g]
        inside = torch.zeros(P_dense.shape[1], dtype=torch.bool)
        inside[ids] = True
        P = torch.cat([P_dense[i, ids], P_dense[i, ~inside].sum().view(1)])
        Q = torch.cat([Q_dense[i, ids], Q_dense[i, ~inside].sum().view(1)])
        if P[-1] == 0 and Q[-1] == 0:  # the complement is empty: no rest bin
            P, Q = P[:-1], Q[:-1]
        if T != 1.0:
            P, Q = ref_temper(P, T), ref_temper(Q, T)
        t, d = ref_atkd_terms_row(P, Q, ids.index(g))
        tk.append(t)
        dk.append(d)
    return torch.stack(tk), torch.stack(dk)


def reference(name, c, P_dense, Q_dense, coarse_grain, T=1.0):
    """The loss from the formulas; at temperature T the bins are tempered (each side's bin distribution to the
    power 1/T, renormalized; with k = V simply softmax(z / T)) and the value scaled by T²."""
    if name == "atkd":
        if coarse_grain:
            tkd, dkd = ref_atkd_coarse(P_dense, Q_dense, c, T)
        else:
            P, Q = ref_temper(P_dense, T), ref_temper(Q_dense, T)
            rows = [ref_atkd_terms_row(P[i], Q[i], int(c["targets"][i])) for i in range(len(P))]
            tkd, dkd = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
        # UNC is the teacher's as cached (T = 1), whatever the temperature.
        return T * T * ref_atkd(tkd, dkd, -torch.expm1(c["tlp"]), c["mask"])
    P, Q = (coarse(P_dense, c), coarse(Q_dense, c)) if coarse_grain else (P_dense, Q_dense)
    return T * T * ref_masked_mean(ref_per_position(name, ref_temper(P, T), ref_temper(Q, T)), c["mask"])


# ---------------------------------------------------------------------------------------------------------
# Equivalence with the dense references


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("name", ALL)
def test_k_equals_v_matches_dense(name, temperature):
    """k = V: the dense loss; at temperature T, T²·D(softmax(log p / T), softmax(z / T)). Value and gradient."""
    c = make_case(n=9, v=13, k=13, seed=1)
    got = loss_of(name, c, temperature=temperature)  # p_rest from tail_mass (fp32 noise): the empty rest bin absorbs it
    z_ref = c["z"].detach().clone().requires_grad_(True)
    want = reference(name, c, c["logp"].exp(), torch.softmax(z_ref, -1), coarse_grain=False, T=temperature)
    assert got.dtype == F64
    assert abs(got.item() - want.item()) < 1e-10
    (g_got,) = torch.autograd.grad(got, c["z"])
    (g_want,) = torch.autograd.grad(want, z_ref)
    assert torch.allclose(g_got, g_want, atol=1e-10, rtol=0)


def test_k_equals_v_ce_matches_dense():
    c = make_case(n=9, v=13, k=13, seed=2)
    parts = kd("fkl", batch_of(c), c["z"], ce_weight=0.3)
    ce_ref = ref_masked_mean(-torch.log_softmax(c["z"], -1).gather(-1, c["targets"][:, None]).squeeze(-1), c["mask"])
    assert abs(parts.ce.item() - ce_ref.item()) < 1e-12
    assert abs(parts.total.item() - (parts.kd + 0.3 * parts.ce).item()) < 1e-12


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("name", ALL)
def test_k_less_than_v_matches_coarse_grained(name, temperature):
    """k < V: the loss between the coarse-grained k+1 bin distributions; at temperature T the bins (the tail one
    category) are tempered on both sides, then the loss times T². Value and gradient."""
    c = make_case(n=10, v=17, k=5, seed=3)
    z_ref = c["z"].detach().clone().requires_grad_(True)
    want = reference(name, c, c["logp"].exp(), torch.softmax(z_ref, -1), coarse_grain=True, T=temperature)
    exact = loss_of(name, c, p_rest=c["p_rest64"], temperature=temperature)  # float64 tail: exact
    assert abs(exact.item() - want.item()) < 1e-10
    (g_got,) = torch.autograd.grad(exact, c["z"])
    (g_want,) = torch.autograd.grad(want, z_ref)
    assert torch.allclose(g_got, g_want, atol=1e-10, rtol=0)
    cached = loss_of(name, c, temperature=temperature)  # tail_mass (fp32) as the cache defines it
    assert abs(cached.item() - want.item()) < 1e-6


def test_atkd_coarse_covers_both_target_cases():
    c = make_case(n=10, v=17, k=5, seed=3)
    in_s = (c["ids"] == c["targets"][:, None]).any(-1)
    assert in_s.any() and (~in_s).any()


def test_atkd_support_all_but_target():
    """k = V-1 with g outside: the target bin takes the whole tail and the rest bin is empty."""
    c = make_case(n=6, v=8, k=7, seed=4)
    c["targets"] = torch.tensor([int(torch.nonzero(c["compl"][i])[0, 0]) for i in range(6)])
    c["tlp"] = c["logp"].gather(-1, c["targets"][:, None]).squeeze(-1)
    got = loss_of("atkd", c, p_rest=c["p_rest64"])
    want = reference("atkd", c, c["logp"].exp(), torch.softmax(c["z"], -1), coarse_grain=True)
    assert abs(got.item() - want.item()) < 1e-10
    (g,) = torch.autograd.grad(loss_of("atkd", c), c["z"])
    assert torch.isfinite(g).all()


# ---------------------------------------------------------------------------------------------------------
# Gradients


def _gradcheck_case(name, c):
    z0 = c["z"].detach().clone().requires_grad_(True)
    if name != "taid":
        assert torch.autograd.gradcheck(lambda z: loss_of(name, c, z=z), (z0,), eps=1e-6, atol=1e-6)
        return
    # TAID's value depends on q through the stop-gradient target, so finite differences of the loss are not
    # its gradient. Check instead: (a) its gradient equals that of KL(p_t ‖ q(z)) with p_t frozen at z0, and
    # (b) gradcheck that frozen-target function.
    b = batch_of(c)

    def frozen(z, log_pt):
        sb = student_bins(z, b.support_ids)
        lp_s, lp_r = teacher_bin_logprobs(b.teacher_logprobs)
        _, log_q = join_bins(lp_s, lp_r, sb.log_q_support, sb.log_q_rest)
        return masked_mean(forward_kl(log_pt, log_q), b.mask)

    sb0 = student_bins(z0, b.support_ids)
    lp_s, lp_r = teacher_bin_logprobs(b.teacher_logprobs)
    log_p0, log_q0 = join_bins(lp_s, lp_r, sb0.log_q_support, sb0.log_q_rest)
    log_pt = taid_target(log_p0, log_q0, T_TAID)
    (g_taid,) = torch.autograd.grad(loss_of("taid", c, z=z0), z0)
    (g_frozen,) = torch.autograd.grad(frozen(z0, log_pt), z0)
    assert torch.allclose(g_taid, g_frozen, atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(lambda z: frozen(z, log_pt), (z0,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_gradcheck(name):
    _gradcheck_case(name, make_case(n=5, v=7, k=3, seed=5))


@pytest.mark.parametrize("name", ALL)
def test_gradcheck_tiny_student_rest(name):
    c = make_case(n=5, v=7, k=3, seed=6)
    with torch.no_grad():
        c["z"].scatter_add_(-1, c["ids"], torch.full(c["ids"].shape, 25.0, dtype=F64))  # q_rest ~ 1e-11
    log_q_s, log_q_rest = student_bin_logprobs(c["z"], c["ids"])
    assert (log_q_rest < -20).all()
    _gradcheck_case(name, c)


# ---------------------------------------------------------------------------------------------------------
# Student / teacher bins


def test_student_bins_match_dense():
    c = make_case(n=6, v=11, k=4, seed=7)
    log_q = torch.log_softmax(c["z"], -1)
    sb = student_bins(c["z"], c["ids"], c["targets"])
    assert torch.allclose(sb.log_q_support, log_q.gather(-1, c["ids"]), atol=1e-12)
    rest = torch.log((log_q.exp() * c["compl"]).sum(-1))
    assert torch.allclose(sb.log_q_rest, rest, atol=1e-12)
    assert torch.allclose(sb.lse, torch.logsumexp(c["z"], -1), atol=1e-12)
    assert torch.allclose(sb.log_q_target, log_q.gather(-1, c["targets"][:, None]).squeeze(-1), atol=1e-12)
    # a "valid" mask empties repeated columns
    ids = torch.cat([c["ids"], c["ids"][:, :1]], -1)
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[:, -1] = False
    lqs, lqr = student_bin_logprobs(c["z"], ids, valid)
    assert torch.isneginf(lqs[:, -1]).all() and torch.allclose(lqr, rest, atol=1e-12)


def test_student_rest_exact_where_one_minus_sum_fails():
    """fp32 logits whose support holds all but ~e-60 of the mass: log q_rest is still exact and finite."""
    z = torch.zeros(3, 50)
    ids = torch.arange(10).expand(3, 10).contiguous()
    z[:, :10] = 60.0
    z.requires_grad_(True)
    _, log_q_rest = student_bin_logprobs(z, ids)
    want = math.log(40) - 60 - math.log(10)
    assert torch.allclose(log_q_rest, torch.full((3,), want), atol=1e-4)
    log_q_rest.sum().backward()
    assert torch.isfinite(z.grad).all()


def test_teacher_bins_use_tail_mass_and_safe_log():
    lp = torch.tensor([[math.log(0.5), math.log(0.3)], [0.0, -30.0]])
    log_p_s, log_p_rest = teacher_bin_logprobs(lp.half())
    assert log_p_s.dtype == torch.float32
    assert torch.allclose(log_p_rest.exp(), tail_mass(lp.half()), atol=1e-7)
    assert abs(log_p_rest[0].item() - math.log(0.2)) < 1e-3
    assert torch.isneginf(log_p_rest[1])  # p_rest exactly zero: -inf, never nan
    assert torch.allclose(log_p_s[1].exp().sum(), torch.tensor(1.0))


def test_fused_path_bins_give_same_loss():
    """Precomputed StudentBins (what a chunked hidden-state path would produce) reuse every loss unchanged."""
    c = make_case(n=7, v=12, k=4, seed=8)
    for name in ALL:
        sb = student_bins(c["z"], c["ids"], c["targets"], include_target=(name == "atkd"))
        sb = StudentBins(*(None if x is None else x.detach() for x in sb))
        a = kd(name, batch_of(c), student=sb, ce_weight=0.5).total
        b = kd(name, batch_of(c), c["z"], ce_weight=0.5).total
        assert abs(a.item() - b.item()) < 1e-12


def test_leading_dims_are_flattened():
    c = make_case(n=8, v=10, k=4, seed=9)
    flat = loss_of("fkl", c)
    b = batch_of(c)
    shaped = KDBatch(
        b.support_ids.view(2, 4, 4),
        b.teacher_logprobs.view(2, 4, 4),
        b.mask.view(2, 4),
        b.target_ids.view(2, 4),
        b.teacher_target_logprob.view(2, 4),
    )
    assert abs(kd("fkl", shaped, c["z"].view(2, 4, 10)).total.item() - flat.item()) < 1e-12


# ---------------------------------------------------------------------------------------------------------
# Masking


@pytest.mark.parametrize("name", ALL)
def test_masked_positions_do_not_matter(name):
    c = make_case(n=10, v=12, k=4, seed=10)
    off = ~c["mask"]
    assert off.any()
    base = loss_of(name, c, ce_weight=0.5)
    # Garbage (extreme but finite) at the masked-off positions: logits, teacher log-probs, target log-probs.
    z2 = c["z"].detach().clone()
    z2[off] = torch.where(torch.rand(int(off.sum()), 12) > 0.5, 1e4, -1e4).to(F64)
    z2.requires_grad_(True)
    c2 = dict(c)
    c2["logp"] = c["logp"].clone()
    c2["logp"][off] = -1e4
    c2["tlp"] = c["tlp"].clone()
    c2["tlp"][off] = 0.0  # UNC = 0 there: would shift the ATKD median if it were not masked out
    got = loss_of(name, c2, z=z2, ce_weight=0.5)
    assert abs(got.item() - base.item()) < 1e-10
    (g,) = torch.autograd.grad(got, z2)
    assert torch.isfinite(g).all()
    assert (g[off] == 0).all()
    assert (g[c["mask"]].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("name", ALL)
def test_empty_mask_gives_zero(name):
    c = make_case(n=6, v=9, k=3, seed=11)
    c["mask"] = torch.zeros(6, dtype=torch.bool)
    out = loss_of(name, c, ce_weight=1.0)
    assert out.item() == 0.0
    (g,) = torch.autograd.grad(out, c["z"])
    assert (g == 0).all()


def test_masked_mean():
    v = torch.tensor([1.0, float("inf"), 3.0, float("nan")], requires_grad=True)
    m = torch.tensor([True, False, True, False])
    out = masked_mean(v, m)
    assert out.item() == 2.0
    out.backward()
    assert v.grad.tolist() == [0.5, 0.0, 0.5, 0.0]
    assert masked_mean(v, torch.zeros(4, dtype=torch.bool)).item() == 0.0


# ---------------------------------------------------------------------------------------------------------
# ATKD


def test_atkd_hand_computed():
    p = [0.5, 0.3, 0.15, 0.05]
    q = [0.4, 0.4, 0.1, 0.1]
    tkd = 0.3 * math.log(0.3 / 0.4) + 0.7 * math.log(0.7 / 0.6)
    dkd = sum((a / 0.7) * math.log((a / 0.7) / (b / 0.6)) for a, b in [(0.5, 0.4), (0.15, 0.1), (0.05, 0.1)])
    log_p = torch.log(torch.tensor([p], dtype=F64))
    log_q = torch.log(torch.tensor([q], dtype=F64))
    is_t = torch.tensor([[False, True, False, False]])
    t_got, d_got = atkd_terms(log_p, log_q, is_t)
    assert abs(t_got.item() - tkd) < 1e-12 and abs(d_got.item() - dkd) < 1e-12
    kl = sum(a * math.log(a / b) for a, b in zip(p, q))
    assert abs(kl - (tkd + 0.7 * dkd)) < 1e-12
    # A single position is its own median: hard, so the loss is (1 - α)·(TKD + DKD).
    one = torch.ones(1, dtype=torch.bool)
    got = atkd_loss(t_got, d_got, torch.tensor([0.7], dtype=F64), one, alpha=0.2)
    assert abs(got.item() - 0.8 * (tkd + dkd)) < 1e-12
    # Same case through the full pipeline (logits + support with the target outside it: V = 4, k = 2).
    batch = KDBatch(
        support_ids=torch.tensor([[0, 2]]),
        teacher_logprobs=torch.log(torch.tensor([[0.5, 0.15]], dtype=F64)),
        mask=one,
        target_ids=torch.tensor([1]),
        teacher_target_logprob=torch.log(torch.tensor([0.3], dtype=F64)),
        p_rest=torch.tensor([0.35], dtype=F64),
    )
    full = kd("atkd", batch, log_q.clone(), atkd_alpha=0.2).total
    assert abs(full.item() - 0.8 * (tkd + dkd)) < 1e-12


def test_atkd_identity_on_dense():
    c = make_case(n=12, v=15, k=15, seed=12, t_scale=3.0)
    log_p, log_q = c["logp"], torch.log_softmax(c["z"].detach(), -1)
    is_t = torch.zeros_like(log_p, dtype=torch.bool).scatter(-1, c["targets"][:, None], True)
    tkd, dkd = atkd_terms(log_p, log_q, is_t)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    p_g = c["tlp"].exp()
    assert torch.allclose(kl, tkd + (1 - p_g) * dkd, atol=1e-12)
    assert (tkd >= -1e-15).all() and (dkd >= -1e-15).all()


def test_atkd_median_split():
    unc = torch.tensor([0.9, 0.1, 0.5, 0.7, 0.3, 0.0], dtype=F64)
    mask = torch.tensor([True, True, True, True, True, False])
    # masked values 0.1 0.3 0.5 0.7 0.9: median 0.5 -> hard {0.5, 0.7, 0.9}; the masked-off 0.0 is ignored
    assert atkd_hard_mask(unc, mask).tolist() == [True, False, True, True, False, False]
    # even count: torch's lower median (0.3 of 0.1 0.3 0.5 0.7), as the official code uses torch.median
    mask4 = torch.tensor([False, True, True, True, True, False])
    assert atkd_hard_mask(unc, mask4).tolist() == [False, False, True, True, True, False]
    assert atkd_hard_mask(unc, torch.zeros(6, dtype=torch.bool)).tolist() == [False] * 6
    # the weighting: easy positions get α·DKD only, hard ones (1-α)·(TKD + DKD), each group averaged apart
    tkd = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 100.0], dtype=F64)
    dkd = torch.tensor([10.0, 20.0, 30.0, 40.0, 50.0, 100.0], dtype=F64)
    want = 0.2 * (20.0 + 50.0) / 2 + 0.8 * ((11.0 + 33.0 + 44.0) / 3)
    assert abs(atkd_loss(tkd, dkd, unc, mask, alpha=0.2).item() - want) < 1e-12
    # all hard (no easy group): no nan
    same = torch.full((6,), 0.4, dtype=F64)
    assert abs(atkd_loss(tkd, dkd, same, mask, alpha=0.2).item() - 0.8 * (11 + 22 + 33 + 44 + 55) / 5) < 1e-12


# ---------------------------------------------------------------------------------------------------------
# Robustness: no nan/inf


def _all_finite(c, names=ALL, z=None, **kw):
    for name in names:
        zz = c["z"] if z is None else z
        out = loss_of(name, c, z=zz, ce_weight=0.1, **kw)
        (g,) = torch.autograd.grad(out, zz)
        assert torch.isfinite(out), name
        assert torch.isfinite(g).all(), name


def test_exactly_zero_teacher_tail():
    c = make_case(n=6, v=10, k=4, seed=13)
    # the teacher puts all its mass on the support; the student does not
    lp = c["logp"].gather(-1, c["ids"])
    c["logp"] = torch.full_like(c["logp"], -1e4).scatter(-1, c["ids"], lp - torch.logsumexp(lp, -1, keepdim=True))
    c["tlp"] = c["logp"].gather(-1, c["targets"][:, None]).squeeze(-1)
    _all_finite(c, p_rest=torch.zeros(6, dtype=F64))
    _all_finite(c)  # tail_mass of these (fp32) is 0 or rounding noise


def test_very_negative_teacher_logprobs():
    c = make_case(n=6, v=10, k=4, seed=14)
    c["logp"] = c["logp"].clone()
    c["logp"][:3] = -1e4  # support log-probs -1e4: p_rest = 1 for those rows
    c["tlp"] = torch.full((6,), -1e4, dtype=F64)
    for dt in (F64, torch.float32):
        cc = dict(c, logp=c["logp"].to(dt), tlp=c["tlp"].to(dt))
        z = c["z"].detach().to(dt).requires_grad_(True)
        _all_finite(cc, z=z)


def test_fp16_teacher_logprobs_summing_above_one():
    v, k, n = 40, 4, 8
    gen = torch.Generator().manual_seed(15)
    logits = torch.randn(n, v, generator=gen) * 0.1
    logits[:, :k] += torch.tensor([12.0, 11.0, 10.5, 10.0])
    lp = torch.log_softmax(logits.double(), -1)
    lp16 = lp[:, :k].half()
    over = lp16.float().exp().sum(-1) > 1
    # nudge each row's top log-prob up by fp16 ulps until the rounded support sums above one everywhere
    for _ in range(64):
        if over.all():
            break
        top = lp16[:, 0]
        lp16[:, 0] = torch.where(over, top, torch.nextafter(top, torch.zeros_like(top)))
        over = lp16.float().exp().sum(-1) > 1
    assert (tail_mass(lp16) == 0).all()
    log_p_s, log_p_rest = teacher_bin_logprobs(lp16)
    assert torch.isneginf(log_p_rest).all()
    assert torch.allclose(log_p_s.exp().sum(-1), torch.ones(n), atol=1e-6)  # renormalized
    ids = torch.arange(k).expand(n, k).contiguous()
    targets = torch.tensor([0, 1, 2, 3, 5, 6, 7, 8])
    batch = KDBatch(
        ids, lp16, torch.ones(n, dtype=torch.bool), targets, lp.gather(-1, targets[:, None]).squeeze(-1).half()
    )
    for name in ALL:
        z = torch.randn(n, v, generator=gen, requires_grad=True)
        out = kd(name, batch, z, t=0.5, ce_weight=0.1).total
        (g,) = torch.autograd.grad(out, z)
        assert torch.isfinite(out) and torch.isfinite(g).all(), name
        assert out.item() > -1e-5, name  # no visibly negative divergence from the excess mass


def test_student_tail_underflows_in_fp32():
    c = make_case(n=6, v=10, k=4, seed=16)
    z = c["z"].detach().float()
    z.scatter_add_(-1, c["ids"], torch.full(c["ids"].shape, 200.0))  # q_rest ~ e^-200: 0 in fp32
    z.requires_grad_(True)
    _, lqr = student_bin_logprobs(z, c["ids"])
    assert torch.isfinite(lqr).all() and (lqr.exp() == 0).all()
    _all_finite(dict(c, logp=c["logp"].float(), tlp=c["tlp"].float()), z=z)


def test_taid_endpoints():
    """t = 0: the target is q itself (loss 0); t = 1: TAID is forward KL."""
    c = make_case(n=6, v=9, k=4, seed=17)
    b = batch_of(c, c["p_rest64"])
    assert abs(kd("taid", b, c["z"], t=0.0).kd.item()) < 1e-12
    assert abs(kd("taid", b, c["z"], t=1.0).kd.item() - kd("fkl", b, c["z"]).kd.item()) < 1e-12
    # with a zero teacher tail, t = 0 still gives exactly q (0·log 0 = 0) and t = 1 stays finite
    zero = torch.zeros(6, dtype=F64)
    assert abs(kd("taid", batch_of(c, zero), c["z"], t=0.0).kd.item()) < 1e-12
    assert torch.isfinite(kd("taid", batch_of(c, zero), c["z"], t=1.0).kd)


# ---------------------------------------------------------------------------------------------------------
# Dispatcher


def test_bad_name_lists_valid_names():
    with pytest.raises(ValueError, match="taid, fkl, rkl, js, sfkl, srkl, tvd, atkd, uld, ce"):
        build_loss("kl")


def test_join_bins_empties_teacher_rest_only_when_student_rest_is_empty():
    lp_s = torch.log(torch.tensor([[0.6, 0.4], [0.5, 0.3]]))
    lp_r = torch.log(torch.tensor([1e-7, 0.2]))
    lq_s = torch.log(torch.tensor([[0.5, 0.5], [0.4, 0.4]]))
    lq_r = torch.tensor([float("-inf"), math.log(0.2)])
    log_p, _ = join_bins(lp_s, lp_r, lq_s, lq_r)
    assert torch.isneginf(log_p[0, -1]) and abs(log_p[1, -1].item() - math.log(0.2)) < 1e-6


# ---------------------------------------------------------------------------------------------------------
# TAID schedule


def test_taid_schedule_by_hand():
    s = TAIDSchedule(t_start=0.4, t_end=1.0, alpha=5e-4, beta=0.99)
    total = 100
    assert s.update(2.0, step=0, total_steps=total) == 0.4  # first call: only records L_prev
    assert s.state_dict() == {"t": 0.4, "m": 0.0, "prev_loss": 2.0}

    def sig(x):
        return 1 / (1 + math.exp(-x))

    t, m, prev = 0.4, 0.0, 2.0
    for step, loss in [(1, 1.5), (2, 1.6), (3, 1.2)]:
        delta = (prev - loss) / (prev + 1e-15)
        m = 0.99 * m + 0.01 * delta
        t_lin = 0.4 + 0.6 * step / total
        t = min(1.0, max(t_lin, t + 5e-4 * sig(m) * (1 - t)))
        prev = loss
        assert abs(s.update(loss, step, total) - t) < 1e-15
        assert abs(s.momentum - m) < 1e-15
    # concrete values for step 1 (δ = 0.25, m = 0.0025): t_lin = 0.406 beats 0.4 + 5e-4·σ(0.0025)·0.6
    s1 = TAIDSchedule()
    s1.update(2.0, 0, 100)
    assert abs(s1.update(1.5, 1, 100) - 0.406) < 1e-15


def test_taid_schedule_monotone_floor_and_cap():
    s = TAIDSchedule(t_start=0.4, t_end=0.9, alpha=1.0, beta=0.5)  # a large α to reach the cap quickly
    losses = [3.0, 2.0, 2.5, 1.0, 4.0, 0.5, 0.4, 0.3, 5.0, 0.2] * 3
    prev_t = s.t
    for step, loss in enumerate(losses):
        t = s.update(loss, step, total_steps=40)
        assert t >= prev_t
        assert t <= 0.9 + 1e-15
        if step > 0:
            assert t >= 0.4 + 0.5 * step / 40 - 1e-15  # linear floor
        prev_t = t
    assert s.t == 0.9
    # the linear floor rules when the adaptive increment is tiny
    f = TAIDSchedule(alpha=0.0)
    f.update(1.0, 0, 10)
    assert abs(f.update(1.0, 5, 10) - 0.7) < 1e-15
    # disable_adaptive: t is exactly the (capped) linear schedule
    d = TAIDSchedule(disable_adaptive=True)
    d.update(1.0, 0, 10)
    assert abs(d.update(0.1, 3, 10) - 0.58) < 1e-15
    assert d.update(0.1, 12, 10) == 1.0
    # a non-finite loss leaves the state alone
    before = d.state_dict()
    d.update(float("nan"), 4, 10)
    assert d.state_dict() == before


def test_taid_schedule_state_round_trip():
    losses = [2.0, 1.8, 1.9, 1.5, 1.4, 1.45, 1.2, 1.1]
    a = TAIDSchedule(alpha=0.05)
    for i, loss in enumerate(losses[:4]):
        a.update(loss, i, 8)
    b = TAIDSchedule(alpha=0.05)
    b.load_state_dict(dict(a.state_dict()))
    for i, loss in enumerate(losses[4:], start=4):
        assert a.update(loss, i, 8) == b.update(loss, i, 8)
        assert a.state_dict() == b.state_dict()
    fresh = TAIDSchedule()
    fresh.load_state_dict(TAIDSchedule().state_dict())  # prev_loss None survives
    assert fresh.prev_loss is None


def test_mixture_weights_are_passed_through():
    c = make_case(n=8, v=12, k=5, seed=19)
    P, Q = coarse(c["logp"].exp(), c), coarse(torch.softmax(c["z"], -1), c)
    b = batch_of(c, c["p_rest64"])
    beta, alpha = 0.2, 0.35
    M = beta * P + (1 - beta) * Q
    want_js = ref_masked_mean(beta * ref_kl(P, M) + (1 - beta) * ref_kl(Q, M), c["mask"])
    assert abs(kd("js", b, c["z"], js_beta=beta).kd.item() - want_js.item()) < 1e-10
    want_s = ref_masked_mean(ref_kl(P, alpha * P + (1 - alpha) * Q), c["mask"])
    assert abs(kd("sfkl", b, c["z"], skew_alpha=alpha).kd.item() - want_s.item()) < 1e-10
    want_sr = ref_masked_mean(ref_kl(Q, (1 - alpha) * P + alpha * Q), c["mask"])
    assert abs(kd("srkl", b, c["z"], skew_alpha=alpha).kd.item() - want_sr.item()) < 1e-10
    tt = torch.rand(8, dtype=F64)  # a per-position t broadcasts too (taid_kl itself; the loss holds one t)
    Pt = torch.softmax((1 - tt[:, None]) * Q.log() + tt[:, None] * P.log(), -1)
    want_t = ref_masked_mean(ref_kl(Pt, Q), c["mask"])
    bins = coarse_bins(student_bins(c["z"], b.support_ids), b)
    assert abs(masked_mean(taid_kl(bins.log_p, bins.log_q, t=tt), b.mask).item() - want_t.item()) < 1e-10


# ---------------------------------------------------------------------------------------------------------
# Temperature, and the numbers every loss reports beside its own


def test_temperature_one_is_exactly_the_untempered_loss():
    c = make_case(n=8, v=12, k=4, seed=23)
    for name in ALL:
        assert loss_of(name, c, temperature=1.0).item() == loss_of(name, c).item()


def test_tempered_loss_is_not_the_tempered_coarse_graining():
    """The documented choice: with k < V the tail bin is tempered as one category, so the loss differs from
    coarse-graining softmax(z / T) (the sum of tempered tail tokens), which the cache cannot know."""
    c = make_case(n=6, v=17, k=4, seed=24)
    T = 2.0
    got = loss_of("fkl", c, p_rest=c["p_rest64"], temperature=T)
    P = coarse(ref_temper(c["logp"].exp(), T), c)
    Q = coarse(ref_temper(torch.softmax(c["z"], -1), T), c)
    other = T * T * ref_masked_mean(ref_kl(P, Q), c["mask"])
    assert abs(got.item() - other.item()) > 1e-3


@pytest.mark.parametrize("name", ALL + ["ce"])
@pytest.mark.parametrize("k", [5, 17])
def test_every_loss_reports_kl_and_soft_ce_at_temperature_one(name, k):
    """kl = KL(p‖q) on the k+1 bins and soft_ce = -Σ p log q = kl + H(p), whatever the loss and T."""
    c = make_case(n=10, v=17, k=k, seed=25)
    out = kd(name, batch_of(c, c["p_rest64"]), c["z"], temperature=1.7, js_beta=BETA_JS)
    P, Q = coarse(c["logp"].exp(), c), coarse(torch.softmax(c["z"], -1), c)
    keep = P > 0
    kl = ref_masked_mean(torch.where(keep, P * (P.log() - Q.log()), 0.0).sum(-1), c["mask"])
    soft_ce = ref_masked_mean(-torch.where(keep, P * Q.log(), 0.0).sum(-1), c["mask"])
    entropy = ref_masked_mean(-torch.where(keep, P * P.log(), 0.0).sum(-1), c["mask"])
    assert abs(out.kl.item() - kl.item()) < 1e-10
    assert abs(out.soft_ce.item() - soft_ce.item()) < 1e-10
    assert abs(out.soft_ce.item() - (out.kl + entropy).item()) < 1e-10
    assert not out.kl.requires_grad and not out.soft_ce.requires_grad  # metrics: no gradient
    ce = ref_masked_mean(-torch.log_softmax(c["z"], -1).gather(-1, c["targets"][:, None]).squeeze(-1), c["mask"])
    assert abs(out.ce.item() - ce.item()) < 1e-12  # CE on the true token stays at T = 1


def test_ce_baseline_trains_on_ce_only():
    c = make_case(n=8, v=12, k=4, seed=26)
    out = kd("ce", batch_of(c), c["z"], ce_weight=0.4, temperature=3.0)
    assert out.kd.item() == 0.0 and out.total.item() == out.ce.item()
    assert out.kl.item() > 0


def test_tvd_by_hand():
    p = [0.5, 0.3, 0.2]
    batch = KDBatch(
        support_ids=torch.tensor([[0, 1]]),
        teacher_logprobs=torch.log(torch.tensor([p[:2]], dtype=F64)),
        mask=torch.ones(1, dtype=torch.bool),
        p_rest=torch.tensor([0.2], dtype=F64),
    )
    logits = torch.log(torch.tensor([[0.2, 0.3, 0.25, 0.25]], dtype=F64))  # the rest bin holds 0.5 over two ids
    assert abs(kd("tvd", batch, logits).kd.item() - 0.3) < 1e-12


# ---------------------------------------------------------------------------------------------------------
# The contract: registry, options, state


def test_every_registered_loss_has_a_reference_here():
    """A new loss is its declaration and class in train/losses/ plus its reference in this file (uld's: ref_uld,
    on its own bins, the sorted distributions, rather than the support's)."""
    assert set(LOSS_NAMES) == set(ALL) | {"ce", "uld"}


def ref_uld(P, Q):
    """Boizard et al.'s ULD of dense distributions: each sorted descending, the shorter zero-padded, L1 per row."""
    width = max(P.shape[-1], Q.shape[-1])
    ps = torch.nn.functional.pad(P.sort(-1, descending=True).values, (0, width - P.shape[-1]))
    qs = torch.nn.functional.pad(Q.sort(-1, descending=True).values, (0, width - Q.shape[-1]))
    return (ps - qs).abs().sum(-1)


@pytest.mark.parametrize("k", [9, 4])
def test_uld_loss_is_the_sorted_l1_of_the_paper(k):
    """The registered `uld`: with k = V the dense sorted L1 (value and gradient, float64), weighted by
    --uld-weight, plus --ce-weight·CE; with k < V the teacher's tail against the rest of the student's own top-k."""
    c = make_case(n=6, v=9, k=k, seed=41)
    P, z = c["logp"].exp(), c["z"]
    loss = build_loss("uld", uld_weight=0.7, ce_weight=0.5)
    out = loss(batch_of(c, p_rest=c["p_rest64"]), z)
    Q = z.softmax(-1)
    if k == 9:
        want = ref_uld(P, Q)
    else:
        top_p, top_q = P.sort(-1, descending=True).values, Q.sort(-1, descending=True).values
        want = (top_p[:, :k] - top_q[:, :k]).abs().sum(-1) + (top_p[:, k:].sum(-1) - top_q[:, k:].sum(-1)).abs()
    ce = -Q.log().gather(-1, c["targets"][:, None]).squeeze(-1)
    total = 0.7 * ref_masked_mean(want, c["mask"]) + 0.5 * ref_masked_mean(ce, c["mask"])
    torch.testing.assert_close(out.total, total)
    torch.testing.assert_close(out.kd, 0.7 * ref_masked_mean(want, c["mask"]))
    (g,) = torch.autograd.grad(out.total, z)
    (g_want,) = torch.autograd.grad(total, z)
    torch.testing.assert_close(g, g_want)
    # No id enters: the teacher's values under any other ids give the same loss; its own list wins when given.
    shuffled = batch_of(c, p_rest=c["p_rest64"])
    shuffled.support_ids = shuffled.support_ids.roll(1, dims=-1)
    torch.testing.assert_close(loss(shuffled, z).kd, out.kd)
    own = batch_of(c)
    own.teacher_own_logprobs, own.teacher_logprobs = own.teacher_logprobs, torch.full_like(own.teacher_logprobs, -50.0)
    torch.testing.assert_close(loss(own, z).kd, out.kd, rtol=1e-5, atol=1e-6)  # tail from fp32 tail_mass
    # It ranks the student's whole distribution: precomputed support bins alone are refused.
    with pytest.raises(ValueError, match="uld loss needs the student's logits"):
        loss(batch_of(c), student=student_bins(z, c["ids"], c["targets"]))
    from kd_pipeline.train.trainer import DistillConfig

    with pytest.raises(ValueError, match="drop --fused-loss"):
        DistillConfig(student="s", cache=Path("c"), out=Path("o"), loss="uld", fused_loss=True).validate()


def test_options_come_from_a_config_and_are_checked():
    from kd_pipeline.train.trainer import DistillConfig

    cfg = DistillConfig(student="s", cache=Path("c"), out=Path("o"), js_beta=0.3, skew_alpha=0.25, temperature=2.0)
    assert build_loss("js", cfg).options.js_beta == 0.3
    sfkl = build_loss("sfkl", cfg)
    assert (sfkl.options.skew_alpha, sfkl.options.temperature) == (0.25, 2.0)
    assert not hasattr(sfkl.options, "js_beta")  # each loss sees its own options only
    assert build_loss("js", {"js_beta": 0.4}).options.js_beta == 0.4
    with pytest.raises(TypeError, match="unknown loss options"):
        build_loss("js", jsbeta=0.4)
    for name, bad, flag in [
        ("js", dict(js_beta=1.0), "--js-beta"),
        ("sfkl", dict(skew_alpha=0.0), "--skew-alpha"),
        ("atkd", dict(atkd_alpha=2.0), "--atkd-alpha"),
        ("fkl", dict(temperature=0.0), "--temperature"),
        ("fkl", dict(ce_weight=-1.0), "--ce-weight"),
        ("taid", dict(taid_t_start=1.5), "--taid-t-start"),
    ]:
        with pytest.raises(ValueError, match=flag):
            build_loss(name, **bad)
        with pytest.raises(ValueError, match=flag):
            DistillConfig(student="s", cache=Path("c"), out=Path("o"), loss=name, **bad).validate()


def test_distill_config_declares_every_option_once_with_help():
    import dataclasses

    from kd_pipeline.train.losses import LOSSES, loss_help
    from kd_pipeline.train.trainer import DistillConfig

    config_fields = {f.name: f for f in dataclasses.fields(DistillConfig)}
    for cls in LOSSES.values():
        for f in dataclasses.fields(cls.Options):
            assert config_fields[f.name] is f or config_fields[f.name].default == f.default
            assert f.metadata["help"], f.name
    help_text = config_fields["loss"].metadata["help"]
    assert help_text == loss_help()
    for name in LOSS_NAMES:
        assert f"{name}: " in help_text


def test_taid_state_goes_through_the_contract():
    loss = build_loss("taid", taid_alpha=0.05)
    assert loss.metrics() == {"taid_t": 0.4}
    for step, value in enumerate([2.0, 1.8, 1.7]):
        loss.optimizer_step(value, step, 10)
    reference = TAIDSchedule(alpha=0.05)
    for step, value in enumerate([2.0, 1.8, 1.7]):
        reference.update(value, step, 10)
    assert loss.state_dict() == reference.state_dict() and loss.metrics()["taid_t"] == reference.t
    again = build_loss("taid", taid_alpha=0.05)
    again.load_state_dict(loss.state_dict())
    assert again.state_dict() == loss.state_dict()
    with pytest.raises(ValueError, match="schedule state"):
        again.load_state_dict({})
    # Calling the loss (training or eval) never moves t: only optimizer_step does.
    c = make_case(n=6, v=9, k=4, seed=27)
    before = again.state_dict()
    again(batch_of(c), c["z"])
    assert again.state_dict() == before


def test_stateless_losses_refuse_foreign_state():
    loss = build_loss("fkl")
    assert loss.state_dict() == {}
    loss.load_state_dict({})
    with pytest.raises(ValueError, match="keeps no state"):
        loss.load_state_dict({"t": 0.5})


def test_precomputed_bins_of_the_wrong_width_are_refused():
    c = make_case(n=6, v=9, k=4, seed=28)
    plain = student_bins(c["z"], c["ids"], c["targets"])
    with pytest.raises(ValueError, match="5 columns"):
        kd("atkd", batch_of(c), student=plain)
    with pytest.raises(ValueError, match="exactly one"):
        kd("fkl", batch_of(c))
