"""The fused head (train/fused.py) against the logits path: same bins, losses and gradients, and the trainer on it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kd_pipeline.cache.format.layout import TOKENIZER_DIR
from kd_pipeline.cache.format.manifest import load_cache
from kd_pipeline.train import fused, losses, trainer
from kd_pipeline.train.fused import UnsplittableHead, fused_student_bins, lm_head_inputs
from kd_pipeline.train.losses import LOSS_NAMES, LOSSES, KDBatch, build_loss, student_bins
from kd_pipeline.train.reader import CacheReader, plan_chunks

F64 = torch.float64
OPTIONS = dict(js_beta=0.5, skew_alpha=0.1, atkd_alpha=0.2, ce_weight=0.3)

# Every loss with a fused path: `uld` ranks the student's whole distribution, so it takes the logits (refused with
# --fused-loss, tests/test_losses.py).
FUSED_LOSSES = [name for name in LOSS_NAMES if not LOSSES[name].needs_logits]


def make_loss(name, **options):
    """The registered loss ``name`` with OPTIONS (and ``options``); TAID's t set to 0.63."""
    loss = build_loss(name, **{**OPTIONS, **options})
    if name == "taid":
        loss.load_state_dict({"t": 0.63, "m": 0.0, "prev_loss": None})
    return loss


# ---------------------------------------------------------------------------------------------------------------
# Cases: a student head (h, W, b) and a teacher over the same vocabulary


def make_case(n=9, v=20, d=6, k=5, seed=0, dtype=F64, *, cover=False, repeat=False):
    """``cover``: the support is the whole vocabulary (k = V, shuffled); ``repeat``: some rows list an id twice.
    Targets fall both inside and outside the support; a quarter of the positions are masked off."""
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, d, generator=gen, dtype=F64)).to(dtype).requires_grad_(True)
    w = (torch.randn(v, d, generator=gen, dtype=F64) * 0.8).to(dtype).requires_grad_(True)
    b = (torch.randn(v, generator=gen, dtype=F64) * 0.5).to(dtype).requires_grad_(True)
    logp = torch.log_softmax(torch.randn(n, v, generator=gen, dtype=F64) * 2.0, -1)
    if cover:
        ids = torch.argsort(torch.rand(n, v, generator=gen), dim=-1)
    else:
        ids = torch.topk(logp, k, dim=-1).indices
    if repeat:
        ids[::2, -1] = ids[::2, 0]
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[0] = ids[0, 1]
    if not cover:
        outside = torch.ones(v, dtype=torch.bool)
        outside[ids[1]] = False
        targets[1] = torch.nonzero(outside)[0, 0]
    mask = torch.rand(n, generator=gen) > 0.25
    mask[:2] = True
    compl = torch.ones(n, v, dtype=torch.bool).scatter(-1, ids, False)
    batch = KDBatch(
        support_ids=ids,
        teacher_logprobs=logp.gather(-1, ids).to(dtype),
        mask=mask,
        target_ids=targets,
        teacher_target_logprob=logp.gather(-1, targets[:, None]).squeeze(-1).to(dtype),
        p_rest=(logp.exp() * compl).sum(-1).to(dtype),  # exact, so float64 comparisons are not limited by fp32
    )
    return h, w, b, batch


def logits_path(loss, h, w, b, batch):
    return loss(batch, F.linear(h, w, b)).total


def fused_path(loss, h, w, b, batch, chunk):
    bins = fused_student_bins(
        h, w, batch.support_ids, batch.target_ids, bias=b, include_target=loss.needs_target_column, chunk_size=chunk
    )
    return loss(batch, student=bins).total


def assert_same(name, case, chunk, tol, **options):
    h, w, b, batch = case
    loss = make_loss(name, **options)
    want = logits_path(loss, h, w, b, batch)
    got = fused_path(loss, h, w, b, batch, chunk)
    assert torch.isfinite(want)
    assert abs(got.item() - want.item()) <= tol * max(1.0, abs(want.item())), (got.item(), want.item())
    for g_got, g_want in zip(torch.autograd.grad(got, (h, w, b)), torch.autograd.grad(want, (h, w, b))):
        scale = max(1.0, g_want.abs().max().item())
        assert (g_got - g_want).abs().max().item() <= tol * scale


# ---------------------------------------------------------------------------------------------------------------
# Equal to the logits path, every loss


@pytest.mark.parametrize("chunk", [20, 4, 7, 1000])  # one chunk, chunks dividing V, not dividing V, larger than V
@pytest.mark.parametrize("name", FUSED_LOSSES)
def test_every_loss_matches_the_logits_path(name, chunk):
    assert_same(name, make_case(seed=1), chunk, tol=1e-10)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
@pytest.mark.parametrize("name", FUSED_LOSSES)
def test_every_loss_at_a_temperature_matches_the_logits_path(name, temperature):
    assert_same(name, make_case(seed=11), chunk=7, tol=1e-10, temperature=temperature)


@pytest.mark.parametrize("name", FUSED_LOSSES)
def test_reported_kl_and_soft_ce_match_the_logits_path(name):
    h, w, b, batch = make_case(seed=12)
    loss = make_loss(name, temperature=1.5)
    want = loss(batch, F.linear(h, w, b))
    bins = fused_student_bins(
        h, w, batch.support_ids, batch.target_ids, bias=b, include_target=loss.needs_target_column, chunk_size=6
    )
    got = loss(batch, student=bins)
    for key in ("kd", "ce", "kl", "soft_ce"):
        assert abs(getattr(got, key).item() - getattr(want, key).item()) < 1e-10, key


@pytest.mark.parametrize("name", FUSED_LOSSES)
def test_support_with_repeated_ids(name):
    assert_same(name, make_case(seed=2, repeat=True), chunk=6, tol=1e-10)


@pytest.mark.parametrize("name", FUSED_LOSSES)
def test_support_covering_the_vocabulary(name):
    """k = V: the rest bin is empty (-inf, no gradient); for ATKD the target column is always a repeat."""
    case = make_case(seed=3, v=12, cover=True)
    h, w, b, batch = case
    bins = fused_student_bins(h, w, batch.support_ids, batch.target_ids, bias=b, chunk_size=5)
    assert torch.isneginf(bins.log_q_rest).all()
    assert_same(name, case, chunk=5, tol=1e-10)


@pytest.mark.parametrize("name", FUSED_LOSSES)
def test_float32_within_rounding(name):
    assert_same(name, make_case(n=16, v=300, d=12, k=8, seed=4, dtype=torch.float32), chunk=64, tol=2e-5)


def test_no_bias_and_no_targets():
    h, w, _, batch = make_case(seed=5)
    got = fused_student_bins(h, w, batch.support_ids, chunk_size=3)
    want = student_bins(h @ w.T, batch.support_ids)
    assert got.log_q_target is None
    for x, y in zip(got[:3], want[:3]):
        assert torch.allclose(x, y, atol=1e-12, rtol=0)


def test_bins_match_student_bins_with_a_validity_mask():
    h, w, b, batch = make_case(seed=6, repeat=True)
    ids, valid = losses.atkd_ids(batch.support_ids, batch.target_ids)
    got = fused_student_bins(h, w, ids, batch.target_ids, bias=b, valid=valid, chunk_size=3)
    want = student_bins(F.linear(h, w, b), batch.support_ids, batch.target_ids, include_target=True)
    for x, y in zip(got, want):
        assert torch.equal(torch.isneginf(x), torch.isneginf(y))
        assert torch.allclose(x, y, atol=1e-12, rtol=0)


def test_no_positions():
    h, w, b, batch = make_case(seed=7)
    bins = fused_student_bins(h[:0], w, batch.support_ids[:0], batch.target_ids[:0], bias=b, chunk_size=7)
    assert all(x.shape[0] == 0 for x in bins)
    grads = torch.autograd.grad(bins.log_q_rest.sum() + bins.log_q_support.sum(), (w, b))
    assert all((g == 0).all() for g in grads)


def test_tail_far_below_the_support_is_exact_in_fp32():
    """Support logits 200 above the rest: q_rest ~ e^-200 (no fp32 ``1 - Σ q``), finite gradients."""
    v, d = 50, 10
    w = torch.zeros(v, d)
    w[:10, 0] = 200.0  # z = 200 on ids 0..9 for h = e_0, 0 elsewhere
    w.requires_grad_(True)
    h = torch.zeros(3, d)
    h[:, 0] = 1.0
    h.requires_grad_(True)
    ids = torch.arange(10).expand(3, 10).contiguous()
    bins = fused_student_bins(h, w, ids, chunk_size=16)
    want = math.log(40) - 200 - math.log(10)
    assert torch.allclose(bins.log_q_rest, torch.full((3,), want), atol=1e-4)
    bins.log_q_rest.sum().backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()


def test_bad_ids_are_refused():
    h, w, b, batch = make_case(seed=8)
    with pytest.raises(ValueError, match="out of range"):
        fused_student_bins(h, w, batch.support_ids + 20, bias=b)


# ---------------------------------------------------------------------------------------------------------------
# Gradients of the four outputs, by finite differences


def _all_outputs(ids, target, valid, chunk):
    def f(h, w, b):
        bins = fused_student_bins(h, w, ids, target, bias=b, valid=valid, chunk_size=chunk)
        # An invalid column is a constant -inf (no finite difference): compare it as 0.
        return tuple(x.masked_fill(torch.isneginf(x), 0.0) for x in bins)

    return f


@pytest.mark.parametrize("with_valid", [False, True])
def test_gradcheck(with_valid):
    h, w, b, batch = make_case(n=4, v=11, d=3, k=3, seed=9, repeat=True)
    ids, valid = batch.support_ids, None
    if with_valid:
        ids, valid = losses.atkd_ids(ids, batch.target_ids)
    inputs = tuple(x.detach().clone().requires_grad_(True) for x in (h, w, b))
    assert torch.autograd.gradcheck(_all_outputs(ids, batch.target_ids, valid, 4), inputs, eps=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# Autocast: the products run in bf16, as the model's own head does


def test_autocast_matches_the_logits_path_under_autocast():
    h, w, b, batch = make_case(n=32, v=200, d=16, k=8, seed=10, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = make_loss("fkl")
        want = loss(batch, F.linear(h, w, b).float()).total
        bins = fused_student_bins(h, w, batch.support_ids, batch.target_ids, bias=b, chunk_size=48)
        got = loss(batch, student=bins).total
    assert bins.lse.dtype == torch.float32
    assert abs(got.item() - want.item()) < 1e-4 * max(1.0, abs(want.item()))
    for g_got, g_want in zip(torch.autograd.grad(got, (h, w, b)), torch.autograd.grad(want, (h, w, b))):
        assert g_got.dtype == torch.float32
        assert torch.allclose(g_got, g_want, rtol=0, atol=2e-2 * g_want.abs().max().item())


# ---------------------------------------------------------------------------------------------------------------
# The model side


def tiny_llama(vocab=64, tied=True, seed=0, cls=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    return (cls or LlamaForCausalLM)(config)


def test_lm_head_inputs_of_a_tied_model():
    model = tiny_llama()
    ids = torch.randint(0, 64, (2, 10))
    head = lm_head_inputs(model, verify=True, input_ids=ids)
    assert head.weight is model.model.embed_tokens.weight and head.bias is None
    assert torch.allclose(F.linear(head.hidden, head.weight), model(input_ids=ids).logits, atol=1e-6)


def test_tied_embedding_gets_both_gradients_once():
    model = tiny_llama()
    ids = torch.randint(0, 64, (2, 10))
    support = torch.topk(torch.randn(20, 64), 4).indices
    targets = ids.reshape(-1)[:20]

    def loss(fused_path: bool):
        model.zero_grad()
        if fused_path:
            head = lm_head_inputs(model, input_ids=ids)
            bins = fused_student_bins(head.hidden.reshape(20, -1), head.weight, support, targets, chunk_size=24)
        else:
            bins = student_bins(model(input_ids=ids).logits.reshape(20, -1), support, targets)
        (bins.log_q_rest.sum() + bins.log_q_support.sum() - bins.log_q_target.sum()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    want, got = loss(False), loss(True)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-5, rtol=1e-4), name


def test_softcapped_model_is_refused():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    model = Gemma2ForCausalLM(
        Gemma2Config(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=64,
        )
    )
    with pytest.raises(UnsplittableHead, match="final_logit_softcapping"):
        lm_head_inputs(model, input_ids=torch.zeros(1, 4, dtype=torch.long))


def test_scaled_config_and_other_heads_are_refused():
    model = tiny_llama(tied=False)
    model.config.logit_scale = 0.0625
    with pytest.raises(UnsplittableHead, match="logit_scale"):
        fused.check_splittable(model)
    model = tiny_llama(tied=False)
    model.lm_head = torch.nn.Sequential(model.lm_head)
    with pytest.raises(UnsplittableHead, match="not a plain torch.nn.Linear"):
        fused.check_splittable(model)


def test_verify_catches_what_the_config_does_not_say():
    from transformers import LlamaForCausalLM

    class Scaled(LlamaForCausalLM):  # a logit scale hidden in forward
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 0.5
            return out

    model = tiny_llama(cls=Scaled)
    lm_head_inputs(model, input_ids=torch.zeros(1, 4, dtype=torch.long))  # without verify: not noticed
    with pytest.raises(UnsplittableHead, match="not its head applied"):
        lm_head_inputs(model, verify=True, input_ids=torch.zeros(1, 4, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------------------
# The trainer


@pytest.fixture(scope="module")
def tied_student(tmp_path_factory) -> Path:
    from transformers import LlamaConfig

    d = tmp_path_factory.mktemp("tied_student")
    LlamaConfig(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    ).save_pretrained(d)
    return d


def _train(student, cache, out, **kw):
    options = dict(batch_size=4, lr=1e-3, max_steps=2, eval_every=1000, eval_sequences=12, save_every=1000)
    cfg = trainer.DistillConfig(
        student=str(student), cache=Path(cache), out=Path(out), progress=False, **{**options, **kw}
    )
    trainer.distill(cfg)
    from safetensors.torch import load_file

    return load_file(Path(out) / "final" / "model.safetensors")


@pytest.mark.parametrize("loss", ["fkl", "atkd", "ce"])  # bins on S, on S ∪ {g}, the target only
def test_batch_losses_and_gradients_equal_the_logits_path(small_cache, tied_student, monkeypatch, loss):
    """One trainer batch through both paths: the same loss and the same gradient for every parameter, the tied
    embedding included (its gradient sums the input and the output use on both paths)."""
    monkeypatch.setattr(fused, "DEFAULT_CHUNK_SIZE", 96)  # 320 = 3·96 + 32: several chunks, a short last one
    info = load_cache(small_cache)
    model = trainer.load_student(str(tied_student), info, seed=0)
    batch = next(iter(CacheReader(info, 4, shuffle=False)))
    results = []
    for fused_loss in (False, True):
        cfg = trainer.DistillConfig(
            student="", cache=Path(), out=Path(), loss=loss, ce_weight=0.2, fused_loss=fused_loss
        )
        model.zero_grad()
        loss_fn = make_loss(loss, ce_weight=0.2)
        parts = trainer.batch_losses(
            model, batch, cfg, loss_fn, torch.device("cpu"), torch.autocast("cpu", enabled=False)
        )
        parts.total.backward()
        results.append((parts, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (want, want_grads), (got, got_grads) = results
    for a, b in zip(got, want):
        assert (a is None) == (b is None) and (a is None or abs(a.item() - b.item()) < 1e-6)
    assert "lm_head.weight" not in want_grads  # tied
    for name, g in want_grads.items():
        assert torch.allclose(got_grads[name], g, rtol=0, atol=1e-5 * g.abs().max().item()), name


def test_two_steps_fused_equal_the_logits_path(tmp_path, small_cache, tied_student, monkeypatch):
    """Two optimizer steps: the same parameters up to fp32 rounding. Adam's first steps move each weight by about
    lr·sign(g) whatever |g| is, so a weight whose gradient is near 0 amplifies rounding: the tolerance is 1% of lr
    (a wrong gradient moves weights by ~lr). The gradients themselves are compared tightly above."""
    monkeypatch.setattr(fused, "DEFAULT_CHUNK_SIZE", 96)
    lr = 1e-3
    want = _train(tied_student, small_cache, tmp_path / "logits", loss="atkd", ce_weight=0.2, lr=lr)
    got = _train(tied_student, small_cache, tmp_path / "fused", loss="atkd", ce_weight=0.2, lr=lr, fused_loss=True)
    assert "lm_head.weight" not in got  # tied: saved once, as the embedding
    assert want.keys() == got.keys()
    initial = trainer.load_student(str(tied_student), load_cache(small_cache), 0).state_dict()
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=0, atol=1e-2 * lr), (name, (got[name] - want[name]).abs())
        assert (got[name] - initial[name]).abs().max() > 0.5 * lr, name  # every tensor did move


def test_softcapped_student_falls_back_with_one_message(tmp_path, small_cache, capsys):
    from transformers import AutoTokenizer, Gemma2Config

    student = tmp_path / "gemma2"
    Gemma2Config(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=256,
    ).save_pretrained(student)
    # The teacher's tokenizer beside it (for a bare gemma2 config, AutoTokenizer would build an empty one).
    AutoTokenizer.from_pretrained(Path(small_cache) / TOKENIZER_DIR).save_pretrained(student)
    _train(student, small_cache, tmp_path / "run", loss="fkl", fused_loss=True, max_steps=3)
    err = capsys.readouterr().err
    assert err.count("--fused-loss:") == 1
    assert "soft-caps its logits (final_logit_softcapping=30.0); falling back to the full-logits loss" in err


def test_eval_on_the_fused_path_matches(small_cache, tied_student, monkeypatch):
    info = load_cache(small_cache)
    reader = CacheReader(info, 4, chunks=plan_chunks(info)[:3], shuffle=False, drop_remainder=False)
    model = trainer.load_student(str(tied_student), info, seed=0)
    autocast = torch.autocast("cpu", enabled=False)
    want = trainer.evaluate(model, reader, torch.device("cpu"), autocast, trainer.Dist())
    monkeypatch.setattr(trainer, "EVAL_BLOCK_ELEMENTS", 320 * 40)  # 40 positions per block: several per batch
    got = trainer.evaluate(model, reader, torch.device("cpu"), autocast, trainer.Dist(), fused_loss=True)
    assert got["eval_tokens"] == want["eval_tokens"] > 0
    for key in ("eval_ce", "eval_kl", "eval_soft_ce", "eval_top1"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
