"""``fused_linear_logprobs``: a linear head fused with the per-token log-prob gather, logits never materialized.

Backends (``silmm_fast._backend.choose("fused_linear_logprobs", device)``):
- ``torch`` (CPU) and ``triton`` (CUDA): tokens in chunks (``chunk_rows``); each chunk's [rows, V] logit slab is one
  vendor-BLAS product into a reused buffer (``head_products``), reduced to two numbers per token by the row epilogue
  (torch elementwise passes, or the Triton kernels of ``silmm_fast.kernels.logprobs``), and recomputed in the
  backward, where dz feeds two more BLAS products. Peak extra memory is one slab (plus the [V, H] weight gradient when
  the head trains) instead of the [N, V] logits, their log_softmax and their gradient. Ignored tokens are dropped
  before any product (prompt positions cost nothing).
- ``triton_gemm``: ``silmm_fast.kernels.fused_linear_logprobs``, the whole product in Triton tiles with the
  log-sum-exp in their epilogue (logits never leave registers in the forward). Selectable, not chosen by ``auto``:
  on an H200 its tiles ran at about 330 TFLOP/s where cuBLAS runs the same products at 390–500
  (bench/results/suite-cuda-20261204-150241), which outweighs the slab's memory traffic.
- ``reference``: ``silmm_fast.reference.fused_linear_logprobs`` (materialized logits, plain autograd).

Frozen head (``hidden`` needs a gradient, ``weight`` and ``bias`` do not: LoRA without a head adapter, a frozen image
head): the forward also computes u = d logp / d hidden = W[y] − softmax(z) @ W while the logits are at hand, so the
backward is one rescale, dh = g·u: 4·N·H·V FLOPs in total (as autograd over materialized logits) instead of 6
(recomputing the logits in backward).
"""

from __future__ import annotations

import torch

from silmm_fast import _backend
from silmm_fast._validate import check_choice, check_float, check_integer, check_ndim, check_same_device, has_data
from silmm_fast.ops import head_products as hp
from silmm_fast.reference import fused_linear_logprobs as _reference

REDUCTIONS = ("sum", "mean", "none")

# torch backend chunk rule: rows per chunk = TORCH_SLAB_BYTES / (V · 4 bytes), clamped to [TORCH_MIN_ROWS,
# TORCH_MAX_ROWS]. A 32 MiB slab (512 rows at V = 16384) stays in the last-level cache through the elementwise passes
# and keeps the matmul's M large enough for full throughput. Measured on a 2-core Xeon (fp32, N=4096, H=1024,
# V=16384, forward+backward, trainable head): 64 rows 2.9 s, 512 rows 1.9 s, 1024 rows 1.9 s; below 128 rows the
# products lose their efficiency, whence the floor (a 94 MiB slab at V = 184,622, still O(chunk·V)).
TORCH_SLAB_BYTES = 32 * 2**20
TORCH_MIN_ROWS, TORCH_MAX_ROWS = 128, 4096
GPU_SLAB_BYTES = 256 * 2**20  # GPU chunk: 4096 rows of fp32 logits at V = 16384
# Overrides for tests: a fixed chunk (BLAS backends), fixed (block_n, block_v, block_h) tiles and slab height
# (triton_gemm); None = the rules.
_TORCH_CHUNK_ROWS: int | None = None
_TRITON_BLOCKS: tuple[int, int, int] | None = None
_TRITON_CHUNK_ROWS: int | None = None


def torch_chunk_rows(vocab: int) -> int:
    """Token rows per chunk of the torch backend for a vocabulary of ``vocab`` (the documented rule above)."""
    if _TORCH_CHUNK_ROWS is not None:
        return _TORCH_CHUNK_ROWS
    return max(TORCH_MIN_ROWS, min(TORCH_MAX_ROWS, TORCH_SLAB_BYTES // (4 * max(vocab, 1))))


def chunk_rows(vocab: int, device: torch.device) -> int:
    """Token rows per chunk of the BLAS backends: ``torch_chunk_rows`` on the CPU (a cache-sized slab); on a GPU a
    ``GPU_SLAB_BYTES`` slab, whose products are large enough to run at the GEMM's full rate."""
    if _TORCH_CHUNK_ROWS is not None or device.type == "cpu":
        return torch_chunk_rows(vocab)
    return max(TORCH_MIN_ROWS, GPU_SLAB_BYTES // (4 * max(vocab, 1)))


# --- torch backend --------------------------------------------------------------------------------------------------
def _compact(labels: torch.Tensor, ignore_index: int) -> torch.Tensor | None:
    """Indices of the non-ignored tokens, or None when all count (one host sync: this is the CPU path)."""
    keep = labels != ignore_index
    if bool(keep.all()):
        return None
    return keep.nonzero().squeeze(1)


def _blas_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    ignore_index: int,
    input_grad: bool,
    epilogue: str,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(logp [N], rows, m [n], r [n], u [n, H] or None)`` over the n kept tokens (``rows``: their indices or None):
    per chunk of tokens one BLAS product into the slab, then the ``epilogue``'s row statistics (``head_products``)."""
    N = hidden.shape[0]
    V = weight.shape[0]
    prod, slab_dtype, acc = hp.dtypes(hidden.dtype, hidden.device, epilogue)
    rows = _compact(labels, ignore_index)
    h, y = (hidden, labels) if rows is None else (hidden.index_select(0, rows), labels.index_select(0, rows))
    y = y.long()
    w = weight.to(prod)
    b = None if bias is None else bias.to(slab_dtype)
    n = h.shape[0]
    logp_kept, m, r = (torch.empty(n, dtype=acc, device=h.device) for _ in range(3))
    u = torch.empty(n, h.shape[1], dtype=acc if prod != hidden.dtype else prod, device=h.device) if input_grad else None
    chunk = max(1, min(chunk_rows(V, h.device), n))
    slab = torch.empty(chunk, V, dtype=slab_dtype, device=h.device)
    dz_slab = slab if slab_dtype == prod else torch.empty(chunk, V, dtype=prod, device=h.device)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        z = hp.mm_into(h[s:e].to(prod), w.t(), slab[: e - s], b)
        logp_kept[s:e], m[s:e], r[s:e] = hp.row_stats(epilogue, z, y[s:e])
        if input_grad:  # u = d logp / d h = (onehot − p) @ W: dz with c = 1, one more product
            ones = torch.ones(e - s, dtype=acc, device=h.device)
            dz = hp.write_dz(epilogue, z, y[s:e], m[s:e], r[s:e], ones, dz_slab[: e - s])
            torch.mm(dz, w, out=u[s:e]) if u.dtype == prod else u[s:e].copy_(torch.mm(dz, w))
    if rows is None:
        return logp_kept, rows, m, r, u
    logp = torch.zeros(N, dtype=acc, device=h.device)
    logp.index_copy_(0, rows, logp_kept)
    return logp, rows, m, r, u


def _blas_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    rows: torch.Tensor | None,
    m: torch.Tensor,
    r: torch.Tensor,
    grad: torch.Tensor,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    epilogue: str,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of Σ grad · logp (in fp32 / fp64, or the operands' dtype for dh on CUDA half precision): per chunk,
    the logits recomputed by one BLAS product, dz by the ``epilogue``, then dh = dz W, dW += dzᵀ h, db += Σ dz."""
    V, H = weight.shape
    prod, slab_dtype, acc = hp.dtypes(hidden.dtype, hidden.device, epilogue)
    h, y, g = hidden, labels, grad.to(acc)
    if rows is not None:
        h, y, g = hidden.index_select(0, rows), labels.index_select(0, rows), g.index_select(0, rows)
    y = y.long()
    w = weight.to(prod)
    b = None if bias is None else bias.to(slab_dtype)
    n = h.shape[0]
    dh = torch.empty(n, H, dtype=acc if prod != hidden.dtype else prod, device=h.device) if need_hidden else None
    dw = torch.zeros(V, H, dtype=acc, device=h.device) if need_weight else None
    db = torch.zeros(V, dtype=acc, device=h.device) if need_bias else None
    chunk = max(1, min(chunk_rows(V, h.device), n))
    slab = torch.empty(chunk, V, dtype=slab_dtype, device=h.device)
    dz_slab = slab if slab_dtype == prod else torch.empty(chunk, V, dtype=prod, device=h.device)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        hc = h[s:e].to(prod)
        z = hp.mm_into(hc, w.t(), slab[: e - s], b)
        dz = hp.recompute_dz(epilogue, z, y[s:e], m[s:e], r[s:e], g[s:e], dz_slab[: e - s])
        if need_hidden:
            torch.mm(dz, w, out=dh[s:e]) if dh.dtype == prod else dh[s:e].copy_(torch.mm(dz, w))
        if need_weight:
            hp.accumulate(dw, dz.t(), hc)
        if need_bias:
            db.add_(dz.sum(0, dtype=acc))
    if need_hidden and rows is not None:
        dh = torch.zeros(hidden.shape, dtype=dh.dtype, device=h.device).index_copy_(0, rows, dh)
    return dh, dw, db


# --- backend-independent autograd Functions ------------------------------------------------------------------------
def _forward(hidden, weight, bias, labels, ignore_index, backend, input_grad):
    """``(logp [N], rows, m, r, u)`` from the backend (``rows``: the kept tokens' indices on the BLAS backends)."""
    if backend == "triton_gemm":
        from silmm_fast.kernels import fused_linear_logprobs as kernels

        blocks = _TRITON_BLOCKS or (None, None, None)
        logp, m, r, u = kernels.forward(
            hidden, weight, bias, labels, ignore_index, input_grad, *blocks, _TRITON_CHUNK_ROWS
        )
        return logp, None, m, r, u
    return _blas_forward(hidden, weight, bias, labels, ignore_index, input_grad, backend)


def _backward(backend, hidden, weight, bias, labels, rows, m, r, grad, ignore_index, need_h, need_w, need_b):
    """Gradients (in the inputs' dtypes, None where not needed) of Σ grad · logp, the logits recomputed. ``m`` / ``r``
    are per kept token (``rows``: their indices, None for all) on the BLAS backends, per token on triton_gemm."""
    if backend == "triton_gemm":
        from silmm_fast.kernels import fused_linear_logprobs as kernels

        blocks = _TRITON_BLOCKS or (None, None, None)
        needs = (need_h, need_w, need_b)
        dh, dw, db = kernels.backward(
            hidden, weight, bias, labels, m, r, grad, ignore_index, *needs, *blocks, _TRITON_CHUNK_ROWS
        )
    else:
        dh, dw, db = _blas_backward(hidden, weight, bias, labels, rows, m, r, grad, need_h, need_w, need_b, backend)
    dh = None if dh is None else dh.to(hidden.dtype)
    dw = None if dw is None else dw.to(weight.dtype)
    db = None if db is None else db.to(bias.dtype)
    return dh, dw, db


def recompute_backward(backend, hidden, weight, bias, labels, m, r, grad, ignore_index, need_h, need_w, need_b):
    """``_backward`` from per-token ``m`` / ``r`` [N] (any backend's statistics of the same logits): the two-pass
    backward that ``fused_linear_dpo`` falls back on. hidden [N, H], labels [N] int64, grad [N]."""
    rows = None
    if backend != "triton_gemm":
        rows = _compact(labels, ignore_index)
        if rows is not None:
            m, r = m.index_select(0, rows), r.index_select(0, rows)
    return _backward(backend, hidden, weight, bias, labels, rows, m, r, grad, ignore_index, need_h, need_w, need_b)


class _FusedLinearLogprobs(torch.autograd.Function):
    """Per-token log-probs [N]; backward recomputes the logits tile by tile for whichever gradients are needed."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, backend):
        logp, rows, m, r, _ = _forward(hidden, weight, bias, labels, ignore_index, backend, False)
        ctx.save_for_backward(hidden, weight, bias, labels, rows, m, r)
        ctx.ignore_index, ctx.backend = ignore_index, backend
        return logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp):
        hidden, weight, bias, labels, rows, m, r = ctx.saved_tensors
        dh, dw, db = _backward(ctx.backend, hidden, weight, bias, labels, rows, m, r, grad_logp, ctx.ignore_index,
                               *ctx.needs_input_grad[:3])  # fmt: skip
        return dh, dw, db, None, None, None


class _FrozenHeadLinearLogprobs(torch.autograd.Function):
    """Per-token log-probs [N] for a head without gradient: the forward stores u = d logp / d hidden [n, H], the
    backward only rescales it by the upstream gradient (no logits recomputed, no weight-gradient work)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, backend):
        logp, rows, _, _, u = _forward(hidden, weight, bias, labels, ignore_index, backend, True)
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
        return dh.to(ctx.hidden_dtype), None, None, None, None, None


class _KeptLogitsLinearLogprobs(torch.autograd.Function):
    """Per-token log-probs [N] whose forward keeps the kept tokens' logit slab [n, V] for the backward (opt-in
    ``keep_logits``): dz is written over it, so no product is recomputed (6·N·H·V with a trainable head, where the
    recomputing path does 8), at O(n·V) memory."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, backend):
        prod, slab_dtype, acc = hp.dtypes(hidden.dtype, hidden.device, backend)
        rows = _compact(labels, ignore_index)
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
def _check_label_range(labels: torch.Tensor, V: int, ignore_index: int) -> None:
    """One reduction over the O(N) labels (one host sync of a bool on CUDA): a label outside [0, V) would index
    outside the head's weight, so it is rejected before any kernel runs."""
    if labels.numel() == 0 or not has_data(labels):
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
    if bool(bad.any()):
        raise ValueError(
            f"labels: expected values in [0, {V}) (V = weight.shape[0]) or ignore_index={ignore_index}, "
            f"got {labels[bad][0].item()}"
        )


def _validate(hidden, weight, labels, bias, ignore_index, reduction) -> None:
    check_float("hidden", hidden)
    check_float("weight", weight)
    check_integer("labels", labels)
    if bias is not None:
        check_float("bias", bias)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    check_choice("reduction", reduction, REDUCTIONS)
    check_ndim("hidden", hidden, 3, "[B, T, H]")
    check_ndim("weight", weight, 2, "[V, H]")
    B, T, H = hidden.shape
    V = weight.shape[0]
    if weight.shape[1] != H:
        raise ValueError(f"weight: expected shape [V, {H}] (H = hidden.shape[-1]), got {tuple(weight.shape)}")
    if V == 0:
        raise ValueError(f"weight: expected a vocabulary of at least 1 row (shape [V, H]), got {tuple(weight.shape)}")
    if labels.shape != (B, T):
        raise ValueError(f"labels: expected shape [{B}, {T}] (hidden.shape[:2]), got {tuple(labels.shape)}")
    if bias is not None and bias.shape != (V,):
        raise ValueError(f"bias: expected shape [{V}] (V = weight.shape[0]), got {tuple(bias.shape)}")
    for name, x in (("weight", weight), ("bias", bias)):
        if x is not None and x.dtype != hidden.dtype:
            raise TypeError(f"{name}: expected dtype {hidden.dtype} (same as hidden), got {x.dtype}")
    check_same_device(hidden=hidden, weight=weight, labels=labels, bias=bias)
    _check_label_range(labels, V, ignore_index)


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
    _validate(hidden, weight, labels, bias, ignore_index, reduction)
    if not isinstance(keep_logits, bool):
        raise ValueError(f"keep_logits: expected a bool, got {keep_logits!r}")
    B, T, H = hidden.shape
    if not has_data(hidden):  # meta tensors: the output's shape and dtype only
        acc = hp.acc_dtype(hidden.dtype)
        return hidden.new_empty((B, T) if reduction == "none" else (B,), dtype=acc)
    backend = _backend.choose("fused_linear_logprobs", hidden.device)
    if backend == "reference":
        return _reference.fused_linear_logprobs(
            hidden, weight, labels, bias=bias, ignore_index=ignore_index, reduction=reduction
        )

    h = hidden.reshape(B * T, H)
    y = labels.reshape(B * T)
    y = y if backend == "triton_gemm" else y.long()
    bias_grad = bias is not None and bias.requires_grad
    if not torch.is_grad_enabled() or not (hidden.requires_grad or weight.requires_grad or bias_grad):
        per_token = _forward(h, weight, bias, y, ignore_index, backend, False)[0]
    elif hidden.requires_grad and not weight.requires_grad and not bias_grad:
        per_token = _FrozenHeadLinearLogprobs.apply(h, weight, bias, y, ignore_index, backend)
    elif keep_logits and backend != "triton_gemm":
        per_token = _KeptLogitsLinearLogprobs.apply(h, weight, bias, y, ignore_index, backend)
    else:
        per_token = _FusedLinearLogprobs.apply(h, weight, bias, y, ignore_index, backend)
    per_token = per_token.view(B, T)
    if reduction == "none":
        return per_token
    total = per_token.sum(-1)
    if reduction == "sum":
        return total
    count = (labels != ignore_index).sum(-1).clamp(min=1)
    return total / count.to(total.dtype)
