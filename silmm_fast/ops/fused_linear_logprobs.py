"""``fused_linear_logprobs``: a linear head fused with the per-token log-prob gather, logits never materialized.

Backends (``silmm_fast._backend.choose("fused_linear_logprobs", device)``):
- ``torch`` (CPU) and ``triton`` (CUDA): ``silmm_fast.ops.torch_backend.fused_linear_logprobs``, tokens in chunks
  (``chunk_rows``); each chunk's [rows, V] logit slab is one vendor-BLAS product into a reused buffer
  (``head_products``), reduced to two numbers per token by the row epilogue (torch elementwise passes, or on the
  ``triton`` backend the Triton kernels of ``silmm_fast.kernels.logprobs``), and recomputed in the backward, where dz
  feeds two more BLAS products. Peak extra memory is one slab (plus the [V, H] weight gradient when the head trains)
  instead of the [N, V] logits, their log_softmax and their gradient. Ignored tokens are dropped before any product
  (prompt positions cost nothing).
- ``triton_gemm``: ``silmm_fast.kernels.fused_linear_logprobs``, the whole product in Triton tiles with the
  log-sum-exp in their epilogue (logits never leave registers in the forward). Selectable, not chosen by ``auto``:
  its tiles run slower than cuBLAS runs the same products (bench/results/suite-cuda-20261204-150241), which
  outweighs the slab's memory traffic.
- ``reference``: ``silmm_fast.reference.fused_linear_logprobs`` (materialized logits, plain autograd).

Frozen head (``hidden`` needs a gradient, ``weight`` and ``bias`` do not: LoRA without a head adapter, a frozen image
head): the forward also computes u = d logp / d hidden = W[y] − softmax(z) @ W while the logits are at hand, so the
backward is one rescale, dh = g·u: 4·N·H·V FLOPs in total (as autograd over materialized logits) instead of 6
(recomputing the logits in backward).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from silmm_fast import _backend
from silmm_fast._validate import check_choice, check_linear_head, has_data
from silmm_fast.ops import head_products as hp
from silmm_fast.ops._common import acc_dtype
from silmm_fast.ops.torch_backend import fused_linear_logprobs as torch_backend
from silmm_fast.reference import fused_linear_logprobs as _reference

if TYPE_CHECKING:
    from silmm_fast.kernels.fused_linear_logprobs import Tiles

REDUCTIONS = ("sum", "mean", "none")


def _forward(hidden, weight, bias, labels, ignore_index, backend, input_grad, chunk_rows, tiles):
    """``(logp [N], rows, m, r, u)`` from the backend (``rows``: the kept tokens' indices on the BLAS backends)."""
    if backend == "triton_gemm":
        from silmm_fast.kernels import fused_linear_logprobs as kernels

        logp, m, r, u = kernels.fused_linear_logprobs_fwd(
            hidden,
            weight,
            bias,
            labels,
            ignore_index=ignore_index,
            input_grad=input_grad,
            tiles=tiles,
            chunk_rows=chunk_rows,
        )
        return logp, None, m, r, u
    return torch_backend.fused_linear_logprobs_fwd(
        hidden,
        weight,
        bias,
        labels,
        ignore_index=ignore_index,
        input_grad=input_grad,
        epilogue=backend,
        chunk_rows=chunk_rows,
    )


def _backward(backend, hidden, weight, bias, labels, rows, m, r, grad, ignore_index, needs, chunk_rows, tiles):
    """Gradients (in the inputs' dtypes, None where not needed) of Σ grad · logp, the logits recomputed. ``m`` / ``r``
    are per kept token (``rows``: their indices, None for all) on the BLAS backends, per token on triton_gemm;
    ``needs``: (hidden, weight, bias) flags."""
    need_hidden, need_weight, need_bias = needs
    if backend == "triton_gemm":
        from silmm_fast.kernels import fused_linear_logprobs as kernels

        dh, dw, db = kernels.fused_linear_logprobs_bwd(
            hidden,
            weight,
            bias,
            labels,
            m,
            r,
            grad,
            ignore_index=ignore_index,
            need_hidden=need_hidden,
            need_weight=need_weight,
            need_bias=need_bias,
            tiles=tiles,
            chunk_rows=chunk_rows,
        )
    else:
        dh, dw, db = torch_backend.fused_linear_logprobs_bwd(
            hidden,
            weight,
            bias,
            labels,
            rows,
            m,
            r,
            grad,
            need_hidden=need_hidden,
            need_weight=need_weight,
            need_bias=need_bias,
            epilogue=backend,
            chunk_rows=chunk_rows,
        )
    dh = None if dh is None else dh.to(hidden.dtype)
    dw = None if dw is None else dw.to(weight.dtype)
    db = None if db is None else db.to(bias.dtype)
    return dh, dw, db


def recompute_backward(backend, hidden, weight, bias, labels, m, r, grad, ignore_index, needs):
    """``_backward`` from per-token ``m`` / ``r`` [N] (any backend's statistics of the same logits), at the default
    chunk size: the two-pass backward that ``fused_linear_dpo`` falls back on. hidden [N, H], labels [N] int64,
    grad [N], ``needs``: (hidden, weight, bias) flags."""
    rows = None
    if backend != "triton_gemm":
        rows = torch_backend.kept_rows(labels, ignore_index)
        if rows is not None:
            m, r = m.index_select(0, rows), r.index_select(0, rows)
    return _backward(backend, hidden, weight, bias, labels, rows, m, r, grad, ignore_index, needs, None, None)


class _FusedLinearLogprobs(torch.autograd.Function):
    """Per-token log-probs [N]; backward recomputes the logits tile by tile for whichever gradients are needed."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, backend, chunk_rows, tiles):
        logp, rows, m, r, _ = _forward(hidden, weight, bias, labels, ignore_index, backend, False, chunk_rows, tiles)
        ctx.save_for_backward(hidden, weight, bias, labels, rows, m, r)
        ctx.ignore_index, ctx.backend, ctx.chunk_rows, ctx.tiles = ignore_index, backend, chunk_rows, tiles
        return logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp):
        hidden, weight, bias, labels, rows, m, r = ctx.saved_tensors
        args = (hidden, weight, bias, labels, rows, m, r, grad_logp, ctx.ignore_index, ctx.needs_input_grad[:3])
        dh, dw, db = _backward(ctx.backend, *args, ctx.chunk_rows, ctx.tiles)
        return dh, dw, db, None, None, None, None, None


class _FrozenHeadLinearLogprobs(torch.autograd.Function):
    """Per-token log-probs [N] for a head without gradient: the forward stores u = d logp / d hidden [n, H], the
    backward only rescales it by the upstream gradient (no logits recomputed, no weight-gradient work)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, backend, chunk_rows, tiles):
        logp, rows, _, _, u = _forward(hidden, weight, bias, labels, ignore_index, backend, True, chunk_rows, tiles)
        ctx.save_for_backward(u, rows)
        ctx.hidden_shape, ctx.hidden_dtype = hidden.shape, hidden.dtype
        return logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp):
        u, rows = ctx.saved_tensors
        g = grad_logp.to(u.dtype)
        if rows is None:
            dh = u * g.unsqueeze(1)
        else:
            dh = u.new_zeros(ctx.hidden_shape).index_copy_(0, rows, u * g.index_select(0, rows).unsqueeze(1))
        return dh.to(ctx.hidden_dtype), None, None, None, None, None, None, None


class _KeptLogitsLinearLogprobs(torch.autograd.Function):
    """Per-token log-probs [N] whose forward keeps the kept tokens' logit slab [n, V] for the backward (opt-in
    ``keep_logits``): dz is written over it, so no product is recomputed (6·N·H·V with a trainable head, where the
    recomputing path does 8), at O(n·V) memory."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, backend):
        prod, slab_dtype, acc = hp.dtypes(hidden.dtype, hidden.device, backend)
        rows = torch_backend.kept_rows(labels, ignore_index)
        h = hidden if rows is None else hidden.index_select(0, rows)
        y = (labels if rows is None else labels.index_select(0, rows)).long()
        h = h.to(prod)
        slab = torch.empty(h.shape[0], weight.shape[0], dtype=slab_dtype, device=h.device)
        z = hp.mm_into(h, weight.to(prod).t(), slab, None if bias is None else bias.to(slab_dtype))
        logp_kept, m, r = hp.row_stats(backend, z, y)
        ctx.save_for_backward(weight, h, y, rows, m, r)
        ctx.slab, ctx.backend, ctx.hidden_shape, ctx.hidden_dtype = slab, backend, hidden.shape, hidden.dtype
        if rows is None:
            return logp_kept
        return torch.zeros(hidden.shape[0], dtype=acc, device=h.device).index_copy_(0, rows, logp_kept)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp):
        weight, h, y, rows, m, r = ctx.saved_tensors
        if ctx.slab is None:
            raise RuntimeError(
                "fused_linear_logprobs(keep_logits=True): backward ran twice through the same forward; its kept "
                "logits serve one backward (call the op again, or leave keep_logits off for retain_graph)"
            )
        slab, ctx.slab = ctx.slab, None
        prod = h.dtype
        g = grad_logp.to(m.dtype)
        g = g if rows is None else g.index_select(0, rows)
        out = slab if slab.dtype == prod else torch.empty(slab.shape, dtype=prod, device=slab.device)
        dz = hp.write_dz(ctx.backend, slab, y, m, r, g, out)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dh = dw = db = None
        if need_h:
            dh_kept = torch.mm(dz, weight.to(prod))
            dh = dh_kept if rows is None else dh_kept.new_zeros(ctx.hidden_shape).index_copy_(0, rows, dh_kept)
            dh = dh.to(ctx.hidden_dtype)
        if need_w:
            dw = torch.zeros(weight.shape, dtype=m.dtype, device=h.device)
            hp.accumulate(dw, dz.t(), h)
            dw = dw.to(weight.dtype)
        if need_b:
            db = dz.sum(0, dtype=m.dtype).to(weight.dtype)
        return dh, dw, db, None, None, None


# --- public op ------------------------------------------------------------------------------------------------------
def fused_linear_logprobs_on(
    backend: str,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "sum",
    keep_logits: bool = False,
    chunk_rows: int | None = None,
    tiles: Tiles | None = None,
) -> torch.Tensor:
    """``fused_linear_logprobs`` on ``backend`` for validated inputs: what the public op runs once it has checked its
    arguments and chosen the backend. ``chunk_rows``: tokens per slab; ``tiles``: the ``triton_gemm`` program tiles
    (``silmm_fast.kernels.fused_linear_logprobs.Tiles``); None: each backend's rule (tests pass small ones to cover
    several slabs and tiles)."""
    B, T, H = hidden.shape
    if not has_data(hidden):  # meta tensors: the output's shape and dtype only
        return hidden.new_empty((B, T) if reduction == "none" else (B,), dtype=acc_dtype(hidden.dtype))
    if backend == "reference":
        return _reference.fused_linear_logprobs(
            hidden, weight, labels, bias=bias, ignore_index=ignore_index, reduction=reduction
        )
    h = hidden.reshape(B * T, H)
    y = labels.reshape(B * T)
    y = y if backend == "triton_gemm" else y.long()
    bias_grad = bias is not None and bias.requires_grad
    args = (h, weight, bias, y, ignore_index, backend, chunk_rows, tiles)
    if not torch.is_grad_enabled() or not (hidden.requires_grad or weight.requires_grad or bias_grad):
        per_token = _forward(h, weight, bias, y, ignore_index, backend, False, chunk_rows, tiles)[0]
    elif hidden.requires_grad and not weight.requires_grad and not bias_grad:
        per_token = _FrozenHeadLinearLogprobs.apply(*args)
    elif keep_logits and backend != "triton_gemm":
        per_token = _KeptLogitsLinearLogprobs.apply(*args[:6])
    else:
        per_token = _FusedLinearLogprobs.apply(*args)
    per_token = per_token.view(B, T)
    if reduction == "none":
        return per_token
    total = per_token.sum(-1)
    if reduction == "sum":
        return total
    count = (labels != ignore_index).sum(-1).clamp(min=1)
    return total / count.to(total.dtype)


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "sum",
    keep_logits: bool = False,
) -> torch.Tensor:
    """Sequence log-probabilities of ``labels`` under the linear head ``hidden @ weight.T + bias``, without logits.

    Equivalent to: ``sequence_logprobs(hidden @ weight.T + bias, labels, ignore_index=..., reduction=...)``
    (``reduction="none"``: ``gather_logprobs`` of those logits), computed in fp32 without ever materializing the
    [B·T, V] logits.

    A head that is an MLP (Janus: Linear → GELU → Linear) is handled by fusing its last Linear: run the layers before
    it yourself and pass the activations entering it as ``hidden`` and its ``weight`` / ``bias``.

    Args:
        hidden: [B, T, H] float16 / bfloat16 / float32 / float64, the activations entering the head (any strides;
            rows that do not flatten to [B·T, H] with a contiguous last dimension are copied once).
        weight: [V, H], same dtype and device as ``hidden`` (``nn.Linear(H, V).weight``).
        labels: [B, T] integer, values in [0, V) or ``ignore_index`` (e.g. prompt positions).
        bias: [V] or None, same dtype as ``hidden``.
        ignore_index: label value whose tokens contribute 0 (and no gradient).
        reduction: ``"sum"`` (DPO), ``"mean"`` over the non-ignored tokens (a sequence with none gives 0, never NaN),
            or ``"none"`` for per-token log-probs.
        keep_logits: with a trainable head, keep the scored tokens' fp32 logit slab [n, V] from the forward for the
            backward, which writes dz over it instead of recomputing the logits: 6·N·H·V matrix FLOPs instead of 8,
            for O(n·V) memory (still about a third of materialized logits with their log_softmax and gradient).
            One backward per forward. For a DPO loss, ``FusedLinearDPOLoss`` gets 6·N·H·V without the memory.

    Returns:
        [B] (``"none"``: [B, T]) float32, float64 for float64 inputs; products and softmax accumulate in that dtype.
        Differentiable in ``hidden``, ``weight`` and ``bias``. When only ``hidden`` needs a gradient (frozen head),
        the forward computes the input gradient up to a per-token scale and the backward is a rescale (extra memory
        [B·T, H]); no weight-gradient work happens whenever ``weight.requires_grad`` is False.

    Memory: one [chunk, V] slab beyond inputs and gradients (``chunk_rows``; ``keep_logits``: [n, V]), and a float32
    copy of a half-precision weight on the CPU; O(B·T) on the ``triton_gemm`` backend.

    Raises:
        TypeError: non-floating ``hidden`` / ``weight`` / ``bias``, dtypes that differ from ``hidden``'s, non-integer
        ``labels``, non-int ``ignore_index``.
        ValueError: shapes that do not match ``[B, T, H]`` / ``[V, H]`` / ``[B, T]`` / ``[V]``, V = 0, different
        devices, an unknown ``reduction``, a non-bool ``keep_logits``, or a label outside [0, V) that is not
        ``ignore_index``. NaN / Inf inputs
        are not searched for; they make the affected log-probs NaN.
    """
    check_choice("reduction", reduction, REDUCTIONS)
    check_linear_head(hidden, weight, labels, bias, ignore_index)
    if not isinstance(keep_logits, bool):
        raise ValueError(f"keep_logits: expected a bool, got {keep_logits!r}")
    backend = _backend.choose("fused_linear_logprobs", hidden.device)
    return fused_linear_logprobs_on(
        backend,
        hidden,
        weight,
        labels,
        bias=bias,
        ignore_index=ignore_index,
        reduction=reduction,
        keep_logits=keep_logits,
    )
