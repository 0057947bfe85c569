"""How the student is spread over processes: one strategy object owns everything that differs between a single
process, DDP and FSDP2, so the training recipe (train/trainer.py) never asks which one it runs under.

A strategy owns: the process group, wrapping the model, gradient accumulation without communication, the
gradient-norm clip, the state dicts a checkpoint holds (torch.distributed.checkpoint's ``get_state_dict`` and
``set_state_dict``, the same calls for all three, so a checkpoint of one resumes under another or on another
world size), and the full weights for the final ``save_pretrained`` folder.

``--parallel`` chooses: ``none`` (one process), ``ddp`` (the default under torchrun: every rank holds the whole
model and optimizer, gradients all-reduced) or ``fsdp`` (FSDP2's ``fully_shard``: parameters, gradients and
optimizer state sharded, each rank holding ~1/N; every decoder layer is its own unit, gathered for its forward and
backward only, then the root with the embeddings, final norm and output layer).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from kd_pipeline.errors import ConfigError

PARALLEL_CHOICES = ("auto", "none", "ddp", "fsdp")


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def all_reduce(self, values: torch.Tensor, op=None) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(values, op=op or dist.ReduceOp.SUM)
        return values

    def all_gather_objects(self, value) -> list:
        if self.world_size == 1:
            return [value]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered


def init_processes(device_pref: str) -> tuple[Dist, torch.device]:
    """The process group torchrun describes in the environment (none for a single process), and this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device_pref == "auto":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(device_pref)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    procs = Dist(int(os.environ.get("RANK", "0")), world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return procs, device


class Strategy:
    """One process, no wrapper; the base of the others (their shared state-dict code lives here)."""

    name = "none"

    def __init__(self, procs: Dist, device: torch.device):
        self.procs, self.device = procs, device

    # ---------------------------------------------------------------------------------------------- model
    def wrap(self, model: nn.Module, *, bf16: bool) -> nn.Module:
        return model

    def inner(self, model: nn.Module) -> nn.Module:
        """The Hugging Face model itself (config, heads, save_pretrained), whatever wraps it."""
        return model

    @property
    def lockstep_forwards(self) -> bool:
        """Whether every rank must run the same number of forwards (their collectives pair up), also in eval."""
        return False

    @contextlib.contextmanager
    def accumulating(self, model: nn.Module, last: bool) -> Iterator[None]:
        """Forward and backward of one micro-batch; ``last``: the one whose backward synchronizes gradients."""
        yield

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Clip to ``max_norm`` (0: measure only); the global gradient norm before clipping, a plain tensor."""
        if max_norm > 0:
            return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])

    # ------------------------------------------------------------------------------------------- state
    def state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """Model and optimizer state keyed by parameter names, as torch.distributed.checkpoint saves and loads it
        (DTensor shards under FSDP, so no rank ever holds the whole)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(model, optimizer)
        return {"model": model_state, "optimizer": optim_state}

    def load_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])

    def full_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The whole model's weights on the CPU, on the main rank (empty elsewhere): what save_pretrained writes."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def save_pretrained(self, model: nn.Module, path) -> None:
        """The student as a normal Hugging Face folder (full weights, safetensors), written by the main rank."""
        weights = self.full_weights(model)
        if self.procs.main:
            self.inner(model).save_pretrained(path, state_dict=weights, safe_serialization=True)

    def local_bytes(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
        """Bytes of parameters and of optimizer state that this rank holds (its local shards under FSDP)."""

        def size(t: torch.Tensor) -> int:
            local = t.to_local() if hasattr(t, "to_local") else t
            return local.numel() * local.element_size()

        params = sum(size(p) for p in model.parameters())
        optim = sum(size(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())
        return {"parameter_bytes": params, "optimizer_bytes": optim}


class DDP(Strategy):
    """Every rank holds the whole model and optimizer; gradients are all-reduced in backward."""

    name = "ddp"

    def wrap(self, model: nn.Module, *, bf16: bool) -> nn.Module:
        ids = [self.device] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def inner(self, model: nn.Module) -> nn.Module:
        return model.module

    @contextlib.contextmanager
    def accumulating(self, model: nn.Module, last: bool) -> Iterator[None]:
        with contextlib.nullcontext() if last else model.no_sync():
            yield


class FSDP(Strategy):
    """FSDP2 (``fully_shard``): each decoder layer, then the root; parameters, gradients and optimizer state are
    DTensors sharded over the ranks on their first dimension.

    With bf16 (CUDA), parameters are gathered and computed in bf16 while the sharded fp32 copies stay the
    optimizer's, and gradients are reduce-scattered in fp32 (``MixedPrecisionPolicy``).
    Gradient accumulation communicates once per optimizer step: the micro-batches before the last neither
    reduce-scatter their gradients (``set_requires_gradient_sync(False)``: the unsharded gradients accumulate
    locally) nor reshard after backward (``set_reshard_after_backward(False)``: the next forward finds the
    parameters gathered), the FSDP2 way to trade memory for communication; the last micro-batch restores both.
    """

    name = "fsdp"

    def wrap(self, model: nn.Module, *, bf16: bool) -> nn.Module:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
        kwargs = {"mp_policy": policy} if policy is not None else {}
        layers = decoder_layers(model)
        for layer in layers:
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)  # the rest: embeddings, final norm, output layer (tied or not)
        return model

    @property
    def lockstep_forwards(self) -> bool:
        return True

    @contextlib.contextmanager
    def accumulating(self, model: nn.Module, last: bool) -> Iterator[None]:
        model.set_requires_gradient_sync(last)
        model.set_reshard_after_backward(last)
        yield

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        norm = super().clip_grad_norm(model, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a replicated DTensor: the global norm


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a Hugging Face causal LM: the members of its ``_no_split_modules`` classes (what
    transformers itself keeps whole when it spreads a model), e.g. every ``LlamaDecoderLayer``."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names and m is not model]
    if not layers:
        raise ConfigError(
            f"--parallel fsdp: {type(model).__name__} names no decoder layer class (_no_split_modules) to shard "
            "one by one; use --parallel ddp"
        )
    return layers


def make_strategy(choice: str, procs: Dist, device: torch.device) -> Strategy:
    """``auto``: ddp under torchrun (world size > 1), none otherwise."""
    if choice not in PARALLEL_CHOICES:
        raise ConfigError(f"--parallel must be one of {', '.join(PARALLEL_CHOICES)}; got {choice!r}")
    if choice == "auto":
        choice = "ddp" if procs.world_size > 1 else "none"
    if choice == "none" and procs.world_size > 1:
        raise ConfigError(f"--parallel none runs one process, but torchrun started {procs.world_size}; use ddp or fsdp")
    if choice == "ddp" and procs.world_size == 1:
        choice = "none"  # DDP over one process is the plain model
    if choice == "fsdp" and procs.world_size == 1 and not dist.is_initialized():
        # fully_shard needs a process group; a group of one shards nothing but keeps the FSDP code path.
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1
        )
    return {"none": Strategy, "ddp": DDP, "fsdp": FSDP}[choice](procs, device)
