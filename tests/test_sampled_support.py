"""RS-KD sampled support: unbiased estimates, padding, determinism, and a cache + distill run on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kd_pipeline.cache.backends.hf import sample_support
from kd_pipeline.cache.build import CacheConfig, cache_teacher
from kd_pipeline.cache.format.manifest import load_cache
from kd_pipeline.cache.format.verify import verify_cache


def _distribution(v: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(v, generator=g, dtype=torch.float64) * 1.5, -1).float()


def _mean_estimate(logp: torch.Tensor, rows: int, num_samples: int, temperature: float) -> torch.Tensor:
    lp = logp.expand(rows, -1).contiguous()
    ids, logw = sample_support(
        lp, k=lp.shape[-1], num_samples=num_samples, temperature=temperature, generator=torch.Generator().manual_seed(1)
    )
    dense = torch.zeros_like(lp).scatter_(-1, ids, logw.exp())
    return dense.double().mean(0)


def test_temperature_one_is_unbiased():
    logp = _distribution()
    p = logp.double().exp()
    rows, n = 20_000, 8
    mean = _mean_estimate(logp, rows, n, 1.0)
    stderr = (p * (1 - p) / (n * rows)).sqrt()  # of a frequency over n·rows draws
    assert ((mean - p).abs() <= 5 * stderr + 1e-7).all(), (mean - p) / stderr


def test_flattened_proposal_is_consistent():
    logp = _distribution(seed=3)
    p = logp.double().exp()
    mean = _mean_estimate(logp, 20_000, 64, 0.5)
    assert (mean - p).abs().max() < 0.01
    # The proposal reaches low-probability tokens more often than p itself would.
    lp = logp.expand(4000, -1).contiguous()
    hit_flat = sample_support(lp, 12, 8, 0.5, torch.Generator().manual_seed(0))[1].isfinite().sum()
    hit_p = sample_support(lp, 12, 8, 1.0, torch.Generator().manual_seed(0))[1].isfinite().sum()
    assert hit_flat > hit_p


def test_padding_is_distinct_ids_with_zero_weight():
    logp = torch.log_softmax(torch.tensor([[8.0, 0.0, 0.0, 0.0, 0.0, 0.0]]), -1)
    ids, logw = sample_support(logp, k=4, num_samples=3, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert ids.shape == (1, 4) and len(set(ids[0].tolist())) == 4  # distinct, so no bin is counted twice
    finite = logw[0].isfinite()
    assert finite[0] and ids[0, 0] == 0  # the dominant token is drawn and heaviest
    assert torch.allclose(logw[0][finite].exp().sum(), torch.tensor(1.0))
    assert (logw[0][~finite] == float("-inf")).all()
    assert (logw[0][:-1] >= logw[0][1:]).all()  # sorted descending


@pytest.fixture(scope="module")
def sampled_cache(tmp_path_factory, teacher_dir, corpus_jsonl) -> Path:
    out = tmp_path_factory.mktemp("sampled") / "cache"
    cache_teacher(_config(teacher_dir, corpus_jsonl, out))
    return out


def _config(teacher_dir, corpus_jsonl, out, **kw) -> CacheConfig:
    base = dict(
        teacher=str(teacher_dir),
        data=str(corpus_jsonl),
        out=out,
        top_k=16,
        seq_len=32,
        max_sequences=30,
        shard_tokens=32 * 6,
        support="sampled",
        num_samples=24,
        progress=False,
    )
    base.update(kw)
    return CacheConfig(**base)


def test_sampled_cache_is_deterministic_and_verifies(sampled_cache, tmp_path, teacher_dir, corpus_jsonl):
    info = load_cache(sampled_cache)
    assert info.manifest.support == "sampled" and info.manifest.sampling == {
        "num_samples": 24,
        "temperature": 1.0,
        "seed": 0,
    }
    assert verify_cache(sampled_cache).ok
    again = tmp_path / "again"
    for i in (1, 0):  # two workers, reverse order: same shards as one writer
        cache_teacher(_config(teacher_dir, corpus_jsonl, again, worker_index=i, num_workers=2))
    for shard in info.shards:
        assert (again / shard.name).read_bytes() == (sampled_cache / shard.name).read_bytes()
    other_seed = tmp_path / "seed1"
    cache_teacher(_config(teacher_dir, corpus_jsonl, other_seed, sample_seed=1))
    assert (other_seed / info.shards[0].name).read_bytes() != (sampled_cache / info.shards[0].name).read_bytes()


def test_sampled_support_refuses_vllm(tmp_path, teacher_dir, corpus_jsonl):
    with pytest.raises(ValueError, match="backend hf"):
        cache_teacher(_config(teacher_dir, corpus_jsonl, tmp_path / "c", backend="vllm"))


def test_distill_on_sampled_support(sampled_cache, tmp_path, student_config):
    import json

    from kd_pipeline.train.trainer import DistillConfig, distill

    out = tmp_path / "run"
    distill(
        DistillConfig(
            student=str(student_config),
            cache=sampled_cache,
            out=out,
            loss="fkl",
            max_steps=30,
            lr=3e-3,
            batch_size=8,
            eval_sequences=6,
            eval_every=30,
            eval_at_start=True,
            progress=False,
        )
    )
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "eval_kl" in line]
    assert evals[-1]["eval_kl"] < evals[0]["eval_kl"]
    assert np.isfinite([e["eval_kl"] for e in evals]).all()
