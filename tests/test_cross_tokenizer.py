"""Cross-tokenizer pieces (train/cross_tokenizer.py) and the ULD loss, on the two local tokenizers of conftest.py:
the teacher's byte-level BPE and a SentencePiece-style student with byte fallback, another vocabulary and eos."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kd_pipeline.train import cross_tokenizer as xt
from kd_pipeline.train import losses


@pytest.fixture(scope="module")
def teacher_tok(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def student_tok(sentencepiece_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(sentencepiece_tokenizer_dir)


@pytest.fixture(scope="module")
def pieces(teacher_tok, student_tok):
    return xt.TokenPieces.of(teacher_tok), xt.TokenPieces.of(student_tok)


@pytest.fixture(scope="module")
def vocab_map(teacher_tok, student_tok, pieces):
    return xt.load_vocab_map(None, teacher_tok, student_tok, *pieces)


def _teacher_ids(teacher_tok, *docs: str) -> np.ndarray:
    """Documents as the cache packs them: each tokenized whole, eos after each."""
    ids = []
    for doc in docs:
        ids += teacher_tok(doc)["input_ids"] + [teacher_tok.eos_token_id]
    return np.array(ids, dtype=np.int64)


def _retokenize(teacher_tok, student_tok, pieces, vocab_map, ids: np.ndarray) -> xt.StudentSequence:
    mask = np.ones(len(ids), dtype=bool)
    mask[0] = False
    return xt.Retokenizer(student_tok, *pieces, vocab_map).sequences(ids[None], mask[None])[0]


# ------------------------------------------------------------------------------------------- pieces
def test_pieces_spell_the_text(teacher_tok, student_tok, pieces):
    teacher, student = pieces
    text = "the whale said café 🐋 to ahab"
    for tok, p in ((teacher_tok, teacher), (student_tok, student)):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        spelled = b"".join(p.pieces[i] for i in ids)
        assert spelled.lstrip(b" ") == text.encode()  # the SentencePiece student adds one dummy-prefix space
    # Byte fallback: é and the whale are not in the student's learned vocabulary; they come as <0xNN> tokens.
    ids = student_tok("🐋", add_special_tokens=False)["input_ids"]
    assert [student.pieces[i] for i in ids if student.byte_fallback[i]] == [bytes([b]) for b in "🐋".encode()]
    assert student.pieces[student_tok.convert_tokens_to_ids("<0xC3>")] == b"\xc3"
    # Specials are flagged and spelled by their content; text tokens are not special.
    assert teacher.special[teacher_tok.eos_token_id] and teacher.pieces[teacher_tok.eos_token_id] == b"<|endoftext|>"
    assert (
        student.special[student_tok.eos_token_id] and not student.special[student_tok.convert_tokens_to_ids("<0x41>")]
    )
    assert teacher.text_bytes(np.array([teacher_tok.eos_token_id])).tolist() == [0]


# ---------------------------------------------------------------------------------------- vocab map
def test_vocab_map_matches_bytes_specials_by_content_or_role(teacher_tok, student_tok, pieces, vocab_map):
    teacher, student = pieces
    m = vocab_map.mapping
    # Same bytes, different spelling: byte-level "Ġwh" and SentencePiece "▁wh" both stand for b" wh".
    t_wh = teacher_tok.convert_tokens_to_ids("Ġwh")
    s_wh = student_tok.convert_tokens_to_ids("\u2581wh")
    assert teacher.pieces[t_wh] == student.pieces[s_wh] == b" wh"
    assert m[t_wh] == s_wh
    # A byte: the student's regular token wins over its <0xNN> fallback; a byte only the fallback has maps to it.
    assert m[teacher_tok.convert_tokens_to_ids("a")] == student_tok.convert_tokens_to_ids("a")
    assert m[teacher_tok.convert_tokens_to_ids("Ã")] == student_tok.convert_tokens_to_ids("<0xC3>")
    # Specials: eos by role (<|endoftext|> -> </s>), <|im_start|> by content, <|im_end|> has no counterpart.
    assert m[teacher_tok.eos_token_id] == student_tok.eos_token_id
    assert m[teacher_tok.convert_tokens_to_ids("<|im_start|>")] == student_tok.convert_tokens_to_ids("<|im_start|>")
    assert m[teacher_tok.convert_tokens_to_ids("<|im_end|>")] == -1
    # Every match stands for the same bytes (or is a special matched to a special).
    for t in np.flatnonzero(m >= 0):
        if teacher.special[t]:
            assert student.special[m[t]]
        else:
            assert teacher.pieces[t] == student.pieces[m[t]] and not student.special[m[t]]
    # Text tokens the student cannot spell as one token stay unmatched: their mass goes to the tail bin.
    unmatched = [t for t in np.flatnonzero(m < 0) if not teacher.special[t]]
    assert unmatched and all(
        teacher.pieces[t] not in {student.pieces[s] for s in range(student.vocab_size)} for t in unmatched[:20]
    )


def test_vocab_map_is_kept_on_disk_per_tokenizer_pair(tmp_path, teacher_tok, student_tok, pieces, monkeypatch):
    teacher, student = pieces
    first = xt.load_vocab_map(tmp_path, teacher_tok, student_tok, teacher, student)
    path = xt.vocab_map_path(tmp_path, teacher, student)
    assert path.exists() and teacher.fingerprint[:16] in path.name and student.fingerprint[:16] in path.name
    # The identity pair has its own file.
    assert xt.vocab_map_path(tmp_path, teacher, teacher) != path

    def no_build(*args):
        raise AssertionError("rebuilt although a valid map is on disk")

    monkeypatch.setattr(xt, "build_vocab_map", no_build)
    again = xt.load_vocab_map(tmp_path, teacher_tok, student_tok, teacher, student)
    np.testing.assert_array_equal(again.mapping, first.mapping)
    monkeypatch.undo()
    # A truncated file is rebuilt (and rewritten), never trusted.
    path.write_bytes(path.read_bytes()[:100])
    rebuilt = xt.load_vocab_map(tmp_path, teacher_tok, student_tok, teacher, student)
    np.testing.assert_array_equal(rebuilt.mapping, first.mapping)
    assert xt._read_vocab_map(path, teacher, student) is not None


# ---------------------------------------------------------------------------------------- alignment
def _check_invariants(seq: xt.StudentSequence, ids: np.ndarray, teacher: xt.TokenPieces):
    """What alignment promises, on any sequence: an aligned target starts at the byte where the teacher's
    predicted token starts, and the target bytes add up to the text the trained targets cover."""
    t_starts = np.concatenate([[0], np.cumsum(teacher.lengths[ids])[:-1]])
    aligned = seq.teacher_pos >= 0
    assert (seq.starts[1:][aligned] == t_starts[seq.teacher_pos[aligned] + 1]).all()
    assert (seq.teacher_pos[aligned] <= len(ids) - 2).all()
    # Every byte of text after the first student token is some target's: nothing lost, nothing counted twice.
    first_end = seq.starts[1] if len(seq.starts) > 1 else 0
    assert seq.target_bytes.sum() == teacher.text_bytes(ids).sum() - first_end + _special_bytes_before(
        ids, teacher, first_end
    )


def _special_bytes_before(ids, teacher, end) -> int:
    starts = np.concatenate([[0], np.cumsum(teacher.lengths[ids])[:-1]])
    return int(sum(teacher.lengths[i] for i, s in zip(ids, starts) if teacher.special[i] and s < end))


def test_alignment_shared_and_split_tokens(teacher_tok, student_tok, pieces, vocab_map):
    teacher, student = pieces
    ids = _teacher_ids(teacher_tok, "the whale and the captain", "queequeg saw the harpoon upon the deck")
    seq = _retokenize(teacher_tok, student_tok, pieces, vocab_map, ids)
    _check_invariants(seq, ids, teacher)
    t_starts = np.concatenate([[0], np.cumsum(teacher.lengths[ids])[:-1]])
    text = b"".join(teacher.pieces[i] for i in ids)
    # Word starts: both tokenizers start a token at every word (the teacher's "Ġword", the student's "▁word").
    word_starts = [i for i in range(1, len(text)) if text[i : i + 1] == b" " and text[i - 1 : i] != b">"]
    for b in word_starts:
        j = np.flatnonzero(seq.starts == b)
        assert len(j) == 1 and j[0] >= 1, b
        assert seq.teacher_pos[j[0] - 1] == np.flatnonzero(t_starts == b)[0] - 1
    # Split tokens: where one side starts a token the other has no boundary, the target is not aligned.
    only_student = set(seq.starts[seq.starts > 0].tolist()) - set(t_starts.tolist())
    for b in only_student:
        j = np.flatnonzero(seq.starts == b)[0]
        assert seq.teacher_pos[j - 1] == -1
    assert seq.teacher_pos.max() >= 0 and (seq.teacher_pos >= 0).mean() > 0.3


def test_alignment_byte_fallback_and_cut_characters(teacher_tok, student_tok, pieces, vocab_map):
    teacher, student = pieces
    ids = _teacher_ids(teacher_tok, "the café 🐋 whale")
    seq = _retokenize(teacher_tok, student_tok, pieces, vocab_map, ids)
    _check_invariants(seq, ids, teacher)
    assert student.byte_fallback[seq.input_ids].any()
    # The emoji's bytes are byte tokens on both sides: each starts a token on both, so each aligns.
    text = b"".join(teacher.pieces[i] for i in ids)
    at = text.index("🐋".encode())
    for b in range(at + 1, at + 4):
        j = np.flatnonzero(seq.starts == b)
        assert len(j) == 1 and seq.teacher_pos[j[0] - 1] >= 0
    # A sequence cut inside the emoji (as packing can): its stray bytes keep their positions; nothing breaks.
    cut = ids[: np.flatnonzero(np.concatenate([[0], np.cumsum(teacher.lengths[ids])]) == at + 2)[0]]
    seq = _retokenize(teacher_tok, student_tok, pieces, vocab_map, cut)
    _check_invariants(seq, cut, teacher)


def test_alignment_special_tokens(teacher_tok, student_tok, pieces, vocab_map):
    teacher, student = pieces
    im_start, im_end = (teacher_tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>"))
    ids = np.concatenate(
        [
            [im_start],
            teacher_tok("user\nthe sea", add_special_tokens=False)["input_ids"],
            [im_end],
            teacher_tok("\nthe ship", add_special_tokens=False)["input_ids"],
            [teacher_tok.eos_token_id],
            teacher_tok("old man", add_special_tokens=False)["input_ids"],
        ]
    ).astype(np.int64)
    seq = _retokenize(teacher_tok, student_tok, pieces, vocab_map, ids)
    _check_invariants(seq, ids, teacher)
    ids_list = seq.input_ids.tolist()
    # eos (by role) and <|im_start|> (by content) arrive as the student's own special tokens, aligned.
    assert ids_list[0] == student_tok.convert_tokens_to_ids("<|im_start|>")
    eos_at = ids_list.index(student_tok.eos_token_id)
    t_eos = int(np.flatnonzero(ids == teacher_tok.eos_token_id)[0])
    assert seq.teacher_pos[eos_at - 1] == t_eos - 1 and seq.target_bytes[eos_at - 1] == 0
    # <|im_end|> has no student counterpart: its content is text to the student, worth no bytes of text.
    t_im_end = int(np.flatnonzero(ids == im_end)[0])
    t_starts = np.concatenate([[0], np.cumsum(teacher.lengths[ids])[:-1]])
    inside = (seq.starts >= t_starts[t_im_end]) & (seq.starts < t_starts[t_im_end] + len(b"<|im_end|>"))
    assert inside.sum() >= 2 and (seq.target_bytes[inside[1:]] == 0).all()


def test_identical_tokenizers_align_every_position(teacher_tok, pieces):
    teacher, _ = pieces
    same = xt.load_vocab_map(None, teacher_tok, teacher_tok, teacher, teacher)
    assert (same.mapping == np.arange(teacher.vocab_size)).all()
    ids = _teacher_ids(teacher_tok, "the whale and the captain", "queequeg saw the harpoon")
    seq = _retokenize(teacher_tok, teacher_tok, (teacher, teacher), same, ids)
    np.testing.assert_array_equal(seq.input_ids, ids)
    np.testing.assert_array_equal(seq.teacher_pos, np.arange(len(ids) - 1))
    np.testing.assert_array_equal(seq.teacher_last, np.arange(len(ids) - 1))
    np.testing.assert_array_equal(seq.target_bytes, teacher.text_bytes(ids[1:]))


# --------------------------------------------------------------------------------------- projection
def test_project_topk_pools_and_tails():
    mapping = torch.tensor([5, 7, -1, 5, 9, -1])  # teacher ids 0 and 3 are the same student token 5
    p = torch.tensor([[0.4, 0.2, 0.15, 0.1], [0.5, 0.3, 0.1, 0.05], [0.6, 0.3, 0.0, 0.0]], dtype=torch.float64)
    ids = torch.tensor([[0, 2, 1, 3], [4, 1, 2, 5], [2, 5, 2, 5]])
    lp = p.log().to(torch.float16)
    support, logprobs, p_rest, matched = xt.project_topk(ids, lp, mapping)
    q = lp.float().exp()
    tail = 1 - q.sum(-1)
    # Row 0: 5 <- ids 0 and 3 pooled, 7 <- id 1; id 2 unmatched joins the tail. Largest first; empty columns
    # repeat the first id and carry -inf.
    assert support[0].tolist() == [5, 7, 5, 5]
    torch.testing.assert_close(logprobs[0, :2].exp(), torch.stack([q[0, 0] + q[0, 3], q[0, 2]]))
    assert torch.isneginf(logprobs[0, 2:]).all()
    torch.testing.assert_close(p_rest[0], tail[0] + q[0, 1])
    assert support[1].tolist() == [9, 7, 9, 9] and matched[:2].all()
    torch.testing.assert_close(p_rest[1], tail[1] + q[1, 2] + q[1, 3])
    # Row 2: nothing has a student counterpart: all its mass is the tail, and the row is flagged.
    assert not matched[2] and torch.isneginf(logprobs[2]).all()
    torch.testing.assert_close(p_rest[2], torch.tensor(1.0))
    # Mass is conserved everywhere.
    torch.testing.assert_close(logprobs.exp().sum(-1) + p_rest, torch.ones(3))


def test_projected_bins_give_the_loss_of_the_student_vocabulary():
    """The projected batch through the normal bin losses equals, in float64, each loss between the teacher's
    distribution pushed onto student ids (pooled; unmatched and tail mass lumped) and the student's, on those bins."""
    torch.manual_seed(0)
    n, k, vt, vs = 6, 5, 12, 9
    mapping = torch.tensor([0, 1, 1, 2, -1, 3, 4, -1, 5, 6, 7, 8])
    teacher = torch.randn(n, vt, dtype=torch.float64).mul(2).log_softmax(-1)
    top = teacher.topk(k, dim=-1)
    z = torch.randn(n, vs, dtype=torch.float64)
    support, logprobs, p_rest, matched = xt.project_topk(top.indices, top.values, mapping)
    assert matched.all()
    valid = torch.isfinite(logprobs)
    bins = losses.student_bins(z, support)
    log_q_support = bins.log_q_support.masked_fill(~valid, float("-inf"))
    log_p, log_q = losses.join_bins(logprobs.double(), p_rest.double().log(), log_q_support, bins.log_q_rest)
    # Dense reference: the same bins built by hand.
    log_qz = z.log_softmax(-1)
    for row in range(n):
        ids = support[row][valid[row]].tolist()
        in_top = set(top.indices[row].tolist())
        p_ref = [sum(math.exp(teacher[row, t].item()) for t in in_top if mapping[t] == s) for s in ids]
        ref_p = torch.tensor(p_ref + [1 - sum(p_ref)], dtype=torch.float64)
        q_ref = log_qz[row, ids].exp()
        ref_q = torch.cat([q_ref, (1 - q_ref.sum()).view(1)])
        got_p = log_p[row][torch.isfinite(log_p[row])].exp()
        got_q = log_q[row][torch.isfinite(log_q[row])].exp()
        torch.testing.assert_close(got_p, ref_p, rtol=2e-3, atol=2e-3)  # fp32 projection of fp64 teacher
        torch.testing.assert_close(got_q, ref_q)
        fkl = (ref_p * (ref_p.log() - ref_q.log())).sum()
        torch.testing.assert_close(
            losses.forward_kl(log_p[row : row + 1], log_q[row : row + 1])[0], fkl, rtol=5e-3, atol=5e-3
        )


def test_bits_per_byte():
    assert xt.bits_per_byte(8 * math.log(2), 8) == pytest.approx(1.0)
    assert xt.bits_per_byte(3.0, 0) == pytest.approx(3.0 / math.log(2))  # no bytes: guarded, not a division by 0


# ---------------------------------------------------------------------------------------------------- ULD
def _dense_uld(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Reference: both full distributions sorted, the shorter padded with zeros, L1 per row."""
    width = max(p.shape[-1], q.shape[-1])
    ps = torch.nn.functional.pad(p.sort(-1, descending=True).values, (0, width - p.shape[-1]))
    qs = torch.nn.functional.pad(q.sort(-1, descending=True).values, (0, width - q.shape[-1]))
    return (ps - qs).abs().sum(-1)


@pytest.mark.parametrize("vt,vs", [(7, 5), (5, 7), (6, 6)])
def test_uld_equals_dense_when_k_covers_both_vocabularies(vt, vs):
    torch.manual_seed(vt * 10 + vs)
    n = 4
    p = torch.randn(n, vt, dtype=torch.float64).mul(2).softmax(-1)
    z = torch.randn(n, vs, dtype=torch.float64, requires_grad=True)
    k = max(vt, vs)
    log_p_sorted = torch.nn.functional.pad(p.sort(-1, descending=True).values.log(), (0, k - vt), value=-math.inf)
    log_q_sorted, log_q_rest = losses.student_sorted_bins(z, k)
    log_p, log_q = losses.join_bins(
        log_p_sorted, torch.full((n,), -math.inf, dtype=torch.float64), log_q_sorted, log_q_rest
    )
    got = losses.uld_distance(log_p, log_q)
    want = _dense_uld(p, z.softmax(-1))
    torch.testing.assert_close(got, want)
    (g_got,) = torch.autograd.grad(got.sum(), z)
    (g_want,) = torch.autograd.grad(_dense_uld(p, z.softmax(-1)).sum(), z)
    torch.testing.assert_close(g_got, g_want)


def test_uld_on_top_k_bins_is_the_tail_lumped_lower_bound():
    torch.manual_seed(3)
    n, vt, vs, k = 5, 11, 9, 3
    p = torch.randn(n, vt, dtype=torch.float64).mul(2).softmax(-1)
    z = torch.randn(n, vs, dtype=torch.float64)
    q = z.softmax(-1)
    top_p = p.sort(-1, descending=True).values
    top_q = q.sort(-1, descending=True).values
    log_q_sorted, log_q_rest = losses.student_sorted_bins(z, k)
    log_p, log_q = losses.join_bins(top_p[:, :k].log(), (1 - top_p[:, :k].sum(-1)).log(), log_q_sorted, log_q_rest)
    got = losses.uld_distance(log_p, log_q)
    want = (top_p[:, :k] - top_q[:, :k]).abs().sum(-1) + (top_p[:, k:].sum(-1) - top_q[:, k:].sum(-1)).abs()
    torch.testing.assert_close(got, want)
    assert (got <= _dense_uld(p, q) + 1e-12).all()


# ------------------------------------------------------------------------------------------ batches
def _reader_batch(small_cache):
    from kd_pipeline.train.reader import CacheReader

    return next(iter(CacheReader(small_cache, 6, shuffle=False, prefetch=0)))


def test_student_batches_with_the_teachers_tokenizer_are_the_cached_batch(small_cache, teacher_tok):
    from kd_pipeline.cache.format.manifest import load_cache

    info = load_cache(small_cache)
    batch = _reader_batch(small_cache)
    out = xt.student_batches(info, teacher_tok)(batch)
    assert (small_cache / xt.VOCAB_MAP_DIR).is_dir()  # the map is kept with the cache
    torch.testing.assert_close(out["input_ids"], batch["input_ids"])
    torch.testing.assert_close(out["target_mask"], batch["target_mask"])
    mask = batch["target_mask"]
    assert torch.equal(out["aligned"], mask) and torch.equal(out["matched"], mask)
    assert torch.equal(out["same_token"], mask)
    # Same support (ordered by mass, as cached), same log-probs up to fp32 rounding of exp/log, same tail; the
    # extra column (for a student token the teacher spells with several) stays empty.
    ids, lp = out["topk_ids"][mask], out["topk_logprobs"][mask]
    assert torch.isneginf(lp[:, 8]).all() and torch.equal(ids[:, 8], ids[:, 0])
    assert torch.equal(ids[:, :8].sort(-1).values, batch["topk_ids"][mask].sort(-1).values)
    torch.testing.assert_close(
        lp[:, :8].sort(-1).values, batch["topk_logprobs"][mask].float().sort(-1).values, rtol=0, atol=1e-5
    )
    torch.testing.assert_close(out["p_rest"][mask], losses.tail_mass(batch["topk_logprobs"][mask]))
    # The target's log-prob comes from the support where the target is in it: within the encoding's bound of
    # the stored target_logprob (both roundings of the teacher's one value).
    from kd_pipeline.cache.format.encodings import encoding_for

    bound = 1e-3 + encoding_for(info.manifest).error_bound()
    torch.testing.assert_close(out["target_logprob"][mask], batch["target_logprob"][mask].float(), rtol=0, atol=bound)


def test_student_batches_for_another_tokenizer(small_cache, student_tok, pieces):
    from kd_pipeline.cache.format.manifest import load_cache

    _, student = pieces
    batch = _reader_batch(small_cache)
    out = xt.student_batches(load_cache(small_cache), student_tok)(batch)
    b, m = out["input_ids"].shape
    assert b == 6 and out["topk_ids"].shape == (b, m - 1, 9)
    matched, aligned, trained = out["matched"], out["aligned"], out["target_mask"]
    assert (matched <= aligned).all() and (aligned <= trained).all() and (out["same_token"] <= aligned).all()
    assert 0 < out["same_token"].sum() < aligned.sum()
    # The student's whole-word tokens start where the teacher's shorter ones do: (nearly) every student target
    # aligns, and the teacher's extra boundaries inside words have no student counterpart.
    assert aligned.sum() / trained.sum() > 0.5 and trained.sum() < batch["target_mask"].sum()
    ids, lp = out["topk_ids"][matched], out["topk_logprobs"][matched]
    assert (ids >= 0).all() and (ids < student.vocab_size).all()
    torch.testing.assert_close(lp.exp().sum(-1) + out["p_rest"][matched], torch.ones(len(ids)), rtol=0, atol=2e-3)
    # Empty columns repeat an id listed before them in the row: no student token is claimed for them.
    empty = torch.isneginf(lp)
    first = losses.first_occurrence(ids.long())
    assert (~first <= empty).all() and (first | empty).all()
    # Bytes: every trained student target's text is counted once; the same text as the teacher's targets.
    t_bytes = xt.TokenPieces.of(_teacher_tok_of(small_cache)).text_bytes(batch["input_ids"][:, 1:].numpy())
    s_first = np.array([student.lengths[i] for i in out["input_ids"][:, 0].tolist()])
    t_first = xt.TokenPieces.of(_teacher_tok_of(small_cache)).lengths[batch["input_ids"][:, 0].numpy()]
    diff = (out["target_bytes"] * trained).sum(-1).numpy() - (t_bytes * batch["target_mask"].numpy()).sum(-1)
    assert (np.abs(diff) <= np.abs(s_first - t_first) + 1).all()  # only the first token (not a target) differs
    # A student token the teacher spells with several tokens gets the teacher's probability of its text along
    # them (the product of their cached target log-probs), moved out of the first one's share; the teacher's
    # log-prob of the target is its column.
    retok = xt.student_batches(load_cache(small_cache), student_tok).retokenizer
    proj = xt.student_batches(load_cache(small_cache), student_tok).mapping
    checked = 0
    for row in range(b):
        mask0 = np.concatenate([[False], batch["target_mask"][row].numpy()])
        seq = retok.sequences(batch["input_ids"][row : row + 1].numpy(), mask0[None])[0]
        for j in np.flatnonzero(out["matched"][row].numpy()):
            g = int(out["input_ids"][row, j + 1])
            row_ids, row_lp = out["topk_ids"][row, j], out["topk_logprobs"][row, j]
            t, last = seq.teacher_pos[j], seq.teacher_last[j]
            want = torch.where(row_ids == g, row_lp, -math.inf).max()
            if torch.isneginf(want) and last == t:  # one teacher token spells g, outside the top-k: its cached value
                want = torch.minimum(batch["target_logprob"][row, t].float(), out["p_rest"][row, j].log())
            assert torch.equal(out["target_logprob"][row, j], want)
            if last <= t:
                continue
            cached_ids = batch["topk_ids"][row, t].long()
            if (proj[cached_ids] == g).any():
                continue  # the teacher has a token for g's text itself: its own probability stands
            chain = batch["target_logprob"][row, t : last + 1].double().sum().exp()
            got = row_lp[row_ids == g].exp().sum()
            first = batch["input_ids"][row, t + 1]
            in_top = cached_ids == first
            share = batch["topk_logprobs"][row, t].float().exp()[in_top].sum() if in_top.any() else 1.0
            torch.testing.assert_close(
                got.double(), torch.minimum(chain, torch.tensor(float(share))).double(), rtol=1e-3, atol=1e-4
            )
            checked += 1
    assert checked >= 3  # multi-token spellings were exercised
    assert torch.isfinite(out["target_logprob"][matched]).float().mean() > 0.9


def _teacher_tok_of(cache):
    from transformers import AutoTokenizer

    from kd_pipeline.cache.format.layout import TOKENIZER_DIR

    return AutoTokenizer.from_pretrained(cache / TOKENIZER_DIR)


# ------------------------------------------------------------------------------------------- loss pieces
def test_repeated_columns_are_empty_bins_and_the_loss_is_the_loss_without_them():
    """A projected row [a, b, a(empty)] gives every bin loss the value of the row [a, b] (float64)."""
    torch.manual_seed(1)
    z = torch.randn(4, 10, dtype=torch.float64)
    ids = torch.tensor([[3, 7, 3], [1, 2, 1], [5, 6, 5], [0, 9, 0]])
    lp = torch.tensor([[-0.5, -2.0, -math.inf]] * 4, dtype=torch.float64)
    rest = (1 - lp.exp().sum(-1)).log()
    target = torch.tensor([3, 4, 6, 9])
    full = losses.student_bins(z, ids, target)
    log_p, log_q = losses.join_bins(lp, rest, xt.empty_repeats(full.log_q_support, ids), full.log_q_rest)
    short = losses.student_bins(z, ids[:, :2], target)
    log_p2, log_q2 = losses.join_bins(lp[:, :2], rest, short.log_q_support, short.log_q_rest)
    torch.testing.assert_close(log_q.exp().sum(-1), torch.ones(4, dtype=torch.float64))
    for f in (
        losses.forward_kl,
        losses.reverse_kl,
        losses.js_divergence,
        losses.skew_forward_kl,
        losses.skew_reverse_kl,
    ):
        torch.testing.assert_close(f(log_p, log_q), f(log_p2, log_q2))
    # ATKD: the target's bin is the first column holding it, whether or not a repeat follows.
    atkd_full = losses.student_bins(z, ids, target, include_target=True)
    atkd_full = atkd_full._replace(log_q_support=xt.empty_repeats(atkd_full.log_q_support, ids))
    atkd_short = losses.student_bins(z, ids[:, :2], target, include_target=True)
    t_lp = torch.tensor([-0.5, -1.5, -2.0, -1.0], dtype=torch.float64)
    a = losses.atkd_terms(*losses.atkd_bins(atkd_full, ids, target, lp, t_lp, rest.exp()))
    b = losses.atkd_terms(*losses.atkd_bins(atkd_short, ids[:, :2], target, lp[:, :2], t_lp, rest.exp()))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def test_mixed_loss_is_kd_where_aligned_and_ce_elsewhere():
    ce = torch.tensor([1.0, 2.0, 3.0, 4.0])
    kd_positions = torch.tensor([True, False, True, False])
    got = xt.mixed_loss(torch.tensor(0.5), kd_positions.sum(), ce, kd_positions)
    assert got.item() == pytest.approx((2 * 0.5 + 2.0 + 4.0) / 4)
    everywhere = torch.ones(4, dtype=torch.bool)
    assert xt.mixed_loss(torch.tensor(0.5), everywhere.sum(), ce, everywhere).item() == pytest.approx(0.5)


def test_uld_on_the_unmatched_part_equals_golds_dense_term():
    """GOLD's hybrid unmatched term, dense in float64: teacher probs over teacher ids without a student
    counterpart and student probs over student ids no teacher id maps to, each sorted, zero-padded, L1."""
    torch.manual_seed(5)
    n, vt, vs = 4, 9, 8
    mapping = torch.tensor([0, 1, -1, 2, -1, 3, -1, -1, 4])
    p = torch.randn(n, vt, dtype=torch.float64).mul(2).softmax(-1)
    z = torch.randn(n, vs, dtype=torch.float64, requires_grad=True)
    student_unmatched = torch.ones(vs, dtype=torch.bool)
    student_unmatched[mapping[mapping >= 0]] = False
    # Dense reference.
    u = p[:, mapping < 0]
    v = z.softmax(-1)[:, student_unmatched]
    want = _dense_uld(u, v)
    # Ours from a top-k cache that holds the whole teacher vocabulary (k = V_t): matched columns set to -inf.
    top = p.log().sort(-1, descending=True)
    unmatched_cols = mapping[top.indices] < 0
    got = losses.uld_unmatched(top.values.masked_fill(~unmatched_cols, -math.inf), z, student_unmatched)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(
        *(torch.autograd.grad(x.sum(), z)[0] for x in (got, _dense_uld(u, z.softmax(-1)[:, student_unmatched])))
    )


# ------------------------------------------------------------------------------------ the trainer's seam
@pytest.mark.parametrize("fused", [False, True])
def test_cross_tokenizer_with_the_teachers_tokenizer_gives_the_normal_loss(
    small_cache, student_config, teacher_tok, fused
):
    """Every registered loss, its parts and the eval numbers: the cross-tokenizer path (re-tokenized batches,
    projected bins, CE elsewhere) on the teacher's own tokenizer is the normal path, up to fp32 rounding."""
    import contextlib

    from kd_pipeline.cache.format.manifest import load_cache
    from kd_pipeline.train import trainer

    info = load_cache(small_cache)
    model = trainer.load_student(str(student_config), info, seed=0)
    batch = _reader_batch(small_cache)
    projected = xt.student_batches(info, teacher_tok)
    off = contextlib.nullcontext()
    cpu = torch.device("cpu")
    for name in losses.LOSS_NAMES:
        if fused and losses.LOSSES[name].needs_logits:
            continue
        cfg = trainer.DistillConfig(
            student="s", cache=small_cache, out=small_cache, loss=name, fused_loss=fused, ce_weight=0.5
        )
        loss = losses.build_loss(name, cfg)
        want = trainer.batch_losses(model, batch, cfg, loss, cpu, off, trainer.CACHED_TEACHER)
        got = trainer.batch_losses(model, projected(batch), cfg, loss, cpu, off, trainer.ProjectedTeacher())
        for field in ("total", "kd", "ce", "kl", "soft_ce"):
            torch.testing.assert_close(
                getattr(got, field), getattr(want, field), rtol=2e-5, atol=2e-6, msg=f"{name} {field}"
            )
    from kd_pipeline.train.parallel import Dist
    from kd_pipeline.train.reader import CacheReader

    reader = CacheReader(info, 8, shuffle=False, prefetch=0, drop_remainder=False)
    same = trainer.evaluate(
        model, reader, cpu, off, Dist(), fused_loss=fused, tokens=xt.CachedTokens(xt.TokenPieces.of(teacher_tok))
    )
    cross = trainer.evaluate(model, reader, cpu, off, Dist(), fused_loss=fused, tokens=projected)
    assert same.keys() == cross.keys() and same["eval_tokens"] == cross["eval_tokens"] == cross["eval_kd_tokens"]
    for key in same:
        assert cross[key] == pytest.approx(same[key], rel=1e-5, abs=1e-6), key


def _distill(student, cache, out, *extra) -> dict:
    from typer.testing import CliRunner

    from kd_pipeline.pipeline import app

    result = CliRunner().invoke(
        app,
        [
            "distill",
            "--student",
            str(student),
            "--cache",
            str(cache),
            "--out",
            str(out),
            "--batch-size",
            "8",
            "--lr",
            "3e-3",
            "--warmup-steps",
            "5",
            "--eval-every",
            "1000",
            "--eval-sequences",
            "12",
            "--save-every",
            "1000",
            "--no-progress",
            *extra,
        ],
    )
    assert result.exit_code == 0, result.output[-3000:]
    import json

    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "eval_bpb" in line][-1]


@pytest.fixture(scope="module")
def taught_cache(tmp_path_factory, corpus_jsonl):
    """The cache of a teacher that knows the language of the corpus (a random one knows nothing a student could
    learn): the bigram model of its tokens, counted on other documents of the same generator, as a Llama with no
    decoder layer (one-hot embeddings, the log-probabilities in the head), cached the usual way. Its tokenizer is
    conftest's byte-level BPE with enough merges for whole words, as real vocabularies have for common ones."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kd_pipeline.cache.build import CacheConfig, cache_teacher
    from tests.conftest import build_tokenizer, make_corpus

    root = tmp_path_factory.mktemp("taught")
    tok = build_tokenizer(root / "teacher", vocab_size=600)
    v = len(tok)
    counts = np.zeros((v, v))
    for doc in make_corpus(200, seed=123):  # not the cached documents
        ids = tok(doc)["input_ids"] + [tok.eos_token_id]
        np.add.at(counts, (ids[:-1], ids[1:]), 1.0)
    unigram = (counts.sum(0) + 0.01) / (counts.sum() + 0.01 * v)
    log_p = np.log((counts + 100 * unigram) / (counts.sum(1, keepdims=True) + 100))  # backed off to the unigram
    width = v + (-v % 8)
    config = LlamaConfig(
        vocab_size=v,
        hidden_size=width,
        intermediate_size=8,
        num_hidden_layers=0,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        rms_norm_eps=1e-12,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # the final norm scales a one-hot row by sqrt(width): the head undoes it
        model.model.embed_tokens.weight.copy_(torch.eye(v, width))
        model.lm_head.weight.zero_()[:, :v] = torch.from_numpy(log_p.T / math.sqrt(width))
    model.save_pretrained(root / "teacher")
    out = root / "cache"
    cache_teacher(
        CacheConfig(
            teacher=str(root / "teacher"),
            data=str(corpus_jsonl),
            out=out,
            top_k=64,
            seq_len=32,
            batch_size=8,
            max_sequences=90,
            progress=False,
        )
    )
    return out


def test_cross_tokenizer_kd_beats_ce_in_heldout_bits_per_byte(tmp_path, taught_cache, sentencepiece_tokenizer_dir):
    """`pipeline distill --cross-tokenizer`, a student of the SentencePiece tokenizer (another vocabulary, byte
    fallback, another eos): distilling the byte-level teacher's cache ends below CE alone in held-out bits per byte."""
    from transformers import AutoTokenizer, LlamaConfig

    student = tmp_path / "student"
    tok = AutoTokenizer.from_pretrained(sentencepiece_tokenizer_dir)
    tok.save_pretrained(student)
    LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    ).save_pretrained(student)
    steps = ("--max-steps", "60", "--cross-tokenizer")
    ce = _distill(student, taught_cache, tmp_path / "ce", "--loss", "ce", *steps)
    kd = _distill(student, taught_cache, tmp_path / "fkl", "--loss", "fkl", *steps)
    assert ce["eval_tokens"] == kd["eval_tokens"] and 0.5 * kd["eval_tokens"] < kd["eval_kd_tokens"] < kd["eval_tokens"]
    assert kd["eval_bpb"] < ce["eval_bpb"], (kd["eval_bpb"], ce["eval_bpb"])  # 1.333 against 1.346 when written
    saved = AutoTokenizer.from_pretrained(tmp_path / "fkl" / "final")  # the student keeps its own tokenizer
    assert saved.get_vocab() == tok.get_vocab()
