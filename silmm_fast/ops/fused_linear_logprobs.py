"""``fused_linear_logprobs``: a linear head fused with the per-token log-prob gather, logits never materialized.

Backends (``silmm_fast._backend.choose("fused_linear_logprobs", device)``):
- ``triton``: ``silmm_fast.kernels.fused_linear_logprobs`` (one kernel over token tiles × vocabulary tiles with the
  matrix product inside: per-tile log-sum-exp partials in the forward; in the backward dz written per bounded slab of
  tokens and multiplied out by cuBLAS; deterministic, no atomics).
- ``torch``: the CPU path. Tokens in chunks of ``torch_chunk_rows(V)`` rows; each chunk's [rows, V] logit slab is
  computed by one matmul into a reused buffer, reduced to two numbers per token, and recomputed in backward. Peak
  extra memory is one slab (plus the [V, H] weight gradient when the head trains) instead of the [N, V] logits, their
  log_softmax and their gradient. Ignored tokens are dropped before any product (prompt positions cost nothing).
- ``reference``: ``silmm_fast.reference.fused_linear_logprobs`` (materialized logits, plain autograd).

Frozen head (``hidden`` needs a gradient, ``weight`` and ``bias`` do not: LoRA without a head adapter, a frozen image
head): the forward also computes u = d logp / d hidden = W[y] − softmax(z) @ W while the logits are at hand, so the
backward is one rescale, dh = g·u: 4·N·H·V FLOPs in total (as autograd over materialized logits) instead of 6
(recomputing the logits in backward).
"""

from __future__ import annotations

import torch

from silmm_fast import _backend
from silmm_fast._validate import check_choice, check_float, check_integer, check_ndim, check_same_device
from silmm_fast.reference import fused_linear_logprobs as _reference

REDUCTIONS = ("sum", "mean", "none")

# torch backend chunk rule: rows per chunk = TORCH_SLAB_BYTES / (V · 4 bytes), clamped to [TORCH_MIN_ROWS,
# TORCH_MAX_ROWS]. A 32 MiB slab (512 rows at V = 16384) stays in the last-level cache through the elementwise passes
# and keeps the matmul's M large enough for full throughput. Measured on a 2-core Xeon (fp32, N=4096, H=1024,
# V=16384, forward+backward, trainable head): 64 rows 2.9 s, 512 rows 1.9 s, 1024 rows 1.9 s; below 128 rows the
# products lose their efficiency, whence the floor (a 94 MiB slab at V = 184,622, still O(chunk·V)).
TORCH_SLAB_BYTES = 32 * 2**20
TORCH_MIN_ROWS, TORCH_MAX_ROWS = 128, 4096
# Overrides for tests: a fixed chunk (torch), fixed (block_n, block_v, block_h) tiles and slab height (triton);
# None = the rules.
_TORCH_CHUNK_ROWS: int | None = None
_TRITON_BLOCKS: tuple[int, int, int] | None = None
_TRITON_CHUNK_ROWS: int | None = None


def torch_chunk_rows(vocab: int) -> int:
    """Token rows per chunk of the torch backend for a vocabulary of ``vocab`` (the documented rule above)."""
    if _TORCH_CHUNK_ROWS is not None:
        return _TORCH_CHUNK_ROWS
    return max(TORCH_MIN_ROWS, min(TORCH_MAX_ROWS, TORCH_SLAB_BYTES // (4 * max(vocab, 1))))


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- torch backend --------------------------------------------------------------------------------------------------
def _compact(labels: torch.Tensor, ignore_index: int) -> torch.Tensor | None:
    """Indices of the non-ignored tokens, or None when all count (one host sync: this is the CPU path)."""
    keep = labels != ignore_index
    if bool(keep.all()):
        return None
    return keep.nonzero().squeeze(1)


def _logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    if b is None:
        return torch.mm(h, w.t(), out=out)
    return torch.addmm(b, h, w.t(), out=out)


def _torch_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    ignore_index: int,
    input_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(logp [N], rows, m [n], r [n], u [n, H] or None)`` over the n kept tokens (``rows``: their indices or None)."""
    acc = _acc(hidden.dtype)
    N = hidden.shape[0]
    V = weight.shape[0]
    rows = _compact(labels, ignore_index)
    h, y = (hidden, labels) if rows is None else (hidden.index_select(0, rows), labels.index_select(0, rows))
    w = weight.to(acc)
    b = None if bias is None else bias.to(acc)
    n = h.shape[0]
    target = torch.empty(n, dtype=acc, device=h.device)
    m = torch.empty(n, dtype=acc, device=h.device)
    r = torch.empty(n, dtype=acc, device=h.device)
    u = torch.empty(n, h.shape[1], dtype=acc, device=h.device) if input_grad else None
    chunk = max(1, min(torch_chunk_rows(V), n))
    slab = torch.empty(chunk, V, dtype=acc, device=h.device)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        z = _logits(h[s:e].to(acc), w, b, slab[: e - s])
        yc = y[s:e].unsqueeze(1)
        torch.gather(z, 1, yc, out=target[s:e].unsqueeze(1))
        torch.amax(z, 1, out=m[s:e])
        z.sub_(m[s:e].unsqueeze(1)).exp_()  # z is now exp(z − m)
        total = z.sum(1)
        torch.log(total, out=r[s:e])
        if input_grad:
            uc = torch.mm(z, w, out=u[s:e])  # Σ_v exp(z_v − m)·W_v
            uc.mul_(total.reciprocal_().neg_().unsqueeze(1)).add_(w.index_select(0, y[s:e]))
    logp_kept = (target - m) - r
    if rows is None:
        return logp_kept, rows, m, r, u
    logp = torch.zeros(N, dtype=acc, device=h.device)
    logp.index_copy_(0, rows, logp_kept)
    return logp, rows, m, r, u


def _torch_backward(
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
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    acc = m.dtype
    V, H = weight.shape
    h, y, g = hidden, labels, grad.to(acc)
    if rows is not None:
        h, y, g = hidden.index_select(0, rows), labels.index_select(0, rows), g.index_select(0, rows)
    w = weight.to(acc)
    b = None if bias is None else bias.to(acc)
    n = h.shape[0]
    dh = torch.empty(n, H, dtype=acc, device=h.device) if need_hidden else None
    dw = torch.zeros(V, H, dtype=acc, device=h.device) if need_weight else None
    db = torch.zeros(V, dtype=acc, device=h.device) if need_bias else None
    # dz = g·(onehot − p) with p = exp(z − m)·exp(−r): three elementwise passes over the slab after the product.
    scale = -g * torch.exp(-r)
    chunk = max(1, min(torch_chunk_rows(V), n))
    slab = torch.empty(chunk, V, dtype=acc, device=h.device)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        hc = h[s:e].to(acc)
        dz = _logits(hc, w, b, slab[: e - s])
        dz.sub_(m[s:e].unsqueeze(1)).exp_().mul_(scale[s:e].unsqueeze(1))
        dz.scatter_add_(1, y[s:e].unsqueeze(1), g[s:e].unsqueeze(1))
        if need_hidden:
            torch.mm(dz, w, out=dh[s:e])
        if need_weight:
            dw.addmm_(dz.t(), hc)
        if need_bias:
            db.add_(dz.sum(0))
    if need_hidden and rows is not None:
        dh = torch.zeros(hidden.shape, dtype=acc, device=h.device).index_copy_(0, rows, dh)
    return dh, dw, db


# --- backend-independent autograd Functions ------------------------------------------------------------------------
def _forward(hidden, weight, bias, labels, ignore_index, backend, input_grad):
    """``(logp [N], rows, m, r, u)`` from the torch or triton backend."""
    if backend == "triton":
        from silmm_fast.kernels import fused_linear_logprobs as kernels

        blocks = _TRITON_BLOCKS or (None, None, None)
        logp, m, r, u = kernels.forward(
            hidden, weight, bias, labels, ignore_index, input_grad, *blocks, _TRITON_CHUNK_ROWS
        )
        return logp, None, m, r, u
    return _torch_forward(hidden, weight, bias, labels, ignore_index, input_grad)


def _backward(backend, hidden, weight, bias, labels, rows, m, r, grad, ignore_index, need_h, need_w, need_b):
    """Gradients (in the inputs' dtypes, None where not needed) of Σ grad · logp, the logits recomputed. ``m`` / ``r``
    are per kept token (``rows``: their indices, None for all) on the torch backend, per token on the triton one."""
    if backend == "triton":
        from silmm_fast.kernels import fused_linear_logprobs as kernels

        blocks = _TRITON_BLOCKS or (None, None, None)
        needs = (need_h, need_w, need_b)
        dh, dw, db = kernels.backward(
            hidden, weight, bias, labels, m, r, grad, ignore_index, *needs, *blocks, _TRITON_CHUNK_ROWS
        )
    else:
        dh, dw, db = _torch_backward(hidden, weight, bias, labels, rows, m, r, grad, need_h, need_w, need_b)
    dh = None if dh is None else dh.to(hidden.dtype)
    dw = None if dw is None else dw.to(weight.dtype)
    db = None if db is None else db.to(bias.dtype)
    return dh, dw, db


def recompute_backward(backend, hidden, weight, bias, labels, m, r, grad, ignore_index, need_h, need_w, need_b):
    """``_backward`` from per-token ``m`` / ``r`` [N] (any backend's statistics of the same logits): the two-pass
    backward that ``fused_linear_dpo`` falls back on. hidden [N, H], labels [N] int64, grad [N]."""
    rows = None
    if backend == "torch":
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


# --- public op ------------------------------------------------------------------------------------------------------
def _check_label_range(labels: torch.Tensor, V: int, ignore_index: int) -> None:
    """One reduction over the O(N) labels (one host sync of a bool on CUDA): a label outside [0, V) would index
    outside the head's weight, so it is rejected before any kernel runs."""
    if labels.numel() == 0:
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

    Returns:
        [B] (``"none"``: [B, T]) float32, float64 for float64 inputs; products and softmax accumulate in that dtype.
        Differentiable in ``hidden``, ``weight`` and ``bias``. When only ``hidden`` needs a gradient (frozen head),
        the forward computes the input gradient up to a per-token scale and the backward is a rescale (extra memory
        [B·T, H]); no weight-gradient work happens whenever ``weight.requires_grad`` is False.

    Memory: O(B·T) beyond inputs and gradients on the ``triton`` backend; one [chunk, V] slab on the ``torch``
    backend (``torch_chunk_rows``), and a float32 copy of a half-precision weight there.

    Raises:
        TypeError: non-floating ``hidden`` / ``weight`` / ``bias``, dtypes that differ from ``hidden``'s, non-integer
        ``labels``, non-int ``ignore_index``.
        ValueError: shapes that do not match ``[B, T, H]`` / ``[V, H]`` / ``[B, T]`` / ``[V]``, V = 0, different
        devices, an unknown ``reduction``, or a label outside [0, V) that is not ``ignore_index``. NaN / Inf inputs
        are not searched for; they make the affected log-probs NaN.
    """
    _validate(hidden, weight, labels, bias, ignore_index, reduction)
    B, T, H = hidden.shape
    backend = _backend.choose("fused_linear_logprobs", hidden.device)
    if backend == "reference":
        return _reference.fused_linear_logprobs(
            hidden, weight, labels, bias=bias, ignore_index=ignore_index, reduction=reduction
        )

    h = hidden.reshape(B * T, H)
    y = labels.reshape(B * T)
    y = y if backend == "triton" else y.long()
    bias_grad = bias is not None and bias.requires_grad
    if not torch.is_grad_enabled() or not (hidden.requires_grad or weight.requires_grad or bias_grad):
        per_token = _forward(h, weight, bias, y, ignore_index, backend, False)[0]
    elif hidden.requires_grad and not weight.requires_grad and not bias_grad:
        per_token = _FrozenHeadLinearLogprobs.apply(h, weight, bias, y, ignore_index, backend)
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
