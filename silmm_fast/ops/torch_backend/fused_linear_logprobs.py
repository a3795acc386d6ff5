"""The torch backend of ``fused_linear_logprobs``: tokens in chunks; each chunk's [rows, V] logit slab is one
vendor-BLAS product into a reused buffer (``silmm_fast.ops.head_products``), reduced to two numbers per token by a
row epilogue, and recomputed in the backward, where dz feeds two more BLAS products.

Per kept token with hidden row h, head W [V, H], bias b, target y, upstream gradient g:
    z = h Wᵀ + b    m = max z    r = log Σ exp(z − m)    logp = (z_y − m) − r
    dz = g · (onehot(y) − exp(z − m − r))    dh = dz W    dW += dzᵀ h    db += Σ dz

The ``epilogue`` argument names the row epilogue: ``"torch"`` (elementwise passes in place over the slab: this
backend, on any device) or ``"triton"`` (the row kernels of ``silmm_fast.kernels.logprobs``: the op's ``triton``
backend on CUDA, the same chunks and products). Ignored tokens are dropped before any product (prompt positions cost
nothing). Peak extra memory is one slab (plus the [V, H] weight gradient when the head trains).
"""

from __future__ import annotations

import torch

from silmm_fast.ops import head_products as hp

# CPU chunk rule: rows per chunk = CPU_SLAB_BYTES / (V · 4 bytes), clamped to [MIN_ROWS, MAX_ROWS]. A 32 MiB slab
# (512 rows at V = 16384) stays in the last-level cache through the elementwise passes and keeps the product's M large
# enough for full throughput; below 128 rows the products lose their efficiency, whence the floor (a 94 MiB slab at
# V = 184,622, still O(chunk·V)). docs/performance.md has the measurements.
CPU_SLAB_BYTES = 32 * 2**20
MIN_ROWS, MAX_ROWS = 128, 4096
GPU_SLAB_BYTES = 256 * 2**20  # GPU chunk: 4096 rows of fp32 logits at V = 16384


def default_chunk_rows(vocab: int, device: torch.device) -> int:
    """Token rows per chunk for a vocabulary of ``vocab`` on ``device``: a cache-sized slab on the CPU (the rule
    above); on a GPU a ``GPU_SLAB_BYTES`` slab, whose products are large enough to run at the GEMM's full rate."""
    if device.type == "cpu":
        return max(MIN_ROWS, min(MAX_ROWS, CPU_SLAB_BYTES // (4 * max(vocab, 1))))
    return max(MIN_ROWS, GPU_SLAB_BYTES // (4 * max(vocab, 1)))


def kept_rows(labels: torch.Tensor, ignore_index: int) -> torch.Tensor | None:
    """Indices of the non-ignored tokens, or None when all count (one host sync)."""
    keep = labels != ignore_index
    if bool(keep.all()):
        return None
    return keep.nonzero().squeeze(1)


def fused_linear_logprobs_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    ignore_index: int,
    input_grad: bool,
    epilogue: str,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(logp [N], rows, m [n], r [n], u [n, H] or None)`` for ``hidden [N, H]``, ``weight [V, H]``, ``labels [N]``
    over the n kept tokens (``rows``: their indices, None when all are kept). ``u = d logp / d hidden`` (the
    frozen-head input gradient before the upstream scale) when ``input_grad``. ``chunk_rows``: tokens per slab (None:
    ``default_chunk_rows``)."""
    N = hidden.shape[0]
    V = weight.shape[0]
    prod, slab_dtype, acc = hp.dtypes(hidden.dtype, hidden.device, epilogue)
    rows = kept_rows(labels, ignore_index)
    h, y = (hidden, labels) if rows is None else (hidden.index_select(0, rows), labels.index_select(0, rows))
    y = y.long()
    w = weight.to(prod)
    b = None if bias is None else bias.to(slab_dtype)
    n = h.shape[0]
    logp_kept, m, r = (torch.empty(n, dtype=acc, device=h.device) for _ in range(3))
    u = torch.empty(n, h.shape[1], dtype=acc if prod != hidden.dtype else prod, device=h.device) if input_grad else None
    chunk = max(1, min(default_chunk_rows(V, h.device) if chunk_rows is None else chunk_rows, n))
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


def fused_linear_logprobs_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    rows: torch.Tensor | None,
    row_max: torch.Tensor,
    row_logsum: torch.Tensor,
    grad_logp: torch.Tensor,
    *,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    epilogue: str,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients ``(d hidden [N, H], d weight [V, H], d bias [V])`` of Σ grad_logp · logp, each only if asked, in
    fp32 / fp64 (or the operands' dtype for dh on CUDA half precision). ``rows``, ``row_max`` and ``row_logsum`` are
    ``fused_linear_logprobs_fwd``'s (m and r per kept token); ``grad_logp`` is per token [N]. Per chunk: the logits
    recomputed by one BLAS product, dz by the ``epilogue``, then dh = dz W, dW += dzᵀ h, db += Σ dz."""
    V, H = weight.shape
    prod, slab_dtype, acc = hp.dtypes(hidden.dtype, hidden.device, epilogue)
    h, y, g = hidden, labels, grad_logp.to(acc)
    if rows is not None:
        h, y, g = hidden.index_select(0, rows), labels.index_select(0, rows), g.index_select(0, rows)
    y = y.long()
    w = weight.to(prod)
    b = None if bias is None else bias.to(slab_dtype)
    n = h.shape[0]
    dh = torch.empty(n, H, dtype=acc if prod != hidden.dtype else prod, device=h.device) if need_hidden else None
    dw = torch.zeros(V, H, dtype=acc, device=h.device) if need_weight else None
    db = torch.zeros(V, dtype=acc, device=h.device) if need_bias else None
    chunk = max(1, min(default_chunk_rows(V, h.device) if chunk_rows is None else chunk_rows, n))
    slab = torch.empty(chunk, V, dtype=slab_dtype, device=h.device)
    dz_slab = slab if slab_dtype == prod else torch.empty(chunk, V, dtype=prod, device=h.device)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        hc = h[s:e].to(prod)
        z = hp.mm_into(hc, w.t(), slab[: e - s], b)
        dz = hp.recompute_dz(epilogue, z, y[s:e], row_max[s:e], row_logsum[s:e], g[s:e], dz_slab[: e - s])
        if need_hidden:
            torch.mm(dz, w, out=dh[s:e]) if dh.dtype == prod else dh[s:e].copy_(torch.mm(dz, w))
        if need_weight:
            hp.accumulate(dw, dz.t(), hc)
        if need_bias:
            db.add_(dz.sum(0, dtype=acc))
    if need_hidden and rows is not None:
        dh = torch.zeros(hidden.shape, dtype=dh.dtype, device=h.device).index_copy_(0, rows, dh)
    return dh, dw, db
