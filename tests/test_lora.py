"""LoRA students (train/lora.py): only the adapters train, under every loss and the fused loss; exact resume;
the adapter and the merged model in final/; 2-rank DDP and FSDP; a missing peft and bad options are refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_llama

from kd_pipeline.errors import ConfigError, MissingDependency
from kd_pipeline.train import losses
from kd_pipeline.train.checkpoint import checkpoint_dirs
from kd_pipeline.train.trainer import DistillConfig, distill

peft = pytest.importorskip("peft")
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def pretrained_student(tmp_path_factory, tokenizer_dir) -> Path:
    """A small student with weights (LoRA adapts a trained model), with the teacher's tokenizer."""
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("lora_student")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(d)
    build_llama(d, 320, layers=2, hidden=32, seed=3)
    return d


def config(student, cache, out, **kw) -> DistillConfig:
    base = dict(
        student=str(student),
        cache=Path(cache),
        out=Path(out),
        loss="fkl",
        batch_size=4,
        lr=1e-2,
        max_steps=6,
        eval_every=6,
        eval_sequences=12,
        save_every=1000,
        log_every=1,
        progress=False,
        device="cpu",
        lora_r=4,
    )
    base.update(kw)
    return DistillConfig(**base)


def logged(out: Path) -> dict[int, dict]:
    return {m["step"]: m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m}


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, small_cache, pretrained_student) -> Path:
    out = tmp_path_factory.mktemp("lora") / "run"
    distill(config(pretrained_student, small_cache, out, merge_lora=True, eval_at_start=True))
    return out


def test_final_holds_an_adapter_that_loads_on_the_base_and_a_merged_model_with_its_logits(lora_run, pretrained_student):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = lora_run / "final"
    adapter_config = json.loads((final / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == 4
    assert sorted(adapter_config["target_modules"]) == ["q_proj", "v_proj"]  # PEFT's default for Llama
    names = sorted(load_file(final / "adapter_model.safetensors"))
    assert len(names) == 2 * 2 * 2 and all(".lora_A." in n or ".lora_B." in n for n in names)  # layers, q/v, A/B
    assert not (final / "model.safetensors").exists()

    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    base_logits = logits_of(AutoModelForCausalLM.from_pretrained(pretrained_student), ids)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pretrained_student), final)
    adapted_logits = logits_of(adapted, ids)
    merged = AutoModelForCausalLM.from_pretrained(final / "merged")
    assert type(merged).__name__ == "LlamaForCausalLM"
    merged_logits = logits_of(merged, ids)
    assert (adapted_logits - base_logits).abs().max() > 1e-2  # the adapters trained
    assert torch.allclose(merged_logits, adapted_logits, rtol=0, atol=1e-5)
    assert len(AutoTokenizer.from_pretrained(final / "merged")) == 320
    assert json.loads((final / "merged" / "lineage.json").read_text())["config"]["lora_r"] == 4


def test_only_the_adapters_change_and_the_student_learns(lora_run, pretrained_student):
    from safetensors.torch import load_file

    base = load_file(pretrained_student / "model.safetensors")
    merged = load_file(lora_run / "final" / "merged" / "model.safetensors")
    changed = sorted(k for k in base if not torch.equal(base[k], merged[k]))
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)
    evals = [m for m in map(json.loads, (lora_run / "metrics.jsonl").read_text().splitlines()) if "eval_kl" in m]
    assert evals[-1]["eval_kl"] < evals[0]["eval_kl"]
    memory = json.loads((lora_run / "memory.json").read_text())["ranks"][0]
    lora_numbers = 2 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4)  # layers x (q: A + B, v: A + B); v_proj is 32 -> 16
    assert memory["optimizer_bytes"] == 2 * 4 * lora_numbers  # AdamW: exp_avg + exp_avg_sq, fp32, adapters only


@pytest.mark.parametrize("loss", [name for name in losses.LOSSES])
def test_every_loss_trains_a_lora_student(tmp_path, small_cache, pretrained_student, loss):
    out = tmp_path / loss
    distill(config(pretrained_student, small_cache, out, loss=loss, max_steps=3, eval_every=1000))
    steps = logged(out)
    assert sorted(steps) == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(m["loss"])) and m["grad_norm"] > 0 for m in steps.values())


def test_fused_loss_sees_through_the_adapters(tmp_path, small_cache, pretrained_student, capfd):
    plain, fused = tmp_path / "plain", tmp_path / "fused"
    distill(config(pretrained_student, small_cache, plain, max_steps=4))
    distill(config(pretrained_student, small_cache, fused, max_steps=4, fused_loss=True))
    assert "falling back" not in capfd.readouterr().err
    a, b = logged(plain), logged(fused)
    for step in a:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-4), step


def test_fused_loss_falls_back_when_the_head_is_adapted(tmp_path, small_cache, pretrained_student, capfd):
    out = tmp_path / "head"
    distill(config(pretrained_student, small_cache, out, max_steps=2, fused_loss=True, lora_target_modules="lm_head"))
    err = capfd.readouterr().err
    assert "--fused-loss:" in err and "not a plain torch.nn.Linear" in err and "falling back" in err
    assert sorted(logged(out)) == [1, 2]


def test_gradient_checkpointing_gives_the_same_lora_run(tmp_path, small_cache, pretrained_student):
    plain, recomputed = tmp_path / "plain", tmp_path / "recomputed"
    distill(config(pretrained_student, small_cache, plain, max_steps=3))
    distill(config(pretrained_student, small_cache, recomputed, max_steps=3, gradient_checkpointing=True))
    a, b = logged(plain), logged(recomputed)
    for step in a:
        assert b[step]["grad_norm"] > 0
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-6), step


def test_resume_from_a_checkpoint_gives_the_uninterrupted_losses(tmp_path, small_cache, pretrained_student):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    distill(config(pretrained_student, small_cache, ref, max_steps=6, lora_dropout=0.1))
    distill(config(pretrained_student, small_cache, cut, max_steps=6, lora_dropout=0.1, save_every=3))
    # As if killed after step 3's checkpoint: drop what came after it.
    for later in checkpoint_dirs(cut)[1:]:
        shutil.rmtree(later)
    shutil.rmtree(cut / "final")
    distill(config(pretrained_student, small_cache, cut, max_steps=6, lora_dropout=0.1, save_every=3, resume=True))
    a, b = logged(ref), logged(cut)
    assert sorted(b) == list(range(1, 7))
    for step in range(1, 7):  # dropout's random draws too come back with the checkpoint's generators
        assert b[step]["loss"] == a[step]["loss"], step
    from safetensors.torch import load_file

    wa, wb = (load_file(out / "final" / "adapter_model.safetensors") for out in (ref, cut))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_full_finetuning_checkpoint_cannot_resume_as_lora(tmp_path, small_cache, pretrained_student):
    out = tmp_path / "run"
    distill(config(pretrained_student, small_cache, out, max_steps=2, lora_r=0))
    with pytest.raises(Exception, match="--lora-r: 0 in the checkpoint, 4 now"):
        distill(config(pretrained_student, small_cache, out, max_steps=4, resume=True))


def test_peft_config_file_gives_the_same_run_as_the_options(tmp_path, small_cache, pretrained_student):
    options, from_file = tmp_path / "options", tmp_path / "file"
    distill(config(pretrained_student, small_cache, options, max_steps=2, lora_target_modules="all-linear"))
    spec = tmp_path / "peft.json"
    spec.write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 16, "target_modules": "all-linear"}))
    distill(config(pretrained_student, small_cache, from_file, max_steps=2, lora_r=0, peft_config=spec))
    assert [m["loss"] for m in logged(options).values()] == [m["loss"] for m in logged(from_file).values()]
    saved = [json.loads((out / "final" / "adapter_config.json").read_text()) for out in (options, from_file)]
    assert saved[0]["target_modules"] == saved[1]["target_modules"]  # PEFT writes all-linear out as module paths
    assert {name.rsplit(".", 1)[1] for name in saved[1]["target_modules"]} == {
        *("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    }


@pytest.mark.parametrize(
    "options, message",
    [
        ({"lora_r": -1}, "--lora-r must be >= 0"),
        ({"lora_dropout": 1.0}, "--lora-dropout"),
        ({"lora_r": 0, "merge_lora": True}, "--merge-lora merges LoRA adapters"),
        ({"peft_config": Path("/nonexistent.json")}, "both"),
    ],
)
def test_bad_lora_options_are_refused(tmp_path, small_cache, pretrained_student, options, message):
    with pytest.raises(ConfigError, match=message):
        config(pretrained_student, small_cache, tmp_path / "x", **options).validate()


def test_target_modules_the_student_lacks_are_refused(tmp_path, small_cache, pretrained_student):
    with pytest.raises(ConfigError, match="nope_proj"):
        distill(config(pretrained_student, small_cache, tmp_path / "x", lora_target_modules="nope_proj"))


def test_missing_peft_is_a_missing_dependency_at_start(tmp_path, small_cache, pretrained_student, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # what `import peft` meets where it is not installed
    with pytest.raises(MissingDependency, match=r"kd-pipeline\[peft\]"):
        config(pretrained_student, small_cache, tmp_path / "x").validate()
    assert not (tmp_path / "x").exists()


def test_cli_takes_the_lora_options(tmp_path, small_cache, pretrained_student):
    from typer.testing import CliRunner

    from kd_pipeline.pipeline import app

    out = tmp_path / "cli"
    args = ["distill", "--student", str(pretrained_student), "--cache", str(small_cache), "--out", str(out)]
    args += ["--max-steps", "2", "--batch-size", "4", "--eval-sequences", "12", "--no-progress", "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--lora-r", "2", "--lora-target-modules", "q_proj,k_proj"])
    assert result.exit_code == 0, result.output
    assert sorted(json.loads((out / "final" / "adapter_config.json").read_text())["target_modules"]) == [
        "k_proj",
        "q_proj",
    ]
    refused = CliRunner().invoke(app, [*args[:-2], "--merge-lora"])
    assert refused.exit_code == 2 and "--merge-lora merges LoRA adapters" in refused.output


# ------------------------------------------------------------------------------------------ 2 ranks
def torchrun(student, cache, out, port: int, *extra) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", str(port), "--no-python"]
    cmd += [str(BIN / "pipeline"), "distill", "--student", str(student), "--cache", str(cache), "--out", str(out)]
    cmd += ["--loss", "fkl", "--batch-size", "4", "--lr", "1e-2", "--max-steps", "6", "--save-every", "3"]
    cmd += ["--eval-every", "6", "--eval-sequences", "12", "--log-every", "1", "--no-progress", "--device", "cpu"]
    cmd += ["--lora-r", "4", "--merge-lora", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=out.parent)


def test_ddp_and_fsdp_train_the_same_adapters_and_fsdp_resumes_exactly(tmp_path, small_cache, pretrained_student):
    from safetensors.torch import load_file

    runs = {}
    for port, mode in enumerate(("ddp", "fsdp")):
        runs[mode] = tmp_path / mode
        result = torchrun(pretrained_student, small_cache, runs[mode], 29610 + port, "--parallel", mode)
        assert result.returncode == 0, result.stderr[-3000:]
    a, b = logged(runs["ddp"]), logged(runs["fsdp"])
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5), step
    wa, wb = (load_file(runs[m] / "final" / "adapter_model.safetensors") for m in ("ddp", "fsdp"))
    assert sorted(wa) == sorted(wb) and all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    ma, mb = (load_file(runs[m] / "final" / "merged" / "model.safetensors") for m in ("ddp", "fsdp"))
    assert all(torch.allclose(ma[k], mb[k], atol=1e-6) for k in ma)
    memory = json.loads((runs["fsdp"] / "memory.json").read_text())["ranks"]
    full = json.loads((runs["ddp"] / "memory.json").read_text())["ranks"]
    assert memory[0]["optimizer_bytes"] == full[0]["optimizer_bytes"] // 2  # FSDP shards the adapters' state too

    # Cut the FSDP run back to its step-3 checkpoint and resume it: the same losses as without the cut.
    for later in checkpoint_dirs(runs["fsdp"])[1:]:
        shutil.rmtree(later)
    shutil.rmtree(runs["fsdp"] / "final")
    resumed = torchrun(pretrained_student, small_cache, runs["fsdp"], 29612, "--parallel", "fsdp", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    c = logged(runs["fsdp"])
    assert all(c[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-6) for step in range(1, 7))
