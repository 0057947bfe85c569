"""Student bins straight from hidden states: the sparse KD losses without the student's ``[N, V]`` logits.

The losses in :mod:`train.losses` see the student only through :class:`~train.losses.StudentBins`: per position
the log-sum-exp of the logits over the vocabulary, the logits at the support ids (and the true token), and the
log-sum-exp over the complement of the support (the rest bin). With ``z = h @ W.T + b`` all of these come out of
one pass over the rows of W, a chunk at a time, so the ``[N, V]`` logits never exist: at 16k positions and a 128k
vocabulary they are 8 GB in fp32, as much again for their gradient, and the logits path keeps a few more such
temporaries (the complement copy, the softmax of the backward). Here the extra memory is one ``[N, chunk]`` buffer
(two under autocast) plus ``O(N·m)``; the gradients of h, W and b are the only other allocations, and W's would
exist anyway.

Forward, for each chunk ``c`` of vocabulary rows, with ``z = h @ W[c].T + b[c]`` written into the reused buffer:

- gather z at the support and target ids that fall into the chunk;
- overwrite the support entries with -inf and keep the chunk's log-sum-exp as (max, Σ e^{z - max}); each chunk
  is shifted by its own complement maximum, so a tail e^-200 below the support stays exact in fp32, with no
  ``1 - Σ q`` cancellation;
- after the last chunk, combine those pairs into ``lse_rest`` (an online log-sum-exp over the chunks), and
  ``lse = logaddexp(lse_rest, logsumexp of z over the distinct support ids)``.

Backward recomputes every chunk's logits (the price of not storing them: four ``N·V·d`` products instead of
three) and turns them into ``dL/dz`` in the same buffer, which feeds ``grad_h += dz @ W[c]`` and
``grad_W[c] = dz.T @ h``. With ``p = softmax(z)``, the outputs

    lse = log Σ_j e^{z_j}                     d/dz_j = p_j
    log_q_support_i = z_{s_i} - lse            d/dz_j = [j = s_i] - p_j
    log_q_target = z_g - lse                   d/dz_j = [j = g] - p_j
    log_q_rest = lse_rest - lse                d/dz_j = [j ∉ S]·e^{z_j - lse_rest} - p_j

give, for upstream gradients ``(G_lse, G_i, G_rest, G_g)`` and ``a = G_lse - Σ_i G_i - G_rest - G_g``,

    dL/dz_j = a·p_j + G_rest·[j ∉ S]·e^{z_j - lse_rest} + Σ_i G_i·[j = s_i] + G_g·[j = g].

Outside S the first two terms are ``e^{z_j - lse_rest}·(a·q_rest + G_rest)`` with ``q_rest = e^{lse_rest - lse}``:
both factors are <= 1 in size, so nothing overflows where q_rest is tiny. Inside S, ``p_j = q_{s_i}`` is known from
the forward and is added once per distinct id; the ``G_i`` of repeated ids add up. A column marked invalid is an
empty bin (-inf, no gradient; its id still leaves the rest bin, as in :func:`train.losses.student_bins`), and an
empty complement (the support covers V) makes ``log_q_rest = -inf`` with no gradient.

:func:`lm_head_inputs` gets ``(h, W, b)`` out of a Hugging Face causal LM and refuses, with
:class:`UnsplittableHead`, the models whose logits are not ``h @ W.T + b`` (soft-capping, logit scaling, a head that
is not a plain ``nn.Linear``).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from kd_pipeline.train.losses import NEG_INF, StudentBins, atkd_ids, first_occurrence

# Vocabulary rows per chunk. The buffer is N x chunk: 256 MB in fp32 for 16k positions. Smaller chunks save memory
# but cost more, smaller matmuls (and on GPUs more kernel launches): 4096 keeps a 128k vocabulary at 32 chunks.
DEFAULT_CHUNK_SIZE = 4096


class UnsplittableHead(RuntimeError):
    """The model's logits are not ``hidden @ W.T + b`` of a plain linear head: use the full-logits path."""


class HeadInputs(NamedTuple):
    """What the output layer sees: ``hidden`` [..., d] (the final normalized hidden states), ``weight`` [V, d] (the
    embedding matrix itself when tied), ``bias`` [V] or None."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None


# ---------------------------------------------------------------------------------------------------------------
# The loss side


def fused_student_bins(
    hidden: Tensor,
    weight: Tensor,
    support_ids: Tensor,
    target_ids: Tensor | None = None,
    *,
    bias: Tensor | None = None,
    valid: Tensor | None = None,
    include_target: bool = False,
    chunk_size: int | None = None,
) -> StudentBins:
    """:class:`~train.losses.StudentBins` of the logits ``hidden @ weight.T + bias``, never forming them.

    The same result as ``losses.student_bins(hidden @ weight.T + bias, support_ids, target_ids, include_target=...)``
    (up to rounding), with gradients to ``hidden`` [N, d], ``weight`` [V, d] and ``bias`` [V].

    ``support_ids`` [N, m] ids in [0, V) (repeats allowed); ``valid`` [N, m] bool marks columns that are empty bins
    (``-inf``, see :func:`train.losses.student_bin_logprobs`). ``include_target=True`` builds the bins on
    ``support ∪ {target}`` with :func:`train.losses.atkd_ids`, as ATKD needs (then ``valid`` must be None).
    ``target_ids`` [N] fills ``log_q_target``. ``chunk_size``: vocabulary rows per chunk (default
    :data:`DEFAULT_CHUNK_SIZE`).

    Precision follows ``F.linear``: under autocast the products run in the autocast dtype (as the model's own head
    would), otherwise in the inputs' dtype; every log-sum-exp is accumulated in fp32 (fp64 for fp64 inputs).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"need hidden [N, d] and weight [V, d]; got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    ids = support_ids.long()
    if include_target:
        if target_ids is None or valid is not None:
            raise ValueError("include_target=True needs target_ids and builds its own valid mask")
        ids, valid = atkd_ids(ids, target_ids)
    if ids.dim() != 2 or ids.shape[0] != hidden.shape[0]:
        raise ValueError(f"support_ids must be [N, m] with N = {hidden.shape[0]}; got {tuple(ids.shape)}")
    target = None if target_ids is None else target_ids.long().reshape(-1)
    vocab = weight.shape[0]
    # A stray id would silently never be gathered (the logits path raises in gather): one host sync per call.
    cols = ids if target is None else torch.cat([ids.flatten(), target])
    if cols.numel() and bool(((cols < 0) | (cols >= vocab)).any()):
        raise ValueError(f"support or target ids out of range for a vocabulary of {vocab}")
    chunk = int(chunk_size or DEFAULT_CHUNK_SIZE)
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk}")

    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type) and hidden.is_floating_point():
        matmul_dtype = torch.get_autocast_dtype(device_type)
    else:
        matmul_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    if valid is not None:
        valid = valid.to(torch.bool)
    log_q_support, log_q_rest, lse, log_q_target = _ChunkedHeadBins.apply(
        hidden, weight, bias, ids, valid, target, chunk, matmul_dtype
    )
    return StudentBins(log_q_support, log_q_rest, lse, log_q_target if target is not None else None)


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """fp32, or fp64 if an input is fp64: the log-sum-exps need more range than fp16/bf16 have."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


class _ChunkedLinear:
    """``z = h @ W.T + b`` one block of vocabulary rows at a time, into one buffer reused across the blocks.

    Reusing the buffer (rather than allocating per block) keeps the peak at one block and, on CPU, avoids the page
    faults of a fresh multi-MB allocation per block, which otherwise cost as much as the arithmetic.
    """

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, chunk: int, matmul_dtype, dtype):
        self.n, self.vocab = hidden.shape[0], weight.shape[0]
        self.chunk = min(chunk, self.vocab)
        self.count = -(-self.vocab // self.chunk)
        self.weight, self.bias = weight, bias
        self.matmul_dtype, self.dtype = matmul_dtype, dtype
        self.h = hidden.to(matmul_dtype)
        self._z = hidden.new_empty(self.n * self.chunk, dtype=dtype)
        # Under autocast the product comes out in bf16/fp16 (as the model's own head would give it) and is widened.
        self._low = None if matmul_dtype == dtype else hidden.new_empty(self.n * self.chunk, dtype=matmul_dtype)

    def __iter__(self) -> Iterator[tuple[int, int, int, Tensor]]:
        """``(index, start, end, z)``: the logits of vocabulary rows [start, end) as a [N, end - start] view of the
        buffer, valid until the next step (callers may overwrite it in place)."""
        for index in range(self.count):
            start = index * self.chunk
            end = min(start + self.chunk, self.vocab)
            size = self.n * (end - start)
            z = self._z[:size].view(self.n, end - start)
            out = z if self._low is None else self._low[:size].view(self.n, end - start)
            w = self.weight[start:end].to(self.matmul_dtype)
            if self.bias is None:
                torch.mm(self.h, w.t(), out=out)
            else:
                torch.addmm(self.bias[start:end].to(self.matmul_dtype), self.h, w.t(), out=out)
            if self._low is not None:
                z.copy_(out)
            yield index, start, end, z

    def lowered(self, dz: Tensor) -> Tensor:
        """``dz`` in the matmul dtype, in the low-precision buffer when there is one."""
        if self._low is None:
            return dz
        return self._low[: dz.numel()].view_as(dz).copy_(dz)


class _Columns:
    """Where each gathered id lies among the chunks, worked out once rather than per chunk (few small ops per
    chunk matter: each is a kernel launch on a GPU, a thread-pool round on a CPU)."""

    def __init__(self, cols: Tensor, head: _ChunkedLinear):
        self.chunk_of = torch.div(cols, head.chunk, rounding_mode="floor")
        self.local = cols - self.chunk_of * head.chunk
        # The last chunk may be narrower: there the ids of other chunks must still index inside it.
        self.last = head.count - 1
        self.local_last = self.local.clamp(max=head.vocab - self.last * head.chunk - 1)

    def at(self, index: int) -> tuple[Tensor, Tensor]:
        """Column of every id within chunk ``index`` (in bounds even for ids elsewhere) and whether it is there.

        Callers neutralize the ids that are elsewhere: they scatter 0 there and drop what they gather.
        """
        return (self.local_last if index == self.last else self.local), self.chunk_of == index


class _ChunkedHeadBins(torch.autograd.Function):
    """(hidden, W, b) -> (log_q_support, log_q_rest, lse, log_q_target); see the module docstring."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, valid, target, chunk, matmul_dtype):
        dtype = _compute_dtype(hidden, weight, bias)
        n, m = ids.shape
        cols = ids if target is None else torch.cat([ids, target.unsqueeze(1)], dim=1)
        head = _ChunkedLinear(hidden, weight, bias, chunk, matmul_dtype, dtype)
        where = _Columns(cols, head)
        neg_inf, zero = hidden.new_full((), NEG_INF, dtype=dtype), hidden.new_zeros((), dtype=dtype)
        z_cols = hidden.new_zeros(cols.shape, dtype=dtype)
        # Each chunk's complement log-sum-exp as (peak, sum of e^{z - peak}), combined after the loop.
        peaks = hidden.new_empty((head.count, n), dtype=dtype)
        sums = torch.empty_like(peaks)
        # The products are cast explicitly (matmul_dtype); autocast must not recast them, nor the out= buffers.
        with torch.autocast(hidden.device.type, enabled=False):
            for index, _, _, z in head:
                local, inside = where.at(index)
                z_cols = torch.where(inside, z.gather(1, local), z_cols)
                # Support entries -> -inf. scatter_add_ rather than scatter_: the in-bounds stand-ins of ids from
                # other chunks may share a column with a real support id, and adding 0 there is order-independent.
                z.scatter_add_(1, local[:, :m], torch.where(inside[:, :m], neg_inf, zero))
                # Shift by the complement's own maximum, so a tail e^-200 below the support stays exact in fp32.
                # A row that is all support here (-inf) gets the lowest finite shift instead: exp(-inf) = 0.
                peak = torch.amax(z, dim=1, out=peaks[index]).clamp_(min=torch.finfo(dtype).min)
                torch.sum(z.sub_(peak.unsqueeze(1)).exp_(), dim=1, out=sums[index])
        top = peaks.amax(0)
        lse_rest = (sums * (peaks - top).exp()).sum(0).log() + top  # log 0 = -inf: an empty complement
        first = first_occurrence(ids)
        lse = torch.logaddexp(lse_rest, torch.logsumexp(z_cols[:, :m].masked_fill(~first, NEG_INF), dim=1))
        log_q_cols = z_cols - lse.unsqueeze(1)
        # Outputs are fresh tensors, not views of log_q_cols (saved below): autograd forbids in-place use of views
        # returned by a custom Function, and a caller should be free to modify its bins.
        log_q_support = log_q_cols[:, :m].clone()
        if valid is not None:
            log_q_support.masked_fill_(~valid, NEG_INF)
        log_q_target = log_q_cols[:, m].clone() if target is not None else hidden.new_empty(0, dtype=dtype)

        ctx.save_for_backward(hidden, weight, bias, ids, valid, target, first, log_q_cols, lse, lse_rest)
        ctx.chunk, ctx.matmul_dtype = chunk, matmul_dtype
        return log_q_support, lse_rest - lse, lse, log_q_target

    @staticmethod
    @once_differentiable
    def backward(ctx, g_support, g_rest, g_lse, g_target):
        hidden, weight, bias, ids, valid, target, first, log_q_cols, lse, lse_rest = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dtype = lse.dtype
        m = ids.shape[1]

        # Upstream gradients (materialized as zeros where an output was unused).
        g_s = g_support.to(dtype)
        if valid is not None:
            g_s = g_s.masked_fill(~valid, 0.0)  # an empty bin is a constant -inf
        rest_empty = torch.isneginf(lse_rest)
        g_r = g_rest.to(dtype).masked_fill(rest_empty, 0.0)  # likewise an empty rest bin
        a = g_lse.to(dtype) - g_s.sum(1) - g_r
        col_grads = g_s
        if target is not None:
            g_t = g_target.to(dtype)
            a = a - g_t
            col_grads = torch.cat([g_s, g_t.unsqueeze(1)], dim=1)
        cols = ids if target is None else torch.cat([ids, target.unsqueeze(1)], dim=1)
        # Sparse part, one value per column: a·q_s for the first column of each distinct support id (p_j), plus
        # the column's own upstream gradient (repeats add up, as gather's backward does). The target column adds
        # only G_g: its p_j is counted by the support or by the complement.
        sparse = col_grads.clone()
        sparse[:, :m] += torch.where(first, a.unsqueeze(1) * log_q_cols[:, :m].exp(), 0.0)
        # Dense part outside S: e^{z - lse_rest}·(a·q_rest + G_rest). Rows with an empty rest have no such entries.
        coef = (a * (lse_rest - lse).exp() + g_r).unsqueeze(1)
        shift = torch.where(rest_empty, 0.0, lse_rest).unsqueeze(1)

        head = _ChunkedLinear(hidden, weight, bias, ctx.chunk, ctx.matmul_dtype, dtype)
        where = _Columns(cols, head)
        neg_inf, zero = lse.new_full((), NEG_INF), lse.new_zeros(())
        grad_h = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device) if need_h else None
        grad_w = torch.empty_like(weight) if need_w else None  # every row is written, chunk by chunk
        grad_b = torch.empty_like(bias) if need_b else None
        with torch.autocast(hidden.device.type, enabled=False):
            for index, start, end, z in head:
                local, inside = where.at(index)
                # z -> dL/dz in place: support to -inf (so exp gives 0 there), the dense part, then the sparse part.
                z.scatter_add_(1, local[:, :m], torch.where(inside[:, :m], neg_inf, zero))
                z.sub_(shift).exp_().mul_(coef)
                z.scatter_add_(1, local, torch.where(inside, sparse, zero))
                if need_b:
                    grad_b[start:end] = z.sum(0)
                dz = head.lowered(z)
                if need_h:
                    w = weight[start:end].to(ctx.matmul_dtype)
                    if dz.dtype == grad_h.dtype:
                        grad_h.addmm_(dz, w)
                    else:
                        grad_h += dz @ w  # bf16/fp16 product, accumulated in fp32
                if need_w:
                    if grad_w.dtype == dz.dtype:
                        torch.mm(dz.t(), head.h, out=grad_w[start:end])
                    else:
                        grad_w[start:end] = dz.t() @ head.h
        if grad_h is not None:
            grad_h = grad_h.to(hidden.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None


# ---------------------------------------------------------------------------------------------------------------
# The model side

# Config fields that put something between the head's matmul and the logits. Soft-capping (Gemma 2/3, nanochat):
# tanh(z / c)·c. Scaling (Cohere's logit_scale, Granite's and HyperCLOVA X's logits_scaling).
_SOFTCAP_FIELDS = ("final_logit_softcapping",)
_SCALE_FIELDS = ("logit_scale", "logits_scaling")


def _configs(model) -> list:
    config = getattr(model, "config", None)
    if config is None:
        return []
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return [config] if text is config else [config, text]


def hf_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model under the wrappers: DDP's ``.module``, and a PEFT model's base (train/lora.py), whose
    ``base_model`` is the decoder again (a PeftModel's own ``base_model`` returns the logits). The adapters stay
    inside it, so its decoder's output is the adapted student's."""
    inner = getattr(model, "module", model)  # DDP and friends wrap the model as .module
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def check_splittable(model) -> nn.Linear:
    """The output layer of ``model`` if its logits are ``hidden @ W.T + b``; else raise :class:`UnsplittableHead`.

    Looks at the config (soft-capping, logit scaling), the head's type (exactly ``nn.Linear``: subclasses and
    wrappers such as quantized or LoRA layers compute something else) and ``forward``'s ``logits_to_keep``
    argument, which lets the model skip its own full-vocabulary product. A check of the numbers is
    :func:`lm_head_inputs` with ``verify=True``.
    """
    inner = hf_model(model)
    name = type(inner).__name__
    for config in _configs(inner):
        for field in _SOFTCAP_FIELDS:
            cap = getattr(config, field, None)
            if cap:
                raise UnsplittableHead(f"{name} soft-caps its logits ({field}={cap})")
        for field in _SCALE_FIELDS:
            scale = getattr(config, field, None)
            if scale is not None and scale != 1:
                raise UnsplittableHead(f"{name} scales its logits ({field}={scale})")
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if type(head) is not nn.Linear:
        raise UnsplittableHead(f"{name}'s output layer is {type(head).__name__}, not a plain torch.nn.Linear")
    parameters = inspect.signature(inner.forward).parameters.values()
    if not any(p.name == "logits_to_keep" or p.kind is p.VAR_KEYWORD for p in parameters):
        raise UnsplittableHead(f"{name}.forward() has no logits_to_keep argument")
    base = getattr(inner, "base_model", inner)
    if base is inner:
        raise UnsplittableHead(f"{name} has no separate base model whose output feeds the head")
    return head


def lm_head_inputs(model, *, verify: bool = False, **forward_kwargs) -> HeadInputs:
    """Run ``model(**forward_kwargs)`` and return what its head sees: ``(hidden [B, T, d], W, b)``.

    ``model`` is called itself (so a DDP wrapper's forward hooks run and gradients are synchronized), with
    ``logits_to_keep=1`` so it computes logits for the last position only. The hidden states are the output of its
    base model (``model.base_model``: the decoder with its final norm), captured by a forward hook; their gradient
    flows back through the model as usual. W is ``model.get_output_embeddings().weight``: the embedding matrix
    itself when the embeddings are tied, so its gradient collects both uses once each.

    Raises :class:`UnsplittableHead` (see :func:`check_splittable`). ``verify=True`` also checks that the model's
    own last-position logits equal the head applied to the captured hidden states, which catches what the config
    does not say (an extra norm, a scale in forward); it costs a [B, d] x [d, V] product, so do it once per model.
    """
    head = check_splittable(model)
    inner = hf_model(model)
    captured: list[Tensor] = []

    def keep_output(module, args, output):
        hidden = getattr(output, "last_hidden_state", None)
        captured.append(output[0] if hidden is None else hidden)

    handle = inner.base_model.register_forward_hook(keep_output)
    try:
        out = model(**forward_kwargs, logits_to_keep=1)
    finally:
        handle.remove()
    if not captured or captured[-1].shape[-1] != head.weight.shape[1]:
        raise UnsplittableHead(f"the base model of {type(inner).__name__} did not return [B, T, d] hidden states")
    hidden = captured[-1]
    if verify:
        with torch.no_grad():
            want = out.logits[:, -1:].float()
            got = head(hidden[:, -1:]).float()  # the very call the model made, so a plain head agrees bit for bit
            tol = 1e-5 * max(1.0, float(want.abs().max()))
            if got.shape != want.shape or not torch.allclose(got, want, rtol=0.0, atol=tol):
                diff = (got - want).abs().max().item() if got.shape == want.shape else float("nan")
                raise UnsplittableHead(
                    f"{type(inner).__name__}'s logits are not its head applied to its base model's output "
                    f"(max difference {diff:.3g})"
                )
    return HeadInputs(hidden, head.weight, head.bias)
