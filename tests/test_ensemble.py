"""train/ensemble.py: combine_teachers / target_weights against a float64 dense reference (docs/multi-teacher.md)."""

import pytest
import torch

from kd_pipeline.train import cross_tokenizer
from kd_pipeline.train import losses as losses_module
from kd_pipeline.train.ensemble import combine_teachers, target_weights

V, N = 50, 64
NEG_INF = float("-inf")


def teachers(t, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.log_softmax(scale * torch.randn(N, V, generator=g, dtype=torch.float64), -1) for _ in range(t)]


def topk(logp, k):
    lp, ids = logp.topk(k, dim=-1)
    return ids, lp


def dense_of(ids, lp):
    """[N, V] probabilities from a combined support; checks non-empty ids are distinct per row."""
    out = torch.zeros(ids.shape[0], V, dtype=torch.float64)
    p = lp.exp().double()
    out.scatter_add_(-1, ids.masked_fill(p == 0, 0), p)
    real = torch.isfinite(lp)
    for r in range(ids.shape[0]):
        row = ids[r][real[r]]
        assert row.unique().numel() == row.numel()
    return out


def reference(logps, supports, w):
    """p(u) = Σ_{i: u∈S_i} w_i p_i(u) as [N, V]; rest Σ w_i r_i; the dense mixture; per-teacher membership."""
    w = w.expand(N, len(logps))
    p = torch.zeros(N, V, dtype=torch.float64)
    rest = torch.zeros(N, dtype=torch.float64)
    members = []
    for i, (lp, ids) in enumerate(zip(logps, supports)):
        member = torch.zeros(N, V, dtype=torch.bool).scatter_(-1, ids, True)
        members.append(member)
        p += torch.where(member, w[:, i : i + 1] * lp.exp(), 0.0)
        rest += w[:, i] * (1 - torch.where(member, lp.exp(), 0.0).sum(-1))
    dense = sum(w[:, i : i + 1] * lp.exp() for i, lp in enumerate(logps))
    return p, rest, dense, members


def weight_kinds(logps, seed=1):
    g = torch.Generator().manual_seed(seed)
    t = len(logps)
    static = torch.rand(t, generator=g, dtype=torch.float64) + 0.1
    target = torch.randint(0, V, (N,), generator=g)
    tlp = [lp.gather(-1, target[:, None]).squeeze(-1) for lp in logps]
    return {"static": static / static.sum(), "per_position": target_weights(tlp, tau=0.7)}


def check_sorted(ids, lp):
    assert (lp[:, :-1] >= lp[:, 1:]).all()
    empty = torch.isneginf(lp)
    assert (ids == torch.where(empty, ids[:, :1], ids)).all()  # empty columns repeat column 0's id


# --------------------------------------------------------------------------------------------- (a) k = V


@pytest.mark.parametrize("kind", ["static", "per_position"])
@pytest.mark.parametrize("t", [1, 2, 3])
def test_full_support_is_the_dense_mixture(kind, t):
    logps = teachers(t)
    w = weight_kinds(logps)[kind]
    ids, lp, p_rest, _ = combine_teachers(*zip(*[topk(x, V) for x in logps]), None, w)
    assert ids.shape == (N, t * V) and lp.dtype == torch.float64
    _, _, dense, _ = reference(logps, [topk(x, V)[0] for x in logps], w)
    assert torch.allclose(dense_of(ids, lp), dense, rtol=0, atol=1e-12)
    assert p_rest.abs().max() < 1e-12
    assert (ids[:, 0] == dense.argmax(-1)).all()
    check_sorted(ids, lp)


# --------------------------------------------------------------------------------------------- (b), (c) k < V


def random_supports(logps, ks, seed):
    """True top-k_i for even teachers, a random k_i-subset for odd ones (overlap and disjointness both occur)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (lp, k) in enumerate(zip(logps, ks)):
        ids = topk(lp, k)[0] if i % 2 == 0 else torch.rand(N, V, generator=g).argsort(-1)[:, :k]
        out.append(ids)
    return out


@pytest.mark.parametrize("kind", ["static", "per_position"])
@pytest.mark.parametrize("ks", [(8, 8), (5, 12, 1), (20, 3, 7, 10), (49, 2)])
def test_partial_support_matches_reference(kind, ks):
    logps = teachers(len(ks), seed=len(ks))
    supports = random_supports(logps, ks, seed=sum(ks))
    w = weight_kinds(logps)[kind]
    ids, lp, p_rest, _ = combine_teachers(supports, [x.gather(-1, s) for x, s in zip(logps, supports)], None, w)
    assert ids.shape == (N, sum(ks))
    p_ref, rest_ref, dense, members = reference(logps, supports, w)
    p = dense_of(ids, lp)
    assert torch.allclose(p, p_ref, rtol=0, atol=1e-12)
    assert torch.allclose(p_rest, rest_ref, rtol=0, atol=1e-12)
    assert torch.allclose(p.sum(-1) + p_rest, torch.ones(N, dtype=torch.float64), rtol=0, atol=1e-12)
    check_sorted(ids, lp)
    # What is lost: e(u) = Σ_{i: u∉S_i} w_i p_i(u) moves from u's bin to the rest bin, and nothing else.
    union = torch.stack(members).any(0)
    wn = w.expand(N, len(ks))
    e = sum(torch.where(union & ~m, wn[:, i : i + 1] * x.exp(), 0.0) for i, (x, m) in enumerate(zip(logps, members)))
    assert torch.allclose(dense - p, torch.where(union, e, dense), rtol=0, atol=1e-12)
    assert torch.allclose(p_rest - torch.where(union, 0.0, dense).sum(-1), e.sum(-1), rtol=0, atol=1e-12)
    # The cache-side bound e(u) <= Σ_{i: u∉S_i} w_i min(r_i, m_i), m_i = smallest kept prob of a true top-k.
    bound = torch.zeros(N, V, dtype=torch.float64)
    for i, (x, s, m) in enumerate(zip(logps, supports, members)):
        kept = x.gather(-1, s).exp()
        r_i = 1 - kept.sum(-1)
        cap = torch.minimum(r_i, kept.min(-1).values) if i % 2 == 0 else r_i
        bound += torch.where(union & ~m, (wn[:, i] * cap)[:, None], 0.0)
    assert (e <= bound + 1e-15).all()


def test_forward_kl_on_combined_bins():
    logps = teachers(3, seed=7)
    supports = random_supports(logps, (6, 10, 4), seed=3)
    w = weight_kinds(logps)["per_position"]
    ids, lp, p_rest, _ = combine_teachers(supports, [x.gather(-1, s) for x, s in zip(logps, supports)], None, w)
    z = torch.randn(N, V, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    log_q = torch.log_softmax(z, -1)
    # Mine: on the K columns (empty ones contribute 0) plus the rest bin.
    real = torch.isfinite(lp)
    q_u = log_q.gather(-1, ids)
    in_u = torch.zeros(N, V, dtype=torch.bool).scatter_(-1, ids, True)  # empty columns repeat a real id
    log_q_rest = torch.logsumexp(log_q.masked_fill(in_u, NEG_INF), -1)
    mine = torch.where(real, lp.exp() * (lp - q_u), 0.0).sum(-1) + p_rest * (p_rest.log() - log_q_rest)
    # Direct: from the reference over the vocabulary.
    p_ref, rest_ref, _, _ = reference(logps, supports, w)
    direct = torch.zeros(N, dtype=torch.float64)
    for r in range(N):
        u = p_ref[r] > 0
        direct[r] = (p_ref[r, u] * (p_ref[r, u].log() - log_q[r, u])).sum()
        direct[r] += rest_ref[r] * (rest_ref[r].log() - torch.logsumexp(log_q[r, ~u], -1))
    assert torch.allclose(mine, direct, rtol=1e-12, atol=1e-13)


def test_overlap_disjoint_padding_and_zero_weight():
    # Teacher A: {1, 2, 3}; B: {3, 4} plus an empty column naming 1 (ignored); C: {10, 11}, disjoint, padded
    # with an empty column naming 4; D: weight 0 (its ids must not appear).
    ids = [torch.tensor([[1, 2, 3]]), torch.tensor([[3, 4, 1]]), torch.tensor([[10, 11, 4]]), torch.tensor([[20]])]
    p = [[0.5, 0.2, 0.1], [0.6, 0.3, 0.0], [0.4, 0.4, 0.0], [0.9]]
    lps = [torch.tensor([x], dtype=torch.float64).log() for x in p]
    w = torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=torch.float64)
    out_ids, out_lp, p_rest, _ = combine_teachers(ids, lps, None, w)
    got = {int(i): float(v) for i, v in zip(out_ids[0], out_lp[0].exp()) if v > 0}
    want = {1: 0.25, 2: 0.10, 3: 0.05 + 0.18, 4: 0.09, 10: 0.08, 11: 0.08}
    assert got.keys() == want.keys() and all(abs(got[u] - want[u]) < 1e-15 for u in want)
    assert abs(float(p_rest[0]) - (0.5 * 0.2 + 0.3 * 0.1 + 0.2 * 0.2)) < 1e-15
    assert out_ids.shape == (1, 10) and out_ids[0].tolist()[:6] == [1, 3, 2, 4, 10, 11]  # ties: smaller id first
    assert out_ids[0, 6:].tolist() == [1] * 4 and torch.isneginf(out_lp[0, 6:]).all()


def test_single_teacher_is_unchanged():
    (logp,) = teachers(1, seed=11)
    ids, lp = topk(logp, 9)
    out_ids, out_lp, p_rest, tlp = combine_teachers([ids], [lp], [logp[:, 0]], torch.ones(1))
    assert (out_ids == ids).all() and torch.allclose(out_lp, lp, rtol=0, atol=1e-15)
    assert torch.allclose(p_rest, 1 - lp.exp().sum(-1), rtol=0, atol=1e-15) and torch.equal(tlp, logp[:, 0])


def test_empty_rows_fp16_and_no_nan():
    ids = [torch.tensor([[5, 6], [5, 6], [7, 7]]), torch.tensor([[6, 9, 9], [1, 1, 1], [8, 8, 8]])]
    lps = [
        torch.tensor([[-0.1, -2.5], [NEG_INF, NEG_INF], [NEG_INF, NEG_INF]], dtype=torch.float16),
        torch.tensor([[-0.05, -3.0, NEG_INF], [NEG_INF] * 3, [NEG_INF] * 3], dtype=torch.float16),
    ]
    tl = [torch.tensor([NEG_INF, NEG_INF, -1.0]), torch.tensor([NEG_INF, NEG_INF, NEG_INF])]
    w = target_weights(tl)
    assert torch.allclose(w[0], torch.tensor([0.5, 0.5])) and torch.allclose(w[2], torch.tensor([1.0, 0.0]))
    out_ids, out_lp, p_rest, tlp = combine_teachers(ids, lps, tl, w, target_ids=torch.tensor([9, 9, 3]))
    assert out_lp.dtype == torch.float32 and not any(x.isnan().any() for x in (out_lp, p_rest, tlp))
    assert torch.allclose(torch.logsumexp(out_lp[0], -1).exp() + p_rest[0], torch.tensor(1.0), atol=1e-6)
    assert torch.isneginf(out_lp[1:]).all() and (out_ids[1:] == 0).all() and torch.allclose(p_rest[1:], torch.ones(2))


# --------------------------------------------------------------------------------------------- (d) target


@pytest.mark.parametrize("kind", ["static", "per_position"])
def test_target_logprob_and_known_target_mass(kind):
    logps = teachers(3, seed=13)
    supports = random_supports(logps, (5, 9, 3), seed=2)
    w = weight_kinds(logps)[kind]
    g = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(4))
    g[: N // 2] = supports[1][: N // 2, 0]  # half the rows: g in the union (in teacher 1's support)
    tlp = [x.gather(-1, g[:, None]).squeeze(-1) for x in logps]
    lp_in = [x.gather(-1, s) for x, s in zip(logps, supports)]
    p_ref, rest_ref, dense, members = reference(logps, supports, w)
    ids, lp, p_rest, t = combine_teachers(supports, lp_in, tlp, w)
    assert torch.allclose(t, dense.gather(-1, g[:, None]).squeeze(-1).log(), rtol=0, atol=1e-12)
    # With target_ids: g's bin is the dense mixture's exactly wherever g is in the union; the rest gives it up.
    ids2, lp2, p_rest2, t2 = combine_teachers(supports, lp_in, tlp, w, target_ids=g)
    p2 = dense_of(ids2, lp2)
    in_union = torch.stack(members).any(0).gather(-1, g[:, None]).squeeze(-1)
    exact = p_ref.scatter(-1, g[:, None], dense.gather(-1, g[:, None]))
    assert torch.allclose(p2, torch.where(in_union[:, None], exact, p_ref), rtol=0, atol=1e-12)
    gap = (dense - p_ref).gather(-1, g[:, None]).squeeze(-1)
    assert torch.allclose(p_rest2, rest_ref - torch.where(in_union, gap, 0.0), rtol=0, atol=1e-12)
    assert torch.allclose(p2.sum(-1) + p_rest2, torch.ones(N, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(t, t2) and in_union.any() and (~in_union).any()
    # Where g is outside the union, its mass fits in the rest (ATKD's extra bin: p_rest - p_g >= 0).
    assert (t.exp() <= p_rest + 1e-15)[~in_union].all()


def test_target_weights():
    logps = teachers(3, seed=17)
    g = torch.randint(0, V, (N,))
    tlp = [x.gather(-1, g[:, None]).squeeze(-1) for x in logps]
    p_g = torch.stack(tlp, -1).exp()
    assert torch.allclose(target_weights(tlp, tau=1.0), p_g / p_g.sum(-1, keepdim=True), rtol=1e-12)
    assert torch.allclose(target_weights(tlp, tau=1e9), torch.full((N, 3), 1 / 3, dtype=torch.float64), atol=1e-8)
    assert (target_weights(tlp, tau=1e-3).argmax(-1) == p_g.argmax(-1)).all()
    prior = torch.tensor([0.2, 0.3, 0.5])
    w = target_weights(tlp, tau=2.0, prior=prior)
    want = prior * p_g**0.5
    assert torch.allclose(w, want / want.sum(-1, keepdim=True), rtol=1e-6)
    with pytest.raises(ValueError):
        target_weights(tlp, tau=0.0)


# --------------------------------------------------------------------------------------------- every loss, unchanged


@pytest.fixture(scope="module")
def project():
    return losses_module, cross_tokenizer


def run_loss(L, X, name, ids, lp, p_rest, tlp, target, logits):
    cls = L.LOSSES[name]
    batch = L.KDBatch(ids, lp, torch.ones(ids.shape[0], dtype=torch.bool), target, tlp, p_rest)
    bins = L.student_bins(logits, ids, target, include_target=cls.needs_target_column)
    bins = bins._replace(log_q_support=X.empty_repeats(bins.log_q_support, ids))
    return cls()(batch, logits if cls.needs_logits else None, student=bins)


def test_every_loss_ignores_the_padding(project):
    """Each row on its K-wide padded support gives what it gives on its |U| real columns (ULD excepted)."""
    L, X = project
    logps = teachers(3, seed=19)
    supports = random_supports(logps, (6, 6, 6), seed=8)
    g = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(9))
    tlp_i = [x.gather(-1, g[:, None]).squeeze(-1) for x in logps]
    w = target_weights(tlp_i)
    ids, lp, p_rest, tlp = combine_teachers(supports, [x.gather(-1, s) for x, s in zip(logps, supports)], tlp_i, w,
                                            target_ids=g)  # fmt: skip
    logits = torch.randn(N, V, dtype=torch.float64, generator=torch.Generator().manual_seed(6), requires_grad=True)
    for name in L.LOSSES:
        for r in range(8):
            m = int(torch.isfinite(lp[r]).sum())
            assert m < ids.shape[1]  # every row here has padding
            row = lambda x, c=None, r=r: x[r : r + 1] if x.dim() == 1 else x[r : r + 1, :c]  # noqa: E731
            args = (row(p_rest), row(tlp), row(g), row(logits))
            padded = run_loss(L, X, name, row(ids), row(lp), *args)
            trimmed = run_loss(L, X, name, row(ids, m), row(lp, m), *args)
            assert torch.isfinite(padded.total) and torch.isfinite(padded.kl)
            padded.total.backward()
            assert torch.isfinite(logits.grad).all()
            logits.grad = None
            if name == "uld":  # ranks |U|+1..K: the teacher's zeros meet the student's top ranks (triangle ineq.)
                assert padded.kd >= trimmed.kd - 1e-12
            else:
                assert torch.allclose(padded.kd, trimmed.kd, rtol=1e-10, atol=1e-12), name
            assert torch.allclose(padded.kl, trimmed.kl, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["fkl", "rkl", "js", "tvd"])
def test_full_support_losses_equal_dense(project, name):
    L, X = project
    logps = teachers(2, seed=23)
    w = weight_kinds(logps)["per_position"]
    ids, lp, p_rest, _ = combine_teachers(*zip(*[topk(x, V) for x in logps]), None, w)
    dense = sum(w[:, i : i + 1] * x.exp() for i, x in enumerate(logps)).log()
    z = torch.randn(N, V, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    log_q = torch.log_softmax(z, -1)
    got = run_loss(L, X, name, ids, lp, p_rest, None, None, z).kd
    want = L.LOSSES[name]().per_position(L.Bins(dense, log_q)).mean()
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-13)


def test_padding_needs_empty_repeats(project):
    """Without empty_repeats the student's repeat columns are live bins: forward KL is unaffected, reverse KL not."""
    L, X = project
    logps = teachers(2, seed=29)
    supports = random_supports(logps, (5, 5), seed=1)
    ids, lp, p_rest, _ = combine_teachers(supports, [x.gather(-1, s) for x, s in zip(logps, supports)], None,
                                          torch.tensor([0.5, 0.5]))  # fmt: skip
    z = torch.randn(N, V, dtype=torch.float64)
    batch = L.KDBatch(ids, lp, torch.ones(N, dtype=torch.bool), p_rest=p_rest)
    right = {n: run_loss(L, X, n, ids, lp, p_rest, None, None, z).kd for n in ("fkl", "rkl")}
    raw = {n: L.LOSSES[n]()(batch, z).kd for n in ("fkl", "rkl")}
    assert torch.allclose(raw["fkl"], right["fkl"], rtol=1e-12) and raw["rkl"] > 1.5 * right["rkl"]
