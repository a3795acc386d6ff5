"""Linear head + per-token log-probability in one pass: the [N, V] logits exist only as tiles in registers.

Forward, per token n with hidden row h (length H), head W [V, H], bias b, target y:
    z_v = h · W_v + b_v    m = max_v z_v    r = log Σ_v exp(z_v − m)  (online over vocabulary tiles)
    logp = (z_y − m) − r   (m and r are kept apart: at |z| ~ 1e4 their fp32 sum would round off the log-prob)
Backward, upstream gradient g per token, p = exp((z − m) − r):
    dz = g · (onehot(y) − p)    dh = dz @ W    dW = dzᵀ @ h    db = Σ_n dz
Frozen head (only dh wanted): u = W_y − p @ W is accumulated during the forward the way attention accumulates its
output (running Σ exp(z − m)·W_v, rescaled when the running max m grows), so the backward is dh = g · u.

Memory traffic and work: the forward reads W once per token tile (BLOCK_N rows share it) and writes two numbers per
token (logp, plus m and r for the backward): 2·N·H·V FLOPs, O(N) extra memory. The backward recomputes the logit
tiles twice, once in a token-tile grid that owns rows of dh and once in a vocabulary-tile grid that owns rows of dW
and db, so no atomics are needed and the result is deterministic: 8·N·H·V FLOPs (4 without a weight gradient).
The frozen-head forward costs 4·N·H·V and its backward is one elementwise rescale. Ignored tokens
(label == ignore_index) get logp 0 and gradient 0.

Matrix products accumulate in fp32 (fp64 for fp64 inputs); fp32 inputs use IEEE products (no TF32 rounding).
Half-precision inputs feed the tensor cores directly, with p / dz rounded to the input dtype for the second product;
under the Triton interpreter every tile is upcast first (its bf16 products are wrong).
"""

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _logit_tile(
    h_ptr,
    w_ptr,
    b_ptr,
    rows,
    row_ok,
    cols,
    col_ok,
    H,
    stride_hn,
    stride_wv,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """z[rows, cols] = h[rows] @ W[cols]ᵀ + b[cols], with -inf in the columns past V."""
    z = tl.zeros([BLOCK_N, BLOCK_V], ACC)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_ok = ks < H
        a = tl.load(h_ptr + rows[:, None] * stride_hn + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + cols[None, :] * stride_wv + ks[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        z = tl.dot(a.to(DOT), wt.to(DOT), z, input_precision=PRECISION, out_dtype=ACC)
    if HAS_BIAS:
        z += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    return tl.where(col_ok[None, :], z, float("-inf"))


@triton.jit
def _flp_fwd_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    labels_ptr,
    logp_ptr,
    max_ptr,
    logsum_ptr,
    u_ptr,
    N,
    V,
    H,
    stride_hn,
    stride_wv,
    ignore_index,
    HAS_BIAS: tl.constexpr,
    INPUT_GRAD: tl.constexpr,
    ACC: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    valid = row_ok & (labels != ignore_index)

    m = tl.full([BLOCK_N], float("-inf"), ACC)
    s = tl.zeros([BLOCK_N], ACC)
    target = tl.zeros([BLOCK_N], ACC)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_ok = cols < V
        z = _logit_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, H, stride_hn, stride_wv,
                        HAS_BIAS, ACC, DOT, PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)  # fmt: skip
        target += tl.sum(tl.where(cols[None, :] == labels[:, None], z, 0.0), 1)
        # Every tile holds at least one column < V, so m_new is finite: no -inf - -inf below (alpha = 0 at tile 0).
        m_new = tl.maximum(m, tl.max(z, 1))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])
        s = s * alpha + tl.sum(e, 1)
        if INPUT_GRAD:
            # u holds Σ_v exp(z_v − m)·W_v for the running max m; it starts as zeros, so tile 0's alpha = 0 is exact.
            for k0 in range(0, H, BLOCK_H):
                ks = k0 + tl.arange(0, BLOCK_H)
                k_ok = ks < H
                u_ptrs = u_ptr + rows[:, None] * H + ks[None, :]
                u_mask = row_ok[:, None] & k_ok[None, :]
                w = tl.load(
                    w_ptr + cols[:, None] * stride_wv + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0
                )
                u = tl.load(u_ptrs, mask=u_mask, other=0.0) * alpha[:, None]
                u = tl.dot(e.to(DOT), w.to(DOT), u, input_precision=PRECISION, out_dtype=ACC)
                tl.store(u_ptrs, u, mask=u_mask)
        m = m_new

    r = tl.log(s)
    tl.store(logp_ptr + rows, tl.where(valid, (target - m) - r, 0.0), mask=row_ok)
    tl.store(max_ptr + rows, m, mask=row_ok)
    tl.store(logsum_ptr + rows, r, mask=row_ok)
    if INPUT_GRAD:
        # d logp / dh = W_y − softmax(z) @ W = W_y − u / s; ignored tokens get 0.
        inv_s = 1.0 / s
        # labels and valid are loaded again rather than reused from the top: reusing them here made Triton 3.6's
        # layout pass fail on GPU (a select between two layouts at the Janus bf16 tiles); 3.7 compiles either form
        labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
        valid = row_ok & (labels != ignore_index)
        safe_labels = tl.where(valid, labels, 0)
        for k0 in range(0, H, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H)
            k_ok = ks < H
            u_ptrs = u_ptr + rows[:, None] * H + ks[None, :]
            u_mask = row_ok[:, None] & k_ok[None, :]
            w_y = tl.load(
                w_ptr + safe_labels[:, None] * stride_wv + ks[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0
            ).to(ACC)
            u = tl.load(u_ptrs, mask=u_mask, other=0.0)
            tl.store(u_ptrs, tl.where(valid[:, None], w_y - u * inv_s[:, None], 0.0), mask=u_mask)


@triton.jit
def _dlogit_tile(
    h_ptr,
    w_ptr,
    b_ptr,
    labels,
    m,
    r,
    g,
    rows,
    row_ok,
    cols,
    col_ok,
    H,
    stride_hn,
    stride_wv,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """dz = g · (onehot(label) − exp((z − m) − r)) for one recomputed logit tile (0 past V and for g = 0)."""
    z = _logit_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, H, stride_hn, stride_wv,
                    HAS_BIAS, ACC, DOT, PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)  # fmt: skip
    p = tl.exp((z - m[:, None]) - r[:, None])
    onehot = tl.where(cols[None, :] == labels[:, None], 1.0, 0.0)
    return g[:, None] * (onehot - p)


@triton.jit
def _flp_bwd_dh_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    labels_ptr,
    max_ptr,
    logsum_ptr,
    grad_ptr,
    dh_ptr,
    N,
    V,
    H,
    stride_hn,
    stride_wv,
    ignore_index,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # One program per token tile: it owns dh[rows] and sums dz @ W over the vocabulary tiles.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    valid = row_ok & (labels != ignore_index)
    m = tl.load(max_ptr + rows, mask=row_ok, other=float("inf")).to(ACC)  # rows past N: p = 0
    r = tl.load(logsum_ptr + rows, mask=row_ok, other=0.0).to(ACC)
    g = tl.where(valid, tl.load(grad_ptr + rows, mask=row_ok, other=0.0).to(ACC), 0.0)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_ok = cols < V
        dz = _dlogit_tile(h_ptr, w_ptr, b_ptr, labels, m, r, g, rows, row_ok, cols, col_ok, H, stride_hn, stride_wv,
                          HAS_BIAS, ACC, DOT, PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)  # fmt: skip
        for k0 in range(0, H, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H)
            k_ok = ks < H
            dh_ptrs = dh_ptr + rows[:, None] * H + ks[None, :]
            dh_mask = row_ok[:, None] & k_ok[None, :]
            w = tl.load(
                w_ptr + cols[:, None] * stride_wv + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0
            )
            dh = tl.load(dh_ptrs, mask=dh_mask, other=0.0)
            dh = tl.dot(dz.to(DOT), w.to(DOT), dh, input_precision=PRECISION, out_dtype=ACC)
            tl.store(dh_ptrs, dh, mask=dh_mask)


@triton.jit
def _flp_bwd_dw_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    labels_ptr,
    max_ptr,
    logsum_ptr,
    grad_ptr,
    dw_ptr,
    db_ptr,
    N,
    V,
    H,
    stride_hn,
    stride_wv,
    ignore_index,
    HAS_BIAS: tl.constexpr,
    NEED_DW: tl.constexpr,
    NEED_DB: tl.constexpr,
    ACC: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # One program per vocabulary tile: it owns dW[cols] and db[cols] and sums over the token tiles in order.
    cols = tl.program_id(0).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    db = tl.zeros([BLOCK_V], ACC)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        row_ok = rows < N
        labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
        valid = row_ok & (labels != ignore_index)
        m = tl.load(max_ptr + rows, mask=row_ok, other=float("inf")).to(ACC)  # rows past N: p = 0
        r = tl.load(logsum_ptr + rows, mask=row_ok, other=0.0).to(ACC)
        g = tl.where(valid, tl.load(grad_ptr + rows, mask=row_ok, other=0.0).to(ACC), 0.0)
        dz = _dlogit_tile(h_ptr, w_ptr, b_ptr, labels, m, r, g, rows, row_ok, cols, col_ok, H, stride_hn, stride_wv,
                          HAS_BIAS, ACC, DOT, PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)  # fmt: skip
        if NEED_DB:
            db += tl.sum(dz, 0)
        if NEED_DW:
            dzt = tl.trans(dz).to(DOT)
            for k0 in range(0, H, BLOCK_H):
                ks = k0 + tl.arange(0, BLOCK_H)
                k_ok = ks < H
                dw_ptrs = dw_ptr + cols[:, None] * H + ks[None, :]
                dw_mask = col_ok[:, None] & k_ok[None, :]
                a = tl.load(
                    h_ptr + rows[:, None] * stride_hn + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
                )
                dw = tl.load(dw_ptrs, mask=dw_mask, other=0.0)
                dw = tl.dot(dzt, a.to(DOT), dw, input_precision=PRECISION, out_dtype=ACC)
                tl.store(dw_ptrs, dw, mask=dw_mask)
    if NEED_DB:
        tl.store(db_ptr + cols, db, mask=col_ok)


# --- launchers ------------------------------------------------------------------------------------------------------
# GPU tiles: 64 tokens × 128 vocabulary columns × 64 hidden per product, the flash-attention-like shape that keeps a
# logit tile plus two operand tiles in registers / shared memory with 8 warps. The interpreter's cost is per tile
# step, not per value, so it gets the same tiles (tests pass small overrides to cover several tiles).
BLOCK_N, BLOCK_V, BLOCK_H = 64, 128, 64


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _types(dtype: torch.dtype):
    """(accumulator dtype, product operand dtype, input precision) for inputs of ``dtype``."""
    if dtype == torch.float64:
        return tl.float64, tl.float64, "ieee"
    if dtype == torch.float32 or _interpreted():
        return tl.float32, tl.float32, "ieee"
    return tl.float32, (tl.bfloat16 if dtype == torch.bfloat16 else tl.float16), "tf32"


def _blocks(block_n: int | None, block_v: int | None, block_h: int | None) -> tuple[int, int, int]:
    pick = lambda given, default: default if given is None else max(16, triton.next_power_of_2(given))
    return pick(block_n, BLOCK_N), pick(block_v, BLOCK_V), pick(block_h, BLOCK_H)


def _as_rows(hidden: torch.Tensor) -> torch.Tensor:
    return hidden if hidden.stride(-1) == 1 else hidden.contiguous()


def forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    ignore_index: int,
    input_grad: bool = False,
    block_n: int | None = None,
    block_v: int | None = None,
    block_h: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per token ``(logp, row_max, row_logsum, u)`` for ``hidden [N, H]``, ``weight [V, H]``, ``labels [N]``.

    ``logp``, ``row_max`` (m) and ``row_logsum`` (r) are [N]; ``u = d logp / d hidden`` [N, H] (the frozen-head input
    gradient before scaling by the upstream gradient) is computed when ``input_grad``, else None. Outputs are float32
    (float64 for float64 inputs). Inputs are validated by the caller; ``hidden`` and ``weight`` need a contiguous last
    dimension (else one copy is made).
    """
    N, H = hidden.shape
    V = weight.shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    dev = hidden.device
    logp = torch.empty(N, dtype=acc, device=dev)
    row_max = torch.empty(N, dtype=acc, device=dev)
    row_logsum = torch.empty(N, dtype=acc, device=dev)
    u = torch.zeros(N, H, dtype=acc, device=dev) if input_grad else None
    if N == 0:
        return logp, row_max, row_logsum, u
    hidden, weight = _as_rows(hidden), _as_rows(weight)
    labels = labels.reshape(-1).contiguous()
    bn, bv, bh = _blocks(block_n, block_v, block_h)
    ACC, DOT, PRECISION = _types(hidden.dtype)
    with torch.device(dev):
        _flp_fwd_kernel[(triton.cdiv(N, bn),)](
            hidden, weight, bias if bias is not None else weight, labels, logp, row_max, row_logsum,
            u if input_grad else logp,
            N, V, H, hidden.stride(0), weight.stride(0), ignore_index,
            HAS_BIAS=bias is not None, INPUT_GRAD=input_grad, ACC=ACC, DOT=DOT, PRECISION=PRECISION,
            BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, num_warps=8,
        )  # fmt: skip
    return logp, row_max, row_logsum, u


def backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    row_max: torch.Tensor,
    row_logsum: torch.Tensor,
    grad_logp: torch.Tensor,
    ignore_index: int,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    block_n: int | None = None,
    block_v: int | None = None,
    block_h: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients ``(d hidden [N, H], d weight [V, H], d bias [V])`` of Σ_n grad_logp[n]·logp[n], each only if asked.

    ``row_max`` / ``row_logsum`` come from ``forward``. Returned in the accumulator dtype (float32, float64 for
    float64 inputs); the caller casts to the input dtype.
    """
    N, H = hidden.shape
    V = weight.shape[0]
    acc = row_max.dtype
    dev = hidden.device
    dh = torch.zeros(N, H, dtype=acc, device=dev) if need_hidden else None
    dw = torch.zeros(V, H, dtype=acc, device=dev) if need_weight else None
    db = torch.zeros(V, dtype=acc, device=dev) if need_bias else None
    if N == 0:
        return dh, dw, db
    hidden, weight = _as_rows(hidden), _as_rows(weight)
    labels = labels.reshape(-1).contiguous()
    grad_logp = grad_logp.reshape(-1).to(acc).contiguous()
    bn, bv, bh = _blocks(block_n, block_v, block_h)
    ACC, DOT, PRECISION = _types(hidden.dtype)
    b_arg = bias if bias is not None else weight
    with torch.device(dev):
        if need_hidden:
            _flp_bwd_dh_kernel[(triton.cdiv(N, bn),)](
                hidden, weight, b_arg, labels, row_max, row_logsum, grad_logp, dh,
                N, V, H, hidden.stride(0), weight.stride(0), ignore_index,
                HAS_BIAS=bias is not None, ACC=ACC, DOT=DOT, PRECISION=PRECISION,
                BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, num_warps=8,
            )  # fmt: skip
        if need_weight or need_bias:
            _flp_bwd_dw_kernel[(triton.cdiv(V, bv),)](
                hidden, weight, b_arg, labels, row_max, row_logsum, grad_logp,
                dw if need_weight else row_max, db if need_bias else row_max,
                N, V, H, hidden.stride(0), weight.stride(0), ignore_index,
                HAS_BIAS=bias is not None, NEED_DW=need_weight, NEED_DB=need_bias, ACC=ACC, DOT=DOT,
                PRECISION=PRECISION, BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, num_warps=8,
            )  # fmt: skip
    return dh, dw, db
