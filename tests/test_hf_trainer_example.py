"""examples/hf_trainer.py: the HF Trainer distills a student from a cache through kd_pipeline.CacheDataset and the
project's losses; the KL to the teacher falls."""

from __future__ import annotations

import contextlib
import runpy
from pathlib import Path

import pytest
import torch
from conftest import build_llama

from kd_pipeline.train.parallel import Dist
from kd_pipeline.train.reader import CacheReader
from kd_pipeline.train.trainer import evaluate

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hf_trainer.py"
pytest.importorskip("accelerate")  # the Trainer's own dependency


def eval_kl(model, cache) -> float:
    reader = CacheReader(cache, 8, shuffle=False, drop_remainder=False)
    return evaluate(model, reader, torch.device("cpu"), contextlib.nullcontext(), Dist())["eval_kl"]


@pytest.mark.filterwarnings("ignore:.pin_memory. argument is set as true:UserWarning")  # the Trainer pins; CPU here
@pytest.mark.parametrize("loss", ["fkl", "taid"])
def test_the_hf_trainer_example_lowers_the_kl(tmp_path, small_cache, tokenizer_dir, loss):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student = tmp_path / "student"
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(student)
    build_llama(student, 320, layers=1, hidden=32, seed=4)
    before = eval_kl(AutoModelForCausalLM.from_pretrained(student), small_cache)

    main = runpy.run_path(str(EXAMPLE))["main"]
    args = ["--cache", str(small_cache), "--student", str(student), "--out", str(tmp_path / "out"), "--loss", loss]
    trainer = main([*args, "--max-steps", "30", "--batch-size", "8", "--lr", "3e-3"])

    assert trainer.state.global_step == 30 and len(trainer.kl_history) == 30
    after = eval_kl(AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final"), small_cache)
    assert after < 0.8 * before, (before, after)
    first, last = sum(trainer.kl_history[:5]) / 5, sum(trainer.kl_history[-5:]) / 5
    assert last < first
    if loss == "taid":  # the schedule moved with the optimizer steps
        assert trainer.kd_loss.metrics()["taid_t"] > trainer.kd_loss.options.taid_t_start
