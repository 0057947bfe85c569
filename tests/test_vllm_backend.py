"""vLLM backend without vLLM: hand-made objects with vLLM's structures, checked against a dense reference.

The stand-ins below carry exactly the attributes the converter may use on the real classes
(vllm/logprobs.py: Logprob, FlatLogprobs; vllm/outputs.py: RequestOutput) and are filled the way vLLM
fills them (see the module docstring of cache/backends/vllm.py): entry 0 empty; per position the actual
token first with its count-based rank, then the top-k with ranks 1..k; duplicates kept in the flat
form; in the dict form a duplicated key keeps its first slot and takes the top-k value.
"""

from __future__ import annotations

import os
import random
import sys
import types
from dataclasses import dataclass, field

import numpy as np
import pytest

from kd_pipeline.cache.backends import TeacherScores
from kd_pipeline.cache.backends.vllm import (
    EngineStartError,
    PromptLogprobArrays,
    VLLMNotInstalledError,
    VLLMTeacher,
    keep_prompt_logprob_arrays,
    prompt_logprobs_to_scores,
)

# ---------------------------------------------------------------------------------------------------
# Stand-ins for vLLM's classes (same attribute names and meaning, nothing more).


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class FlatLogprobs:
    start_indices: list = field(default_factory=list)
    end_indices: list = field(default_factory=list)
    token_ids: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    ranks: list = field(default_factory=list)
    decoded_tokens: list = field(default_factory=list)

    def append_block(self, token_ids, logprobs, ranks):
        self.start_indices.append(len(self.logprobs))
        self.token_ids.extend(token_ids)
        self.logprobs.extend(logprobs)
        self.ranks.extend(ranks)
        self.decoded_tokens.extend([None] * len(token_ids))
        self.end_indices.append(len(self.logprobs))

    def __len__(self):
        return len(self.start_indices)


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list
    prompt_logprobs: object
    outputs: list
    finished: bool = True
    num_cached_tokens: int = 0


# ---------------------------------------------------------------------------------------------------
# Helpers: dense log-probabilities → vLLM prompt logprobs.


def position_entries(lp_row: np.ndarray, actual: int, k: int):
    """(token_ids, logprobs, ranks) of one position, in vLLM's order: actual token, then top-k."""
    order = np.argsort(-lp_row, kind="stable")[:k]
    actual_lp = float(lp_row[actual])
    actual_rank = int((lp_row >= lp_row[actual]).sum())
    token_ids = [actual] + [int(t) for t in order]
    logprobs = [actual_lp] + [float(lp_row[t]) for t in order]
    ranks = [actual_rank] + list(range(1, k + 1))
    return token_ids, logprobs, ranks


def to_flat(lp: np.ndarray, ids: np.ndarray, k: int) -> FlatLogprobs:
    """lp [L-1, V] float32 (position t predicts ids[t+1]) → FlatLogprobs with entry 0 empty."""
    flat = FlatLogprobs()
    flat.append_block([], [], [])
    for t in range(lp.shape[0]):
        flat.append_block(*position_entries(lp[t], int(ids[t + 1]), k))
    return flat


def to_dicts(lp: np.ndarray, ids: np.ndarray, k: int, first=None, shuffle: random.Random | None = None):
    """Same in the list-of-dicts form; ``first`` is entry 0 (None or {}); ``shuffle`` reorders keys."""
    out = [first]
    for t in range(lp.shape[0]):
        token_ids, logprobs, ranks = position_entries(lp[t], int(ids[t + 1]), k)
        d = {}
        for token, value, rank in zip(token_ids, logprobs, ranks):
            d[token] = Logprob(logprob=value, rank=rank)  # a repeated key keeps its slot, takes the new value
        if shuffle is not None:
            items = list(d.items())
            shuffle.shuffle(items)
            d = dict(items)
        out.append(d)
    return out


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return (x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))).astype(np.float32)


def dense_reference(lp: np.ndarray, ids: np.ndarray, k: int) -> TeacherScores:
    """Top-k with torch (as vLLM does) from dense log-probs [B, L-1, V]."""
    import torch

    t = torch.from_numpy(lp)
    values, indices = torch.topk(t, k, dim=-1, sorted=True)
    target = torch.gather(t, -1, torch.from_numpy(ids[:, 1:].astype(np.int64))[..., None])[..., 0]
    return TeacherScores(indices.numpy().astype(np.int32), values.numpy(), target.numpy())


def random_case(b=3, length=12, vocab=40, seed=0, scale=3.0):
    """Random logits [B, L-1, V]; next tokens drawn from the teacher so many land in its top-k."""
    rng = np.random.default_rng(seed)
    lp = log_softmax(rng.normal(size=(b, length - 1, vocab)) * scale)
    ids = np.empty((b, length), np.int32)
    ids[:, 0] = rng.integers(0, vocab, size=b)
    p = np.exp(lp.astype(np.float64))
    for r in range(b):
        for t in range(length - 1):
            ids[r, t + 1] = rng.choice(vocab, p=p[r, t] / p[r, t].sum())
    return lp, ids


def assert_scores_equal(got: TeacherScores, want: TeacherScores):
    assert got.topk_ids.dtype == np.int32
    assert got.topk_logprobs.dtype == np.float32
    assert got.target_logprob.dtype == np.float32
    np.testing.assert_array_equal(got.topk_ids, want.topk_ids)
    np.testing.assert_array_equal(got.topk_logprobs, want.topk_logprobs)
    np.testing.assert_array_equal(got.target_logprob, want.target_logprob)


# ---------------------------------------------------------------------------------------------------
# Converter.


def test_flat_basic_hand_made():
    # L = 3, k = 2: two positions. Position 1 predicts token 7, position 2 predicts token 4.
    flat = FlatLogprobs()
    flat.append_block([], [], [])
    flat.append_block([7, 3, 9], [-2.5, -0.5, -1.5], [3, 1, 2])  # actual outside the top-2
    flat.append_block([4, 4, 1], [-0.25, -0.25, -2.0], [1, 1, 2])  # actual is top-1 (duplicate kept)
    ids = np.array([[5, 7, 4]], np.int32)
    s = prompt_logprobs_to_scores([flat], ids, k=2)
    assert s.topk_ids.shape == (1, 2, 2) and s.target_logprob.shape == (1, 2)
    np.testing.assert_array_equal(s.topk_ids[0], [[3, 9], [4, 1]])
    np.testing.assert_array_equal(s.topk_logprobs[0], np.array([[-0.5, -1.5], [-0.25, -2.0]], np.float32))
    np.testing.assert_array_equal(s.target_logprob[0], np.array([-2.5, -0.25], np.float32))


def test_flat_matches_dense_reference():
    k = 6
    lp, ids = random_case(b=4, length=16, vocab=50, seed=1)
    got = prompt_logprobs_to_scores([to_flat(lp[r], ids[r], k) for r in range(len(ids))], ids, k)
    assert_scores_equal(got, dense_reference(lp, ids, k))


def test_actual_token_inside_and_outside_topk():
    k = 4
    lp, ids = random_case(b=2, length=40, vocab=30, seed=2)
    ref = dense_reference(lp, ids, k)
    inside = (ref.topk_ids == ids[:, 1:, None]).any(-1)
    assert inside.any() and (~inside).any(), "test data should cover both cases"
    flats = [to_flat(lp[r], ids[r], k) for r in range(2)]
    for r, flat in enumerate(flats):
        for t in range(ids.shape[1] - 1):
            s = flat.start_indices[t + 1]
            block_ids = flat.token_ids[s : s + k + 1]
            rank = flat.ranks[s]
            if inside[r, t]:
                # the duplicate is kept, and the actual token's rank is its top-k position
                assert block_ids.count(int(ids[r, t + 1])) == 2
                assert block_ids[1:].index(int(ids[r, t + 1])) + 1 == rank
            else:
                assert rank > k
    got = prompt_logprobs_to_scores(flats, ids, k)
    assert_scores_equal(got, ref)
    # the target is stored whether or not it is in the top-k
    assert (got.target_logprob[~inside] < got.topk_logprobs[..., -1][~inside]).all()


@pytest.mark.parametrize("first", [None, {}])
def test_dict_form_with_and_without_extra_key(first):
    k = 4
    lp, ids = random_case(b=2, length=30, vocab=25, seed=3)
    dicts = [to_dicts(lp[r], ids[r], k, first=first) for r in range(2)]
    sizes = {len(d) for pl in dicts for d in pl[1:]}
    assert sizes == {k, k + 1}, "both forms of position dict should occur"
    assert_scores_equal(prompt_logprobs_to_scores(dicts, ids, k), dense_reference(lp, ids, k))


def test_dict_form_shuffled_insertion_order():
    k = 5
    lp, ids = random_case(b=3, length=20, vocab=30, seed=4)
    rng = random.Random(0)
    dicts = [to_dicts(lp[r], ids[r], k, shuffle=rng) for r in range(3)]
    assert_scores_equal(prompt_logprobs_to_scores(dicts, ids, k), dense_reference(lp, ids, k))


def test_entry_zero_must_be_empty():
    k = 3
    lp, ids = random_case(b=1, length=6, vocab=20, seed=5)
    dicts = to_dicts(lp[0], ids[0], k)
    dicts[0] = {int(ids[0, 0]): Logprob(-1.0, 1)}
    with pytest.raises(ValueError, match="position 0"):
        prompt_logprobs_to_scores([dicts], ids, k)
    flat = to_flat(lp[0], ids[0], k)
    flat.end_indices[0] = 1  # non-empty first block
    with pytest.raises(ValueError, match="position 0"):
        prompt_logprobs_to_scores([flat], ids, k)


def test_mismatched_actual_token_raises_naming_request_and_position():
    k = 3
    lp, ids = random_case(b=2, length=8, vocab=20, seed=6)
    flats = [to_flat(lp[r], ids[r], k) for r in range(2)]
    bad = ids.copy()
    bad[1, 5] = (bad[1, 5] + 1) % 20
    with pytest.raises(ValueError, match=r"request 1.*position 5"):
        prompt_logprobs_to_scores(flats, bad, k)


def test_dict_form_mismatch_detected_where_the_dict_can_show_it():
    """The dict form does not mark the actual token. A wrong input token is caught when it is not among
    the entries, or when the entry count contradicts it (k+1 keys but the token is in the top-k); a
    swap between two top-k tokens is invisible in this form (the flat form and VLLMTeacher's
    prompt_token_ids check catch it)."""
    k = 4
    lp, ids = random_case(b=1, length=60, vocab=30, seed=10)
    ref = dense_reference(lp, ids, k)
    dicts = to_dicts(lp[0], ids[0], k)
    inside = (ref.topk_ids[0] == ids[0, 1:, None]).any(-1)
    # (a) a token that is not among the position's entries
    t = 3
    absent = next(v for v in range(30) if v not in dicts[t + 1])
    bad = ids.copy()
    bad[0, t + 1] = absent
    with pytest.raises(ValueError, match=r"request 0, prompt position 4: input_ids\[4\] = \d+ is not among"):
        prompt_logprobs_to_scores([dicts], bad, k)
    # (b) the actual token is outside the top-k (k+1 keys) but input_ids names a top-k token
    t = int(np.flatnonzero(~inside)[0])
    bad = ids.copy()
    bad[0, t + 1] = ref.topk_ids[0, t, 0]
    with pytest.raises(ValueError, match=rf"request 0, prompt position {t + 1}: {k + 1} entries, expected {k}"):
        prompt_logprobs_to_scores([dicts], bad, k)


def test_wrong_number_of_positions_or_entries_raises():
    k = 3
    lp, ids = random_case(b=1, length=8, vocab=20, seed=7)
    with pytest.raises(ValueError, match="positions"):
        prompt_logprobs_to_scores([to_flat(lp[0], ids[0], k)], ids[:, :-1], k)
    with pytest.raises(ValueError, match="positions"):
        prompt_logprobs_to_scores([to_dicts(lp[0], ids[0], k)[:-1]], ids, k)
    # prompt_logprobs asked with a different k: blocks of the wrong width
    with pytest.raises(ValueError, match=r"k\+1"):
        prompt_logprobs_to_scores([to_flat(lp[0], ids[0], k + 1)], ids, k)
    with pytest.raises(ValueError, match="request 0"):
        prompt_logprobs_to_scores([None], ids, k)


def test_several_requests_keep_input_order():
    k = 4
    lp, ids = random_case(b=5, length=10, vocab=30, seed=8)
    mixed = [to_flat(lp[r], ids[r], k) if r % 2 else to_dicts(lp[r], ids[r], k) for r in range(5)]
    got = prompt_logprobs_to_scores(mixed, ids, k)
    ref = dense_reference(lp, ids, k)
    assert_scores_equal(got, ref)
    swapped = [mixed[1], mixed[0]] + mixed[2:]
    with pytest.raises(ValueError, match="request 0"):
        prompt_logprobs_to_scores(swapped, ids, k)


def test_flat_slice_with_offset_indices():
    """A FlatLogprobs whose indices do not start at 0 (as after vLLM's rebasing is skipped)."""
    k = 3
    lp, ids = random_case(b=1, length=7, vocab=20, seed=9)
    flat = to_flat(lp[0], ids[0], k)
    pad = 5
    shifted = FlatLogprobs(
        start_indices=[s + pad for s in flat.start_indices],
        end_indices=[e + pad for e in flat.end_indices],
        token_ids=[0] * pad + flat.token_ids,
        logprobs=[0.0] * pad + flat.logprobs,
        ranks=[1] * pad + flat.ranks,
        decoded_tokens=[None] * pad + flat.decoded_tokens,
    )
    assert_scores_equal(prompt_logprobs_to_scores([shifted], ids, k), dense_reference(lp, ids, k))


def engine_rows(lp: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """What vLLM's engine sends for one request: token ids and log-probs [L-1, k+1], actual token first."""
    blocks = [position_entries(lp[t], int(ids[t + 1]), k) for t in range(lp.shape[0])]
    return (
        np.array([token_ids for token_ids, _, _ in blocks], np.int64),
        np.array([logprobs for _, logprobs, _ in blocks], np.float32),
    )


def kept(lp: np.ndarray, ids: np.ndarray, k: int, chunks: int = 1) -> PromptLogprobArrays:
    """The engine's rows of one request as keep_prompt_logprob_arrays keeps them, in prefill chunks."""
    token_ids, logprobs = engine_rows(lp, ids, k)
    arrays = PromptLogprobArrays()
    for part in np.array_split(np.arange(len(token_ids)), chunks):
        arrays.add(token_ids[part], logprobs[part])
    return arrays


def test_kept_arrays_in_chunks_match_dense_reference_beside_the_flat_form():
    k = 5
    lp, ids = random_case(b=3, length=17, vocab=30, seed=11)
    forms = [kept(lp[0], ids[0], k, chunks=3), to_flat(lp[1], ids[1], k), kept(lp[2], ids[2], k)]
    assert len(forms[0]) == ids.shape[1]  # counts position 0, as vLLM's containers do
    assert_scores_equal(prompt_logprobs_to_scores(forms, ids, k), dense_reference(lp, ids, k))


def test_kept_arrays_of_the_wrong_shape_or_prompt_raise_naming_request_and_position():
    k = 3
    lp, ids = random_case(b=2, length=9, vocab=20, seed=12)
    with pytest.raises(ValueError, match=r"request 0: prompt logprob arrays of shapes \(8, 5\)"):
        prompt_logprobs_to_scores([kept(lp[0], ids[0], k + 1), kept(lp[1], ids[1], k)], ids, k)
    with pytest.raises(ValueError, match=r"request 0: .*shapes \(8, 4\).*expected \(7, 4\)"):
        prompt_logprobs_to_scores([kept(lp[0], ids[0], k), kept(lp[1], ids[1], k)], ids[:, :-1], k)
    bad = ids.copy()
    bad[1, 6] = (bad[1, 6] + 1) % 20
    with pytest.raises(ValueError, match=r"request 1, prompt position 6: vLLM's actual token"):
        prompt_logprobs_to_scores([kept(lp[0], ids[0], k), kept(lp[1], ids[1], k)], bad, k)


class LogprobsProcessor:
    """Stand-in for vLLM's ``vllm.v1.engine.logprobs.LogprobsProcessor``: the attributes the patch reads,
    and an ``_update_prompt_logprobs`` that builds Python lists from the tensors as vLLM's does."""

    def __init__(self, num_prompt_logprobs, tokenizer=None):
        self.num_prompt_logprobs = num_prompt_logprobs
        self.tokenizer = tokenizer
        self.prompt_logprobs = FlatLogprobs()
        self.prompt_logprobs.append_block([], [], [])

    def _update_prompt_logprobs(self, tensors):
        token_ids, logprobs, ranks = tensors
        for row_ids, row_lps, rank in zip(token_ids.tolist(), logprobs.tolist(), ranks.tolist()):
            self.prompt_logprobs.append_block(row_ids, row_lps, [rank, *range(1, len(row_ids))])


def test_keep_prompt_logprob_arrays_keeps_only_our_requests_and_restores_vllms_method():
    import torch

    k = 4
    lp, ids = random_case(b=1, length=12, vocab=30, seed=13)
    token_ids, logprobs = engine_rows(lp[0], ids[0], k)
    chunks = [
        (torch.from_numpy(token_ids[a:b]), torch.from_numpy(logprobs[a:b]), torch.zeros(b - a, dtype=torch.int64))
        for a, b in ((0, 6), (6, 11))
    ]
    original = LogprobsProcessor._update_prompt_logprobs
    ours, other_k = LogprobsProcessor(k), LogprobsProcessor(k + 1)
    detokenized = LogprobsProcessor(k, tokenizer=object())
    with keep_prompt_logprob_arrays(LogprobsProcessor, k) as found:
        assert found
        for processor in (ours, other_k, detokenized):
            for chunk in chunks:
                processor._update_prompt_logprobs(chunk)
    assert LogprobsProcessor._update_prompt_logprobs is original
    assert isinstance(ours.prompt_logprobs, PromptLogprobArrays) and len(ours.prompt_logprobs) == ids.shape[1]
    for processor in (other_k, detokenized):  # vLLM's own lists, as without the patch
        assert isinstance(processor.prompt_logprobs, FlatLogprobs) and len(processor.prompt_logprobs) == ids.shape[1]
    want = dense_reference(lp, ids, k)
    assert_scores_equal(prompt_logprobs_to_scores([ours.prompt_logprobs], ids, k), want)
    assert_scores_equal(prompt_logprobs_to_scores([detokenized.prompt_logprobs], ids, k), want)
    # restored on an error too; a vLLM without the method is left alone
    with pytest.raises(RuntimeError), keep_prompt_logprob_arrays(LogprobsProcessor, k):
        raise RuntimeError("generate failed")
    assert LogprobsProcessor._update_prompt_logprobs is original
    with keep_prompt_logprob_arrays(None, k) as found:
        assert not found


# ---------------------------------------------------------------------------------------------------
# VLLMTeacher with vLLM missing, and with a fake vllm module.


def test_vllm_teacher_without_vllm_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes "import vllm" raise ImportError
    with pytest.raises(VLLMNotInstalledError, match=r"\[vllm\] extra on a CUDA machine"):
        VLLMTeacher("some/model", k=4, seq_len=16)
    assert issubclass(VLLMNotInstalledError, ImportError)


class _FakeVLLM:
    """Installs a fake ``vllm`` whose LLM scores prompts with a bigram table (logits = W[previous token])."""

    def __init__(self, vocab=30, seed=0, fail_with: str | None = None, reverse=False):
        self.vocab = vocab
        self.table = log_softmax(np.random.default_rng(seed).normal(size=(vocab, vocab)) * 3.0)
        self.calls = []
        self.llm_kwargs = None
        fake = self

        class LLM:
            def __init__(self, **kwargs):
                if fail_with:
                    raise ValueError(fail_with)
                fake.llm_kwargs = kwargs
                fake.env_at_start = dict(os.environ)
                self.llm_engine = types.SimpleNamespace(
                    model_config=types.SimpleNamespace(get_vocab_size=lambda: fake.vocab)
                )

            def generate(self, prompts, sampling_params, use_tqdm=True):
                fake.calls.append((len(prompts), sampling_params, use_tqdm))
                # As vLLM's LLM._run_engine: a tqdm from the factory, updated as requests finish.
                bar = (
                    use_tqdm(total=len(prompts), desc="Processed prompts", dynamic_ncols=True)
                    if callable(use_tqdm)
                    else None
                )
                k = sampling_params.kwargs["prompt_logprobs"]
                outs = []
                for i, prompt in enumerate(prompts):
                    ids = np.asarray(prompt["prompt_token_ids"])
                    outs.append(
                        RequestOutput(
                            request_id=str(len(fake.calls) * 1000 + i),
                            prompt=None,
                            prompt_token_ids=list(prompt["prompt_token_ids"]),
                            prompt_logprobs=to_flat(fake.table[ids[:-1]], ids, k),
                            outputs=[],
                        )
                    )
                    if bar is not None:
                        bar.format_dict["elapsed"]  # noqa: B018  (vLLM reads it for its rate postfix)
                        bar.update(1)
                if bar is not None:
                    bar.close()
                return outs[::-1] if reverse else outs

        class SamplingParams:
            def __init__(self, **kwargs):
                self.kwargs = kwargs

        vllm = types.ModuleType("vllm")
        vllm.__version__ = "0.32.0-fake"
        vllm.LLM = LLM
        vllm.SamplingParams = SamplingParams
        inputs = types.ModuleType("vllm.inputs")
        inputs.TokensPrompt = lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids}
        vllm.inputs = inputs
        self.modules = {"vllm": vllm, "vllm.inputs": inputs}

    def install(self, monkeypatch):
        for name, module in self.modules.items():
            monkeypatch.setitem(sys.modules, name, module)
        return self

    def reference(self, ids: np.ndarray, k: int) -> TeacherScores:
        return dense_reference(self.table[ids[:, :-1]], ids, k)


def test_vllm_teacher_scores_with_fake_engine(monkeypatch):
    fake = _FakeVLLM(vocab=30).install(monkeypatch)
    k, seq_len = 5, 12
    teacher = VLLMTeacher(
        "org/teacher",
        k=k,
        seq_len=seq_len,
        tensor_parallel_size=2,
        revision="abc",
        gpu_memory_utilization=0.5,
        max_num_seqs=4,
        llm_kwargs={"kv_cache_dtype": "fp8"},
    )
    kw = fake.llm_kwargs
    assert kw["model"] == "org/teacher" and kw["revision"] == "abc"
    assert kw["max_logprobs"] == k and kw["logprobs_mode"] == "raw_logprobs"
    # vLLM wants room for the generated token; the context rule is ours (cache.teacher.check_seq_len).
    assert kw["max_model_len"] == seq_len + 1 and kw["enable_prefix_caching"] is False
    assert fake.env_at_start["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] == "1"
    assert "VLLM_ALLOW_LONG_MAX_MODEL_LEN" not in os.environ
    assert kw["tensor_parallel_size"] == 2 and kw["pipeline_parallel_size"] == 1 and kw["dtype"] == "bfloat16"
    assert kw["gpu_memory_utilization"] == 0.5 and kw["max_num_seqs"] == 4 and "max_num_batched_tokens" not in kw
    assert kw["enforce_eager"] is False and kw["kv_cache_dtype"] == "fp8"
    sp = teacher.sampling_params.kwargs
    assert sp == {"max_tokens": 1, "prompt_logprobs": k, "flat_logprobs": True, "detokenize": False}
    assert teacher.describe() == {
        "teacher": {"name_or_path": "org/teacher", "revision": "abc", "dtype": "bfloat16"},
        "backend": {
            "name": "vllm",
            "version": "0.32.0-fake",
            "tensor_parallel_size": 2,
            "pipeline_parallel_size": 1,
            "gpu_memory_utilization": 0.5,
            "enforce_eager": False,
            "max_num_seqs": 4,
            "max_num_batched_tokens": None,
            "llm_kwargs": {"kv_cache_dtype": "fp8"},
        },
    }

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 30, size=(7, seq_len)).astype(np.int32)
    done = []
    got = teacher.score(ids, progress=done.append)
    assert_scores_equal(got, fake.reference(ids, k))
    assert done == [1] * 7 and len(fake.calls) == 1  # progress per finished request
    assert teacher.score(ids).topk_ids.shape == (7, seq_len - 1, k) and fake.calls[-1][2] is False
    fake.calls.pop()

    # A small per-call budget splits the block into several generate() calls; the result is the same.
    teacher.max_entries_per_call = 3 * (seq_len - 1) * (k + 1)
    fake.calls.clear()
    done.clear()
    got = teacher.score(ids, progress=done.append)
    assert_scores_equal(got, fake.reference(ids, k))
    assert [c[0] for c in fake.calls] == [3, 3, 1] and done == [1] * 7

    with pytest.raises(ValueError, match="seq_len"):
        teacher.score(rng.integers(0, 30, size=(2, seq_len + 1)).astype(np.int32))


def test_vllm_teacher_rejects_out_of_order_outputs(monkeypatch):
    _FakeVLLM(reverse=True).install(monkeypatch)
    teacher = VLLMTeacher("m", k=3, seq_len=8)
    ids = np.random.default_rng(1).integers(0, 30, size=(3, 8)).astype(np.int32)
    with pytest.raises(RuntimeError, match="input order"):
        teacher.score(ids)


def test_vllm_teacher_context_too_long_is_clear(monkeypatch):
    message = (
        "1 validation error for ModelConfig\n  Value error, User-specified max_model_len (4097) is greater "
        "than the derived max_model_len (max_position_embeddings=2048 or model_max_length=None in model's "
        "config.json)."
    )
    _FakeVLLM(fail_with=message).install(monkeypatch)
    with pytest.raises(EngineStartError) as raised:
        VLLMTeacher("m", k=3, seq_len=4096, gpu_memory_utilization=0.5)
    assert str(raised.value) == (
        "the vLLM engine did not start: User-specified max_model_len (4097) is greater than the derived "
        "max_model_len (max_position_embeddings=2048 or model_max_length=None in model's config.json).\n"
        "  what to change: use a smaller --seq-len"
    )


def test_vllm_teacher_k_above_vocab(monkeypatch):
    _FakeVLLM(vocab=10).install(monkeypatch)
    with pytest.raises(ValueError, match="vocabulary"):
        VLLMTeacher("m", k=11, seq_len=8)


# ---------------------------------------------------------------------------------------------------
# scripts/gpu_check.py: importable and --help without vLLM or a GPU; its parity metrics.


def test_gpu_check_help_without_vllm():
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--teacher" in done.stdout and "--num-seqs" in done.stdout


def test_gpu_check_compare_metrics():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)

    rng = np.random.default_rng(0)
    n, p, k = 3, 9, 5
    ids = np.stack([rng.permutation(100)[:k] for _ in range(n * p)]).reshape(n, p, k).astype(np.int32)
    lp = -np.sort(rng.random((n, p, k)), axis=-1).astype(np.float32)
    tgt = -rng.random((n, p)).astype(np.float32)
    same = gpu_check.compare(ids, lp, tgt, ids, lp, tgt)
    assert same["top1_agreement"] == 1.0 and same["topk_overlap"] == 1.0
    assert same["logprob_abs_diff_max"] == 0.0 and same["target_abs_diff_max"] == 0.0
    # b: last two entries swapped in order (same set, same values), one id replaced, targets shifted
    ids_b, lp_b = ids[..., [0, 1, 2, 4, 3]].copy(), lp[..., [0, 1, 2, 4, 3]].copy()
    ids_b[0, 0, 0] = 1000
    lp_b[1, 2, 1] += 0.25
    got = gpu_check.compare(ids, lp, tgt, ids_b, lp_b, tgt + 0.5, max_cells=k * k * p)  # chunk per sequence
    assert got["top1_agreement"] == pytest.approx(1 - 1 / (n * p))
    assert got["topk_overlap"] == pytest.approx(1 - 1 / (n * p * k))
    assert got["logprob_abs_diff_max"] == pytest.approx(0.25)
    assert got["target_abs_diff_mean"] == pytest.approx(0.5)


def test_gpu_check_runs_on_cpu_and_writes_results_as_they_come(tmp_path):
    """The GPU script's HF part on CPU with its tiny random-weight Llama: one JSONL record per step."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    out = tmp_path / "gc"
    code = gpu_check.main(
        [
            "--out",
            str(out),
            "--build-teacher",
            "tiny",
            "--seq-len",
            "32",
            "--num-seqs",
            "4",
            "--k",
            "8",
            "--device",
            "cpu",
            "--backends",
            "hf",
            "--shard-rows",
            "2",
        ]
    )
    assert code == 0
    records = [json.loads(line) for line in (out / "gpu_check.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == ["machine", "build_teacher", "hf", "verdict"]
    hf = records[2]
    assert hf["device"] == "cpu" and hf["dtype"] == "float32" and hf["tokens"] == 4 * 32
    assert hf["tokens_per_s"] > 0 and 0 < hf["writer_share"] < 1 and hf["bytes_per_token"] > 0
    assert records[1]["params"] == sum(
        v for v in [512 * 64 * 2, 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64), 64]
    )
