"""Several caches, one student (train/sources.py): the mixture's plan (proportions, order, resume, ranks), the
ensemble's batches, refusals, and two-teacher runs end to end with per-source eval (docs/multi-teacher.md)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import build_llama, make_corpus
from typer.testing import CliRunner

from kd_pipeline.errors import CacheError, ConfigError
from kd_pipeline.pipeline import app
from kd_pipeline.train import sources
from kd_pipeline.train.ensemble import combine_teachers
from kd_pipeline.train.reader import CacheReader
from kd_pipeline.train.trainer import DistillConfig, distill, latest_checkpoint


def build_cache(out: Path, teacher: Path, data: Path, *, top_k=8, seq_len=32, sequences=90) -> Path:
    from kd_pipeline.cache.build import CacheConfig, cache_teacher

    cache_teacher(
        CacheConfig(
            teacher=str(teacher),
            data=str(data),
            out=out,
            top_k=top_k,
            seq_len=seq_len,
            batch_size=8,
            shard_tokens=seq_len * 6,
            row_group_tokens=seq_len * 4,
            max_sequences=sequences,
            progress=False,
        )
    )
    return out


@pytest.fixture(scope="module")
def other_data_cache(tmp_path_factory, teacher_dir) -> Path:
    """The same teacher on other documents, in longer sequences (48 tokens): a mixture's second source."""
    d = tmp_path_factory.mktemp("other_data")
    path = d / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in make_corpus(60, seed=7)))
    return build_cache(d / "verse", teacher_dir, path, seq_len=48, sequences=60)


@pytest.fixture(scope="module")
def second_teacher_cache(tmp_path_factory, tokenizer_dir, corpus_jsonl) -> Path:
    """Another teacher (other weights, k = 6) on small_cache's very token stream: an ensemble's second member."""
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("teacher2")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.save_pretrained(d / "model")
    build_llama(d / "model", len(tok), layers=2, hidden=64, seed=5)
    return build_cache(d / "second", d / "model", corpus_jsonl, top_k=6)


def config(student, caches, out, **kw) -> DistillConfig:
    base = dict(
        student=str(student),
        cache=[str(c) for c in caches],
        out=Path(out),
        batch_size=4,
        lr=3e-3,
        max_steps=6,
        eval_every=1000,
        eval_sequences=8,
        save_every=1000,
        log_every=1,
        progress=False,
    )
    base.update(kw)
    return DistillConfig(**base)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------ options
def test_cache_values_names_and_weights(tmp_path):
    (tmp_path / "a=b").mkdir()  # a folder whose name holds '=' stays a path
    specs = sources.parse_caches(["math=/x/y", "/data/prose", str(tmp_path / "a=b")])
    assert [(s.name, str(s.path)) for s in specs] == [
        ("math", "/x/y"),
        ("prose", "/data/prose"),
        ("a=b", str(tmp_path / "a=b")),
    ]
    assert sources.parse_caches(Path("/data/one")) == [sources.CacheSpec("one", "/data/one")]
    assert sources.parse_caches("s3://bucket/caches/run1") == [sources.CacheSpec("run1", "s3://bucket/caches/run1")]
    assert DistillConfig(student="s", cache=Path("/c"), out=Path("o")).cache == ["/c"]  # one path: a list of one
    with pytest.raises(ConfigError, match="two caches are named 'cache'"):
        sources.parse_caches(["/a/cache", "/b/cache"])
    assert sources.parse_weights("1,3", 2) == [0.25, 0.75]
    assert sources.parse_weights(None, 3) is None
    for bad, match in (("0.3", "1 values for 2"), ("1,-1", ">= 0"), ("0,0", "one > 0"), ("a,b", "numbers")):
        with pytest.raises(ConfigError, match=match):
            sources.parse_weights(bad, 2)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(combine="blend"), "--combine must be one of"),
        (dict(cache_weights="1,2,3"), "3 values for 2"),
        (dict(ensemble_temperature=1.0), "--ensemble-temperature weighs"),
        (dict(combine="ensemble", ensemble_temperature=0.0), "finite and > 0"),
        (dict(combine="ensemble", loss="uld"), "--loss uld ranks"),
        (dict(combine="ensemble", cross_tokenizer=True), "not supported"),
    ],
)
def test_option_refusals(kw, match):
    with pytest.raises(ConfigError, match=match):
        DistillConfig(student="s", cache=["a=/x", "b=/y"], out=Path("o"), **kw).validate()


# ------------------------------------------------------------------------------------------- the plan
def test_plan_keeps_token_proportions_at_every_prefix():
    """Weights 0.3 / 0.7 with 31 and 47 trained tokens per batch: after every batch, each cache's share of the
    tokens drawn is its weight to within one batch of it."""
    weights, per_batch = [0.3, 0.7], [31.0, 47.0]
    strides = [p / w for p, w in zip(per_batch, weights)]
    plan = sources.mixture_plan(strides, 2000)
    tokens = [0.0, 0.0]
    for n, i in enumerate(plan, 1):
        tokens[i] += per_batch[i]
        total = sum(tokens)
        for j in range(2):
            assert abs(tokens[j] - weights[j] * total) <= per_batch[j] + 1e-9, (n, j)
    assert tokens[0] / sum(tokens) == pytest.approx(0.3, abs=0.01)
    # A pure function of the counts: continuing from any point gives the same rest.
    counts = [plan[:777].count(0), plan[:777].count(1)]
    assert sources.mixture_plan(strides, 300, counts) == plan[777:1077]
    # A weight of 0 never draws that cache.
    assert set(sources.mixture_plan([1.0, float("inf")], 50)) == {0}


def mixture(caches, weights, rank=0, world=1, seed=3, batch=4):
    infos = [sources.load_cache(c) for c in caches]
    readers = [CacheReader(i, batch, seed=seed, shuffle_rows=8, rank=rank, world_size=world) for i in infos]
    per_batch = [sources.trained_per_sequence(i) * batch for i in infos]
    tag = [lambda b, i=i: {**b, "source": i} for i in range(len(caches))]
    return sources.Mixture([f"c{i}" for i in range(len(caches))], readers, tag, weights, per_batch)


def take(mix, n) -> list[tuple[int, tuple[int, ...]]]:
    it = iter(mix)
    try:
        return [(b["source"], tuple(b["seq_ids"].tolist())) for b, _ in zip(it, range(n))]
    finally:
        it.close()


def test_mixture_is_deterministic_resumes_exactly_and_shards_over_ranks(small_cache, other_data_cache):
    caches = [small_cache, other_data_cache]
    first = take(mixture(caches, [0.4, 0.6]), 60)
    assert first == take(mixture(caches, [0.4, 0.6]), 60)  # the same seed: the same batches in the same order
    assert first != take(mixture(caches, [0.4, 0.6], seed=4), 60)
    # Trained tokens per source follow the weights, though a batch of one holds more than one of the other.
    mix = mixture(caches, [0.4, 0.6])
    per_batch = [sources.trained_per_sequence(sources.load_cache(c)) for c in caches]
    assert per_batch[1] > per_batch[0]  # 48- and 32-token sequences
    drawn = [sum(1 for s, _ in first if s == i) for i in range(2)]
    share = drawn[0] * per_batch[0] / (drawn[0] * per_batch[0] + drawn[1] * per_batch[1])
    assert share == pytest.approx(0.4, abs=0.03)
    # Resume: the state after 23 batches continues with batches 24.. of the uninterrupted order, across epochs.
    it = iter(mix)
    for _ in range(23):
        next(it)
    state = json.loads(json.dumps(mix.state_dict()))
    it.close()
    resumed = mixture(caches, [0.4, 0.6])
    resumed.load_state_dict(state)
    assert take(resumed, 37) == first[23:]
    # Two ranks: the same plan of sources, disjoint sequences of each cache.
    r0, r1 = take(mixture(caches, [0.4, 0.6], 0, 2), 20), take(mixture(caches, [0.4, 0.6], 1, 2), 20)
    assert [s for s, _ in r0] == [s for s, _ in r1]
    for src in range(2):
        a = {q for s, ids in r0[:6] if s == src for q in ids}
        b = {q for s, ids in r1[:6] if s == src for q in ids}
        assert a and b and not a & b


# ----------------------------------------------------------------------------------------- ensemble
def test_ensemble_batches_are_the_combined_teachers(small_cache, second_teacher_cache):
    infos = [sources.load_cache(c) for c in (small_cache, second_teacher_cache)]
    readers = [CacheReader(i, 4, seed=1, shuffle_rows=8) for i in infos]
    ens = sources.Ensemble(["a", "b"], readers, lambda b: b, [0.25, 0.75])
    plain = [next(iter(CacheReader(i, 4, seed=1, shuffle_rows=8))) for i in infos]
    it = iter(ens)
    got = next(it)
    it.close()
    mask = plain[0]["target_mask"]
    assert torch.equal(got["seq_ids"], plain[1]["seq_ids"]) and got["topk_ids"].shape[-1] == 8 + 6
    ids, lps, p_rest, tlp = combine_teachers(
        [p["topk_ids"][mask] for p in plain],
        [p["topk_logprobs"][mask] for p in plain],
        [p["target_logprob"][mask].float() for p in plain],
        torch.tensor([0.25, 0.75]),
        target_ids=plain[0]["input_ids"][:, 1:][mask],
    )
    assert torch.equal(got["topk_ids"][mask].long(), ids)
    assert torch.equal(got["topk_logprobs"][mask], lps)
    assert torch.allclose(got["p_rest"][mask], p_rest) and torch.allclose(got["target_logprob"][mask], tlp)
    # A distribution at every trained position: the bins and the rest bin sum to 1.
    total = got["topk_logprobs"][mask].double().exp().sum(-1) + got["p_rest"][mask].double()
    assert torch.allclose(total, torch.ones_like(total), atol=1e-5)
    # The target log-prob is the mixture's, exactly: log(0.25 p_a(g) + 0.75 p_b(g)).
    want = torch.log(
        0.25 * plain[0]["target_logprob"][mask].double().exp() + 0.75 * plain[1]["target_logprob"][mask].double().exp()
    )
    assert torch.allclose(got["target_logprob"][mask].double(), want, atol=1e-5)


def test_ensemble_of_other_data_is_refused(tmp_path, small_cache, other_data_cache, student_config):
    cfg = config(student_config, [small_cache, other_data_cache], tmp_path / "run", combine="ensemble")
    with pytest.raises(CacheError, match="cannot be combined with cache.*another packing.*another token stream"):
        distill(cfg)


def test_other_student_tokenizer_is_refused_per_cache(tmp_path, small_cache, sentencepiece_tokenizer_dir):
    student = tmp_path / "student"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(sentencepiece_tokenizer_dir)
    tok.save_pretrained(student)
    build_llama(student, len(tok), layers=1, hidden=32)
    with pytest.raises(CacheError, match="differs from the teacher's in .*--cross-tokenizer"):
        distill(config(student, [f"a={small_cache}", f"b={small_cache}"], tmp_path / "run"))


# ----------------------------------------------------------------------------------------- end to end
def test_two_teacher_mixture_reports_each_source(tmp_path, small_cache, other_data_cache, student_config):
    out = tmp_path / "mix"
    last = distill(
        config(
            student_config,
            [f"prose={small_cache}", f"verse={other_data_cache}"],
            out,
            cache_weights="1,1",
            max_steps=8,
            eval_every=4,
        )
    )
    for key in ("eval_kl", "eval_ce", "eval_bpb", "eval_kl/prose", "eval_kl/verse", "eval_bpb/verse"):
        assert key in last and last[key] > 0, key
    evals = [m for m in metrics(out) if "eval_kl" in m]
    assert [m["step"] for m in evals] == [0, 4, 8]
    for m in evals:  # the totals pool the sources, token-weighted
        n = m["eval_kd_tokens/prose"], m["eval_kd_tokens/verse"]
        assert m["eval_kd_tokens"] == sum(n)
        pooled = (m["eval_kl/prose"] * n[0] + m["eval_kl/verse"] * n[1]) / sum(n)
        assert m["eval_kl"] == pytest.approx(pooled, rel=1e-9)
    assert evals[-1]["eval_kl"] < evals[0]["eval_kl"]
    lineage = json.loads((out / "final" / "lineage.json").read_text())
    assert [(t["name"], t["weight"]) for t in lineage["teachers"]] == [("prose", 0.5), ("verse", 0.5)]
    assert lineage["combine"] == "mixture" and all(t["cache_fingerprint"] for t in lineage["teachers"])


def test_two_teacher_ensemble_reports_each_member(tmp_path, small_cache, second_teacher_cache, student_config):
    out = tmp_path / "ens"
    last = distill(
        config(
            student_config,
            [f"a={small_cache}", f"b={second_teacher_cache}"],
            out,
            combine="ensemble",
            ensemble_temperature=1.0,
            loss="rkl",
            max_steps=4,
        )
    )
    for key in ("eval_kl", "eval_kl/a", "eval_kl/b", "eval_top1/b"):
        assert key in last, key
    # The combined target's own eval (the totals) is neither member's.
    assert last["eval_kl"] not in (last["eval_kl/a"], last["eval_kl/b"])
    assert last["eval_tokens"] == last["eval_tokens/a"] == last["eval_tokens/b"]
    lineage = json.loads((out / "final" / "lineage.json").read_text())
    assert lineage["combine"] == "ensemble" and [t["weight"] for t in lineage["teachers"]] == [0.5, 0.5]


BIN = Path(sys.executable).parent


def _cmd(student, caches, out, steps, extra=()) -> list[str]:
    cmd = [str(BIN / "pipeline"), "distill", "--student", str(student), "--out", str(out)]
    for c in caches:
        cmd += ["--cache", str(c)]
    return cmd + [
        "--cache-weights",
        "0.3,0.7",
        "--batch-size",
        "4",
        "--lr",
        "3e-3",
        "--max-steps",
        str(steps),
        "--save-every",
        "5",
        "--eval-every",
        "1000",
        "--eval-sequences",
        "8",
        "--no-eval-at-start",
        "--log-every",
        "1",
        "--no-progress",
        *extra,
    ]


def test_mixture_kill_9_and_resume_reproduces_the_uninterrupted_run(
    tmp_path, small_cache, other_data_cache, student_config
):
    steps, caches = 60, [f"prose={small_cache}", f"verse={other_data_cache}"]
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    ref = subprocess.run(_cmd(student_config, caches, ref_out, steps), capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert "--combine mixture: prose 0.300, verse 0.700" in ref.stderr
    proc = subprocess.Popen(_cmd(student_config, caches, out, steps), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        ckpt = latest_checkpoint(out)
        if ckpt is not None and int(ckpt.name.removeprefix("step-")) >= 10:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = int(latest_checkpoint(out).name.removeprefix("step-"))
    assert 10 <= killed_at < steps
    changed = subprocess.run(
        _cmd(student_config, caches[::-1], out, steps, ["--resume"]), capture_output=True, text=True
    )
    assert changed.returncode == 2 and "--cache:" in changed.stderr  # another order of caches: another data order
    resumed = subprocess.run(_cmd(student_config, caches, out, steps, ["--resume"]), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = {m["step"]: m for m in metrics(ref_out) if "loss" in m}
    b = {m["step"]: m for m in metrics(out) if "loss" in m}
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    for s in range(1, steps + 1):
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], rel=1e-5, abs=1e-7), s
        assert b[s]["tokens"] == a[s]["tokens"], s  # the same batches


def test_cli_takes_repeated_caches(tmp_path, small_cache, second_teacher_cache, student_config):
    out = tmp_path / "cli"
    args = ["distill", "--student", str(student_config), "--out", str(out), "--cache", f"a={small_cache}"]
    args += ["--cache", f"b={second_teacher_cache}", "--combine", "ensemble", "--max-steps", "2", "--batch-size", "4"]
    args += ["--eval-sequences", "8", "--no-progress", "--cache-weights", "2,1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "distill_config.json").read_text())
    assert config["cache"] == [f"a={small_cache}", f"b={second_teacher_cache}"] and config["combine"] == "ensemble"
    bad = CliRunner().invoke(app, [*args[:-2], "--cache-weights", "1,2,3", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "3 values for 2" in bad.output


def test_ensemble_resumes_every_reader(small_cache, second_teacher_cache):
    def ensemble():
        infos = [sources.load_cache(c) for c in (small_cache, second_teacher_cache)]
        return sources.Ensemble(
            ["a", "b"], [CacheReader(i, 4, seed=2, shuffle_rows=8) for i in infos], lambda b: b, [0.5, 0.5]
        )

    def ids(batches):
        return [(tuple(b["seq_ids"].tolist()), b["topk_ids"].sum().item()) for b in batches]

    whole, ens = ensemble(), ensemble()
    it = iter(whole)
    want = ids(next(it) for _ in range(30))  # 30 batches of 4: over an epoch boundary (82 sequences)
    it.close()
    it = iter(ens)
    for _ in range(11):
        next(it)
    state = json.loads(json.dumps(ens.state_dict()))
    it.close()
    resumed = ensemble()
    resumed.load_state_dict(state)
    it = iter(resumed)
    assert ids(next(it) for _ in range(19)) == want[11:]
    it.close()


def test_mixture_with_teachers_of_two_tokenizer_families(
    tmp_path, small_cache, corpus_jsonl, sentencepiece_tokenizer_dir
):
    """A student of the SentencePiece tokenizer learns from a BPE teacher's cache and from a SentencePiece teacher's,
    each through its own projection (--cross-tokenizer), and each source's eval is reported in bits per byte."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(sentencepiece_tokenizer_dir)
    sp_teacher, student = tmp_path / "sp_teacher", tmp_path / "student"
    for d in (sp_teacher, student):
        tok.save_pretrained(d)
    build_llama(sp_teacher, len(tok), layers=2, hidden=64, seed=3)
    build_llama(student, len(tok), layers=1, hidden=32, seed=4)
    sp_cache = build_cache(tmp_path / "sp_cache", sp_teacher, corpus_jsonl, sequences=40)
    bpe_cache = Path(shutil.copytree(small_cache, tmp_path / "bpe_cache"))  # the session's cache stays as it is
    out = tmp_path / "run"
    last = distill(config(student, [f"bpe={bpe_cache}", f"sp={sp_cache}"], out, cross_tokenizer=True, max_steps=4))
    for key in ("eval_bpb", "eval_bpb/bpe", "eval_bpb/sp", "eval_kl/bpe", "eval_kl/sp"):
        assert key in last and last[key] > 0, key
    assert (sp_cache / "vocab_maps").is_dir() and (bpe_cache / "vocab_maps").is_dir()  # one map per cache


def test_one_cache_is_its_reader_and_resumes_from_a_reader_state(small_cache):
    """One cache: the reader's own batches in its own order; a checkpoint from before mixtures (the reader's own
    state_dict) resumes at the same place."""
    info = sources.load_cache(small_cache)
    reader = CacheReader(info, 4, seed=5, shuffle_rows=8)
    plain = iter(reader)
    want = [tuple(next(plain)["seq_ids"].tolist()) for _ in range(30)]
    plain.close()
    assert [ids for _, ids in take(mixture([small_cache], [1.0], seed=5), 30)] == want
    old = CacheReader(info, 4, seed=5, shuffle_rows=8)
    it = iter(old)
    for _ in range(25):  # past the first epoch (23 batches of 90 sequences)
        next(it)
    legacy = old.state_dict()
    it.close()
    mix = mixture([small_cache], [1.0], seed=5)
    mix.load_state_dict(legacy)
    assert mix.drawn == [25] and mix.epoch == old.epoch == 1
    assert [ids for _, ids in take(mix, 5)] == want[25:]
