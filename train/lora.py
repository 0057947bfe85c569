"""LoRA (and any PEFT method) students: train adapters on a frozen student instead of all its weights.

``--lora-r R`` (or ``--peft-config FILE.json``) wraps the loaded student with ``peft.get_peft_model`` before the
parallelism strategy wraps it, so everything downstream sees one ``nn.Module`` whose frozen weights get no
gradient and no optimizer state:

- DDP reduces only the adapters' gradients; FSDP2 shards the wrapped model per decoder layer as any student
  (``PeftModel._no_split_modules`` reaches the base model's), frozen weights included;
- checkpoints hold the PeftModel's state dict by name (frozen base weights too: a from-scratch student's base is
  seed-made, and a resume must not depend on reloading it) and resume exactly, like any student's. A checkpoint
  of a full fine-tuning run does not load into a LoRA run or the reverse (other names): the options that decide
  the adapters are fixed for a run (trainer.RESUME_FIXED);
- the fused loss splits the head off the base model under the adapters (train/fused.py unwraps PEFT); an adapted
  ``lm_head`` is no plain linear layer, so the fused loss falls back to logits with its usual message;
- ``final/`` holds the adapter as PEFT writes it (``adapter_config.json``, ``adapter_model.safetensors``: load it
  with ``PeftModel.from_pretrained(base, final)``); with ``--merge-lora`` also ``final/merged/``, the student with
  the adapters merged into its weights, a plain ``AutoModelForCausalLM`` folder.

PEFT's default targets for Llama are ``q_proj`` and ``v_proj``
(``peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``); ``all-linear`` adapts every linear
layer of the decoder but not the output layer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from kd_pipeline.errors import ConfigError, MissingDependency

MERGED_DIR = "merged"
# The options that decide which parameters a student has and trains (a checkpoint of other adapters, or of full
# fine-tuning, holds other names and shapes); fixed for a run, with --lora-alpha (the same parameters, another model).
PARAMETER_OPTIONS = frozenset({"lora_r", "lora_target_modules", "peft_config"})


def enabled(cfg) -> bool:
    """Whether ``cfg`` (a DistillConfig) trains adapters rather than the whole student."""
    return cfg.lora_r > 0 or cfg.peft_config is not None


def _peft():
    try:
        import peft
    except ImportError as e:
        raise MissingDependency(
            f"--lora-r / --peft-config need the peft package ({e}); pip install 'kd-pipeline[peft]'"
        ) from e
    return peft


def validate(cfg) -> None:
    """Refuse LoRA options that cannot work, and a missing peft, before anything is loaded."""
    if cfg.lora_r < 0:
        raise ConfigError(f"--lora-r must be >= 0 (0: train the whole student); got {cfg.lora_r}")
    if not 0.0 <= cfg.lora_dropout < 1.0:
        raise ConfigError(f"--lora-dropout must be in [0, 1); got {cfg.lora_dropout}")
    if cfg.lora_r > 0 and cfg.peft_config is not None:
        raise ConfigError("give either --lora-r (with --lora-alpha, ...) or --peft-config, not both")
    if cfg.merge_lora and not enabled(cfg):
        raise ConfigError("--merge-lora merges LoRA adapters: give --lora-r or --peft-config too")
    if enabled(cfg):
        peft_config(cfg)  # imports peft and reads the file: both fail here, at start


def peft_config(cfg):
    """The ``peft.PeftConfig`` the options describe (a CAUSAL_LM task, for training)."""
    peft = _peft()
    if cfg.peft_config is None:
        targets = [t.strip() for t in cfg.lora_target_modules.split(",") if t.strip()]
        if targets == ["all-linear"]:
            targets = "all-linear"  # PEFT's own spelling: a string, not a module name
        return peft.LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=targets or None,  # None: PEFT's default for the architecture
            task_type="CAUSAL_LM",
        )
    path = Path(cfg.peft_config)
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--peft-config {path}: cannot read a JSON object ({e})") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"--peft-config {path}: a JSON object of PEFT config fields is needed")
    # A saved adapter's config says inference_mode=true and names its base model: neither applies to this run.
    raw = {**raw, "inference_mode": False, "task_type": raw.get("task_type") or "CAUSAL_LM"}
    raw.pop("base_model_name_or_path", None)
    raw.setdefault("peft_type", "LORA")
    try:
        config = peft.PeftConfig.from_peft_type(**raw)
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"--peft-config {path}: not a PEFT config ({type(e).__name__}: {e})") from e
    if str(config.task_type) not in ("CAUSAL_LM", "TaskType.CAUSAL_LM"):
        raise ConfigError(f"--peft-config {path}: task_type {config.task_type}; a student needs CAUSAL_LM")
    return config


def wrap_student(model: nn.Module, cfg, log=None) -> nn.Module:
    """``model`` with adapters (a ``peft.PeftModel``) if ``cfg`` asks for them, else ``model`` itself."""
    if not enabled(cfg):
        return model
    peft = _peft()
    config = peft_config(cfg)
    try:
        wrapped = peft.get_peft_model(model, config)
    except ValueError as e:  # e.g. target modules that the student does not have
        raise ConfigError(f"LoRA on {type(model).__name__}: {e}") from e
    if cfg.gradient_checkpointing:
        # Reentrant checkpointing backpropagates only into inputs that require grad; the embeddings are frozen.
        wrapped.enable_input_require_grads()
    trainable, total = wrapped.get_nb_trainable_parameters()
    if log is not None:
        targets = sorted(getattr(config, "target_modules", None) or [])
        log(
            f"{config.peft_type.value if hasattr(config.peft_type, 'value') else config.peft_type} student: "
            f"{trainable:,} of {total:,} parameters trained ({100 * trainable / total:.2f}%), "
            f"adapting {', '.join(targets) or 'PEFT defaults'}"
        )
    return wrapped


def save_merged(strategy, model: nn.Module, folder: Path, cfg) -> list[Path]:
    """With ``--merge-lora``, write the student with its adapters merged under ``folder/merged``; returns the
    folders written ([] without). Every rank calls it (FSDP gathers the weights); the main rank merges on the CPU,
    in a fresh copy of the wrapped student built from its config, so the trained model is left as it is."""
    if not (enabled(cfg) and cfg.merge_lora):
        return []
    weights = strategy.full_weights(model)  # the PeftModel's names, on the main rank only
    out = Path(folder) / MERGED_DIR
    if strategy.procs.main:
        from transformers import AutoModelForCausalLM

        peft = _peft()
        inner = strategy.inner(model)
        base_config = inner.get_base_model().config
        dtype = next(iter(weights.values())).dtype
        base = AutoModelForCausalLM.from_config(base_config, dtype=dtype)
        copy = peft.get_peft_model(base, inner.peft_config[inner.active_adapter])
        copy.load_state_dict(weights, strict=True)
        with torch.no_grad():
            merged = copy.merge_and_unload()
        merged.save_pretrained(out, safe_serialization=True)
    return [out]
