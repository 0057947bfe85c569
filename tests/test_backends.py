"""The teacher-backend registry: names, `--backend auto`, refusals, the one dtype rule, and a backend added
from outside the driver (cache/build.py knows no backend by name)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_cache import cache_bytes, config

from kd_pipeline.cache import backends
from kd_pipeline.cache.backends import backend_class, backend_names, select_backend
from kd_pipeline.cache.backends.hf import HFTeacher
from kd_pipeline.cache.backends.vllm import VLLMTeacher
from kd_pipeline.cache.build import cache_teacher
from kd_pipeline.cache.format.manifest import load_cache
from kd_pipeline.errors import ConfigError


def options(**kw) -> SimpleNamespace:
    """The attributes of stage one's config that the backends' class-level hooks read."""
    return SimpleNamespace(**{"backend": "auto", "support": "topk", "dtype": "auto", "device": "auto", **kw})


def test_the_built_in_backends_are_registered_and_an_unknown_name_is_refused_listing_them():
    assert backend_names() == ["hf", "vllm"]
    assert backend_class("hf") is HFTeacher and backend_class("vllm") is VLLMTeacher
    with pytest.raises(ConfigError) as refused:
        select_backend(options(backend="vlm"))
    assert str(refused.value) == "unknown --backend 'vlm'; choose from auto, hf, vllm"


def test_auto_picks_hf_here_and_vllm_where_it_can_run_unless_the_cache_needs_the_full_softmax(monkeypatch):
    assert not VLLMTeacher.available()  # no CUDA (and no vllm) on this machine
    assert select_backend(options()) is HFTeacher
    monkeypatch.setattr(VLLMTeacher, "available", classmethod(lambda cls: True))  # as on a CUDA machine with vllm
    assert select_backend(options()) is VLLMTeacher
    assert select_backend(options(support="sampled")) is HFTeacher
    assert select_backend(options(backend="hf")) is HFTeacher
    with pytest.raises(ConfigError, match=r"^--support sampled needs the full softmax: use --backend hf$"):
        select_backend(options(backend="vllm", support="sampled"))


def test_one_dtype_rule_for_every_backend():
    """auto: bfloat16 where the teacher runs on CUDA, float32 elsewhere; HF runs on --device, vLLM where torch
    sees CUDA."""
    on_cuda = torch.cuda.is_available()
    for backend in (HFTeacher, VLLMTeacher):
        assert backend.teacher_dtype(options()) == ("bfloat16" if on_cuda else "float32")
        assert backend.teacher_dtype(options(dtype="float16")) == "float16"
    assert HFTeacher.teacher_dtype(options(device="cpu")) == "float32"
    with pytest.raises(ConfigError, match="unknown dtype 'fp8'"):
        HFTeacher.teacher_dtype(options(dtype="fp8"))


def test_vllm_args_enter_the_teacher_identity_through_the_backend():
    assert VLLMTeacher.identity(SimpleNamespace(vllm_args=[])) == {}
    assert VLLMTeacher.identity(SimpleNamespace(vllm_args=["kv_cache_dtype=fp8", "swap_space=2"])) == {
        "vllm_args": {"kv_cache_dtype": "fp8", "swap_space": 2}
    }
    assert HFTeacher.identity(options()) == {}


class EchoHF(HFTeacher):
    """A backend defined outside the package: HF's numbers under another name, with an identity entry."""

    name = "echo-hf"

    @classmethod
    def identity(cls, config) -> dict:
        return {"echo": 1}


def test_a_registered_backend_runs_cache_teacher_without_an_edit_to_the_driver(
    tmp_path, teacher_dir, corpus_jsonl, monkeypatch
):
    monkeypatch.setattr(backends, "_REGISTRY", dict(backends._registry()))  # the registration ends with the test
    backends.register(EchoHF)
    with pytest.raises(ValueError, match="registered twice"):
        backends.register(EchoHF)
    hf, echo = tmp_path / "hf", tmp_path / "echo"
    cache_teacher(config(teacher_dir, corpus_jsonl, hf, max_sequences=12, backend="hf"))
    cache_teacher(config(teacher_dir, corpus_jsonl, echo, max_sequences=12, backend="echo-hf"))
    info = load_cache(echo)
    assert info.manifest.teacher["backend"] == "echo-hf" and info.manifest.teacher["echo"] == 1
    assert info.manifest.backend["name"] == "hf"  # what the instance describes: it is HF underneath
    same = {k: v for k, v in cache_bytes(hf).items() if Path(k).suffix == ".parquet"}
    assert same and same == {k: v for k, v in cache_bytes(echo).items() if Path(k).suffix == ".parquet"}


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--backend", "vlm"], "error: unknown --backend 'vlm'; choose from auto, hf, vllm"),
        (
            ["--backend", "vllm", "--support", "sampled"],
            "error: --support sampled needs the full softmax: use --backend hf",
        ),
    ],
)
def test_a_refused_backend_is_one_line_and_leaves_nothing_behind(tmp_path, teacher_dir, corpus_jsonl, flags, message):
    from typer.testing import CliRunner

    from kd_pipeline.pipeline import app

    out = tmp_path / "cache"
    args = ["cache-teacher", "--teacher", str(teacher_dir), "--data", str(corpus_jsonl), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--no-progress", *flags])
    assert result.exit_code == 2 and result.output.strip() == message, result.output
    assert not out.exists()
