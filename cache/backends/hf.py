"""HF transformers teacher: works everywhere (CPU for tests and small runs, GPU with bf16)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from kd_pipeline.cache.backends import TeacherBackend, TeacherScores, register
from kd_pipeline.errors import ConfigError
from kd_pipeline.models import dtype_name, resolve_device, resolve_dtype, teacher_identity

if TYPE_CHECKING:
    import torch
# torch is imported where it runs, not here: naming the backends (`--backend` choices, `--help`) stays cheap.


def sample_support(
    logprobs: torch.Tensor, k: int, num_samples: int, temperature: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance-sampled support (RS-KD, Anshumann et al. 2025, arXiv 2503.16870).

    Draw ``num_samples`` tokens per position from the proposal ``r ∝ p^temperature``, weight each draw by
    ``p/r`` and keep the unique ids with self-normalized weights. At temperature 1 every weight is 1
    and the estimate is the draw frequency, an exactly unbiased estimate of p (so the sparse forward-KL
    gradient is unbiased for the dense one); at other temperatures self-normalization makes it
    consistent, with a bias of order 1/num_samples.

    logprobs [M, V] fp32 (full-vocabulary log-softmax) → (ids [M, k] int64, log weights [M, k] fp32),
    sorted by weight. Positions with fewer than k distinct draws are padded with distinct unsampled ids of
    weight 0 (log weight -inf); with more, the k heaviest are kept and the rest becomes tail mass.
    """
    import torch

    log_r = torch.log_softmax(logprobs * temperature, dim=-1) if temperature != 1.0 else logprobs
    draws = torch.multinomial(log_r.exp(), num_samples, replacement=True, generator=generator)
    weights = (logprobs.gather(-1, draws) - log_r.gather(-1, draws)).exp()
    totals = torch.zeros_like(logprobs).scatter_add_(-1, draws, weights)
    totals /= totals.sum(-1, keepdim=True)
    values, ids = torch.topk(totals, k, dim=-1, sorted=True)
    return ids, values.log()


@register
class HFTeacher(TeacherBackend):
    """Teacher backed by ``AutoModelForCausalLM``; top-k is taken on the device so only the k columns
    reach the CPU. Runs everywhere torch does, and the only backend with the full softmax (``--support sampled``)."""

    name = "hf"
    priority = 0

    @classmethod
    def teacher_dtype(cls, config) -> str:
        return dtype_name(config.dtype, config.device)

    @classmethod
    def from_config(cls, config) -> HFTeacher:
        return cls(
            config.teacher,
            k=config.top_k,
            batch_size=config.batch_size,
            dtype=config.dtype,
            device=config.device,
            revision=config.revision,
            trust_remote_code=config.trust_remote_code,
            support=config.support,
            num_samples=config.num_samples,
            sample_temperature=config.sample_temperature,
            seed=config.sample_seed,
        )

    def __init__(
        self,
        model: str,
        k: int,
        batch_size: int = 8,
        dtype: str = "auto",
        device: str = "auto",
        revision: str | None = None,
        trust_remote_code: bool = False,
        position_chunk: int = 512,
        support: str = "topk",
        num_samples: int = 64,
        sample_temperature: float = 1.0,
        seed: int = 0,
    ):
        from kd_pipeline.models import load_causal_lm

        self.name = str(model)
        self.trust_remote_code = trust_remote_code
        self.k = k
        self.batch_size = batch_size
        self.device = resolve_device(device)
        self.torch_dtype = resolve_dtype(dtype, self.device)
        self.dtype_name = str(self.torch_dtype).removeprefix("torch.")
        self.revision = revision
        # log_softmax over V in fp32 for [batch, chunk] positions at a time bounds the extra memory.
        self.position_chunk = position_chunk
        if support not in ("topk", "sampled"):
            raise ValueError(f"support must be topk or sampled, got {support!r}")
        self.support, self.num_samples, self.sample_temperature, self.seed = (
            support,
            num_samples,
            sample_temperature,
            seed,
        )
        self.model = load_causal_lm(
            model, "--teacher", revision=revision, dtype=self.torch_dtype, trust_remote_code=trust_remote_code
        ).to(self.device)
        self.model.eval()
        vocab = self.model.get_output_embeddings().weight.shape[0]
        if k > vocab:
            raise ConfigError(f"--top-k {k} exceeds the teacher's vocabulary size {vocab}")

    def describe(self) -> dict:
        import transformers

        return {
            "teacher": teacher_identity(self.name, self.revision, self.dtype_name, self.trust_remote_code),
            "backend": {
                "name": "hf",
                "version": f"transformers {transformers.__version__}",
                "device": self.device.type,
            },
        }

    def close(self) -> None:
        self.model = None

    def _support(self, lp: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """[b, t, V] log-probs → (ids, log-probs or log-weights) [b, t, k], sorted descending."""
        import torch

        if self.support == "topk":
            values, indices = torch.topk(lp, self.k, dim=-1, sorted=True)
            return indices, values
        b, t, v = lp.shape
        ids, logw = sample_support(lp.reshape(b * t, v), self.k, self.num_samples, self.sample_temperature, generator)
        return ids.reshape(b, t, self.k), logw.reshape(b, t, self.k)

    def score(
        self, input_ids: np.ndarray, progress: Callable[[int], None] | None = None, first_seq_id: int = 0
    ) -> TeacherScores:
        import torch

        with torch.inference_mode():
            return self._score(input_ids, progress, first_seq_id)

    def _score(self, input_ids: np.ndarray, progress: Callable[[int], None] | None, first_seq_id: int) -> TeacherScores:
        import torch

        b, length = input_ids.shape
        k = self.k
        topk_ids = np.empty((b, length - 1, k), np.int32)
        topk_lp = np.empty((b, length - 1, k), np.float32)
        target_lp = np.empty((b, length - 1), np.float32)
        for start in range(0, b, self.batch_size):
            stop = min(b, start + self.batch_size)
            ids = torch.from_numpy(np.ascontiguousarray(input_ids[start:stop])).to(self.device, torch.long)
            generator = None
            if self.support == "sampled":  # seeded by stream position: reruns and resumes draw the same
                generator = torch.Generator(self.device).manual_seed(self.seed * 1_000_003 + first_seq_id + start)
            # The last token predicts nothing we store: feed L-1 tokens.
            logits = self.model(input_ids=ids[:, :-1], use_cache=False).logits
            targets = ids[:, 1:]
            for t0 in range(0, length - 1, self.position_chunk):
                t1 = min(length - 1, t0 + self.position_chunk)
                lp = torch.log_softmax(logits[:, t0:t1].float(), dim=-1)
                indices, values = self._support(lp, generator)
                target = lp.gather(-1, targets[:, t0:t1, None]).squeeze(-1)
                topk_ids[start:stop, t0:t1] = indices.to(torch.int32).cpu().numpy()
                topk_lp[start:stop, t0:t1] = values.cpu().numpy()
                target_lp[start:stop, t0:t1] = target.cpu().numpy()
            del logits
            if progress is not None:
                progress(stop - start)
        return TeacherScores(topk_ids=topk_ids, topk_logprobs=topk_lp, target_logprob=target_lp)
