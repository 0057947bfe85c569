"""`pipeline generate`: the SWITCH rule on models whose distributions we set, batching and KV cache against
full recomputation on real tiny models, modes, resume, and the output as cache-teacher input."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from kd_pipeline.cache.generate import GenerateConfig, Models, generate, jensen_shannon, switch_threshold
from kd_pipeline.errors import GenerateError
from kd_pipeline.pipeline import app

PROMPT_LEN = 4  # every prompt of the table tests has this many tokens


class TableLM(torch.nn.Module):
    """A causal LM whose next-token logits are a function of the position only: the logits read at position
    p (which predict the token after it) are ``table[p]``. Generated token t of a prompt of length L is
    predicted at position L - 1 + t. Counts its forward calls."""

    def __init__(self, table: torch.Tensor, eos_token_id: int):
        super().__init__()
        self.table = table
        self.lm_head = torch.nn.Linear(1, table.shape[1], bias=False)
        self.generation_config = SimpleNamespace(eos_token_id=eos_token_id)
        self.calls = 0

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask, position_ids, past_key_values=None, use_cache=True, logits_to_keep=0):
        self.calls += 1
        return SimpleNamespace(logits=self.table[position_ids], past_key_values=past_key_values)


class BigramLM(TableLM):
    """Next-token logits are a function of the last input token only: ``table[token]``."""

    def forward(self, input_ids, attention_mask, position_ids, past_key_values=None, use_cache=True, logits_to_keep=0):
        self.calls += 1
        return SimpleNamespace(logits=self.table[input_ids], past_key_values=past_key_values)


def peaked(vocab: int, positions: int, token: int, height: float = 10.0) -> torch.Tensor:
    table = torch.zeros(positions, vocab)
    table[:, token] = height
    return table


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def plain_prompts(tmp_path_factory, tok) -> Path:
    """Five plain prompts of exactly PROMPT_LEN tokens each."""
    from tests.conftest import make_corpus

    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    candidates = (" ".join(doc.split()[:n]) for doc in make_corpus(50, seed=3) for n in range(1, 5))
    texts = [t for t in dict.fromkeys(candidates) if len(tok(t)["input_ids"]) == PROMPT_LEN][:5]
    assert len(texts) == 5
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    return path


def run(tok, prompts, out, teacher=None, student=None, **kw):
    cfg = GenerateConfig(
        prompts=str(prompts),
        out=Path(out),
        teacher="table-teacher" if teacher is not None else None,
        student="table-student" if student is not None else None,
        progress=False,
        **kw,
    )
    summary = generate(cfg, Models(tok, teacher, student, torch.device("cpu")))
    return summary, [json.loads(line) for line in Path(out).read_text().splitlines()]


def reference_jsd(a: torch.Tensor, b: torch.Tensor) -> float:
    p, q = (torch.softmax(x.double(), -1).numpy() for x in (a, b))
    m = (p + q) / 2
    return float(0.5 * (p * np.log(p / m)).sum() + 0.5 * (q * np.log(q / m)).sum())


def test_jsd_matches_the_definition_and_is_bounded():
    torch.manual_seed(0)
    a, b = torch.randn(6, 50) * 3, torch.randn(6, 50) * 3
    got = jensen_shannon(a, b)
    expected = torch.tensor([reference_jsd(x, y) for x, y in zip(a, b)], dtype=torch.float64)
    assert torch.allclose(got.double(), expected, atol=1e-6)
    assert jensen_shannon(a, a).abs().max() < 1e-6
    opposite = torch.tensor([[100.0, 0.0], [0.0, 100.0]])
    assert jensen_shannon(opposite[:1], opposite[1:]).item() == pytest.approx(math.log(2), abs=1e-6)
    masked = torch.tensor([[0.0, -float("inf"), 1.0]])  # -inf logits (masked tokens) stay finite
    assert torch.isfinite(jensen_shannon(masked, torch.zeros(1, 3))).all()


def test_teacher_steps_in_exactly_where_the_models_disagree(tmp_path, tok, plain_prompts):
    """Same peaked distribution everywhere except: strong disagreement at response tokens 2 and 5 (the
    teacher must write those), a mild one at token 3 (below the threshold: the student's token stays)."""
    vocab, eos = len(tok), tok.eos_token_id
    A, B = 50, 60
    t_table, s_table = peaked(vocab, 64, A), peaked(vocab, 64, A)
    for t in (2, 5):
        s_table[PROMPT_LEN - 1 + t] = peaked(vocab, 1, B)[0]
    mild = PROMPT_LEN - 1 + 3  # the teacher slightly prefers A, the student slightly B
    t_table[mild], s_table[mild] = 0.0, 0.0
    t_table[mild, [A, B]], s_table[mild, [A, B]] = torch.tensor([1.0, 0.9]), torch.tensor([0.9, 1.0])
    teacher, student = TableLM(t_table, eos), TableLM(s_table, eos)
    summary, records = run(
        tok,
        plain_prompts,
        tmp_path / "out.jsonl",
        teacher,
        student,
        tau0=0.3,
        decay=0.0,
        max_new_tokens=8,
        batch_size=2,
    )
    assert [r["index"] for r in records] == list(range(5)) and summary.generated == 5
    for r in records:
        assert r["teacher_chosen"] == [t in (2, 5) for t in range(8)]
        assert r["token_ids"] == [A, A, A, B, A, A, A, A]  # the student's B at the mild position
        assert r["finish_reason"] == "length" and r["text"] == r["prompt"] + r["response"]
        expected = [
            reference_jsd(teacher.table[PROMPT_LEN - 1 + t], student.table[PROMPT_LEN - 1 + t]) for t in range(8)
        ]
        assert r["jsd"] == pytest.approx(expected, abs=1e-5)
        assert r["jsd"][3] < 0.01 and min(r["jsd"][2], r["jsd"][5]) > 0.5
    assert summary.teacher_tokens == 10 and summary.tokens == 40


def test_threshold_decays_with_the_response_position(tmp_path, tok, plain_prompts):
    """A constant disagreement c < tau0 is ignored until tau0 * exp(-lambda * t) falls below it."""
    vocab, eos = len(tok), tok.eos_token_id
    teacher, student = peaked(vocab, 64, 50, height=5.5), peaked(vocab, 64, 60, height=5.5)
    c = reference_jsd(teacher[0], student[0])
    tau0, decay = 0.5, 0.1
    crossing = math.floor(math.log(tau0 / c) / decay) + 1  # first t with c > tau_t
    assert 2 <= crossing <= 10
    _, records = run(
        tok,
        plain_prompts,
        tmp_path / "out.jsonl",
        TableLM(teacher, eos),
        TableLM(student, eos),
        tau0=tau0,
        decay=decay,
        max_new_tokens=16,
        max_prompts=1,
    )
    [r] = records
    assert r["teacher_chosen"] == [t >= crossing for t in range(16)]
    assert r["token_ids"] == [50 if t >= crossing else 60 for t in range(16)]
    assert switch_threshold(0, tau0, decay) == tau0
    assert switch_threshold(crossing, tau0, decay) < c < switch_threshold(crossing - 1, tau0, decay)
    assert switch_threshold(10, tau0, decay) == pytest.approx(tau0 / math.e)


@pytest.mark.parametrize("mode", ["teacher", "student"])
def test_single_writer_modes(tmp_path, tok, plain_prompts, mode):
    vocab, eos = len(tok), tok.eos_token_id
    teacher, student = TableLM(peaked(vocab, 64, 50), eos), TableLM(peaked(vocab, 64, 60), eos)
    writer = 50 if mode == "teacher" else 60
    # With both models loaded, the JSD is recorded as a diagnostic; it would bring the teacher in under switch.
    _, both = run(tok, plain_prompts, tmp_path / "both.jsonl", teacher, student, mode=mode, max_new_tokens=5)
    assert all(r["teacher_chosen"] == [mode == "teacher"] * 5 and r["token_ids"] == [writer] * 5 for r in both)
    assert all(min(r["jsd"]) > 0.5 for r in both)
    # The writer alone: no JSD, and the other model is never needed.
    alone = {"teacher": teacher} if mode == "teacher" else {"student": student}
    _, records = run(tok, plain_prompts, tmp_path / "alone.jsonl", mode=mode, max_new_tokens=5, **alone)
    assert all(r["jsd"] is None and r["token_ids"] == [writer] * 5 for r in records)
    with pytest.raises(ValueError, match="--mode switch needs --student"):
        GenerateConfig(prompts="x", out=tmp_path / "x", teacher="t").validate()


def test_eos_stops_each_row_at_its_own_position(tmp_path, tok):
    """Prompts of different lengths in one left-padded batch: EOS at an absolute position ends each row at
    a different response index, and finished rows stay finished."""
    vocab, eos = len(tok), tok.eos_token_id
    texts = ["The sea", "The sea whale ship captain"]
    lengths = [len(tok(t)["input_ids"]) for t in texts]
    assert lengths[0] < lengths[1]
    stop_at = lengths[1] + 2  # the token after this absolute position is EOS
    table = peaked(vocab, 64, 50)
    table[stop_at] = peaked(vocab, 1, eos)[0]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    _, records = run(tok, prompts, tmp_path / "out.jsonl", TableLM(table, eos), mode="teacher", max_new_tokens=40)
    for length, r in zip(lengths, records):
        n = stop_at - (length - 1) + 1
        assert r["finish_reason"] == "eos" and r["token_ids"] == [50] * (n - 1) + [eos]
        assert len(r["teacher_chosen"]) == n and eos not in tok(r["response"])["input_ids"]


def test_sampling_depends_on_seed_and_prompt_not_on_batching(tmp_path, tok, plain_prompts):
    vocab, eos = len(tok), tok.eos_token_id
    torch.manual_seed(0)
    teacher, student = TableLM(torch.randn(64, vocab), eos), TableLM(torch.randn(64, vocab), eos)
    kw = dict(temperature=1.0, top_p=0.9, max_new_tokens=12, tau0=0.4, decay=0.05)
    _, a = run(tok, plain_prompts, tmp_path / "a.jsonl", teacher, student, batch_size=5, **kw)
    _, b = run(tok, plain_prompts, tmp_path / "b.jsonl", teacher, student, batch_size=2, **kw)
    _, c = run(tok, plain_prompts, tmp_path / "c.jsonl", teacher, student, batch_size=5, seed=1, **kw)
    assert a == b
    assert [r["token_ids"] for r in a] != [r["token_ids"] for r in c]
    assert len({tuple(r["token_ids"]) for r in a}) == 5  # same position tables, different draws per prompt
    # top-p: every sampled token is inside the nucleus of the distribution it was drawn from.
    for r in a:
        for t, (token, from_teacher) in enumerate(zip(r["token_ids"], r["teacher_chosen"])):
            probs = torch.softmax((teacher if from_teacher else student).table[PROMPT_LEN - 1 + t], -1)
            assert (probs > probs[token]).float().mul(probs).sum() < 0.9


def test_resume_skips_finished_prompts_and_repairs_a_torn_line(tmp_path, tok, plain_prompts):
    vocab, eos = len(tok), tok.eos_token_id
    out = tmp_path / "out.jsonl"
    teacher, student = TableLM(peaked(vocab, 64, 50, 3.0), eos), TableLM(peaked(vocab, 64, 60, 3.0), eos)
    kw = dict(max_new_tokens=6, batch_size=2)
    _, first = run(tok, plain_prompts, out, teacher, student, max_prompts=3, **kw)
    assert [r["index"] for r in first] == [0, 1, 2]
    before = out.read_bytes()
    with open(out, "ab") as f:  # killed while appending the next batch
        f.write(b'{"index": 3, "prompt": "The sea wh')
    teacher.calls = 0
    summary, records = run(tok, plain_prompts, out, teacher, student, **kw)
    assert (summary.skipped, summary.generated, summary.prompts) == (3, 2, 5)
    assert out.read_bytes().startswith(before) and [r["index"] for r in records] == list(range(5))
    assert teacher.calls == 6  # one batch of the two remaining prompts: a prefill and 5 decode steps
    summary, _ = run(tok, plain_prompts, out, teacher, student, **kw)  # nothing left
    assert summary.generated == 0 and json.loads(Path(f"{out}.meta.json").read_text())["records"] == 5
    with pytest.raises(GenerateError, match="tau0: 0.5 != 0.3"):
        run(tok, plain_prompts, out, teacher, student, tau0=0.3, **kw)
    _, records = run(tok, plain_prompts, out, teacher, student, tau0=0.3, overwrite=True, **kw)
    assert len(records) == 5


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, tokenizer_dir) -> Path:
    from transformers import AutoTokenizer

    from tests.conftest import build_llama

    d = tmp_path_factory.mktemp("gen_student")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.save_pretrained(d)
    build_llama(d, len(tok), layers=1, hidden=32, seed=7)
    return d


def test_real_models_kv_cache_and_padding_match_full_recomputation(tmp_path, tok, teacher_dir, student_dir):
    """CLI run of SWITCH on two tiny Llamas, prompts of several lengths batched together: every recorded
    JSD equals one computed from a fresh full forward over prompt + response, the teacher wrote exactly
    where JSD > tau_t, and teacher-only greedy output equals transformers' own generate()."""
    from transformers import AutoModelForCausalLM

    prompts = tmp_path / "p.jsonl"
    texts = ["The whale", "Ahab said to the crew under the dark night", "A ship", "Queequeg and Starbuck went"]
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    out, teacher_only = tmp_path / "switch.jsonl", tmp_path / "teacher.jsonl"
    common = [
        "generate",
        "--prompts",
        str(prompts),
        "--teacher",
        str(teacher_dir),
        "--max-new-tokens",
        "10",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--no-progress",
    ]
    switch = ["--out", str(out), "--student", str(student_dir), "--tau0", "0.35", "--decay", "0.15"]
    for extra in (switch, ["--out", str(teacher_only), "--mode", "teacher"]):
        result = CliRunner().invoke(app, [*common, *extra])
        assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    models = {
        name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        for name, path in (("t", teacher_dir), ("s", student_dir))
    }
    teacher_share = []
    for text, r in zip(texts, records):
        ids = tok(text)["input_ids"] + r["token_ids"]
        with torch.no_grad():
            t_logits, s_logits = (m(input_ids=torch.tensor([ids])).logits[0] for m in models.values())
        at = slice(len(ids) - len(r["token_ids"]) - 1, len(ids) - 1)
        assert r["jsd"] == pytest.approx(jensen_shannon(t_logits[at], s_logits[at]).tolist(), abs=1e-4)
        assert r["teacher_chosen"] == [j > switch_threshold(t, 0.35, 0.15) for t, j in enumerate(r["jsd"])]
        writer = torch.where(torch.tensor(r["teacher_chosen"])[:, None], t_logits[at], s_logits[at]).argmax(-1)
        assert writer.tolist() == r["token_ids"]
        teacher_share += r["teacher_chosen"]
    assert 0 < sum(teacher_share) < len(teacher_share)  # the rule did switch, both ways

    stop = models["t"].generation_config.eos_token_id
    for text, line in zip(texts, teacher_only.read_text().splitlines()):
        ids = tok(text)["input_ids"]
        ref = models["t"].generate(
            torch.tensor([ids]),
            max_new_tokens=10,
            do_sample=False,
            eos_token_id=[tok.eos_token_id, stop],
            pad_token_id=tok.pad_token_id,
        )
        assert json.loads(line)["token_ids"] == ref[0, len(ids) :].tolist()


def test_chat_output_trains_only_the_response_in_cache_teacher(tmp_path, tok, teacher_dir):
    """Chat prompts rendered with the template; the reply is appended as the assistant turn, so the cache
    built from the output trains exactly the response and its end-of-turn token."""
    from kd_pipeline import read_all
    from kd_pipeline.cache.build import CacheConfig, cache_teacher
    from kd_pipeline.cache.format.manifest import load_cache

    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    reply_text = "The old ship"
    reply = tok(reply_text, add_special_tokens=False)["input_ids"]
    prompts = tmp_path / "chat.jsonl"
    conversations = [
        [{"role": "user", "content": "hello captain"}],
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "where is the ship"},
            {"role": "assistant", "content": "to be regenerated"},
        ],
        "plain prompt turned into a user turn",
    ]
    inputs = ({"messages": c} if isinstance(c, list) else {"prompt": c} for c in conversations)
    prompts.write_text("".join(json.dumps(r) + "\n" for r in inputs))
    start = tok(
        tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    )["input_ids"][-1]
    table = peaked(len(tok), len(tok), im_end)  # a bigram model: after `start`, write the reply, then stop
    assert len({start, *reply}) == len(reply) + 1  # each token has one successor
    for a, b in zip([start, *reply], [*reply, im_end]):
        table[a] = peaked(len(tok), 1, b)[0]
    out = tmp_path / "out.jsonl"
    _, records = run(tok, prompts, out, BigramLM(table, im_end), mode="teacher", chat=True, max_new_tokens=12)
    for r in records:
        assert r["response"] == reply_text and r["finish_reason"] == "eos"
        assert r["messages"][-1] == {"role": "assistant", "content": reply_text}
        assert "to be regenerated" not in r["prompt"] and r["prompt"].endswith("<|im_start|>assistant\n")
    assert records[2]["messages"][0] == {"role": "user", "content": "plain prompt turned into a user turn"}

    cache = tmp_path / "cache"
    cache_teacher(CacheConfig(teacher=str(teacher_dir), data=str(out), out=cache, top_k=4, seq_len=256, progress=False))
    info = load_cache(cache)
    rows = read_all(info)
    trained = tok.decode(rows.input_ids[rows.loss_mask].tolist())
    assert trained == f"{reply_text}<|im_end|>" * 3
