"""Log-probability of a target class per row of a logits matrix, without materializing log_softmax.

Forward, per row z (length V) with target y:   lse = log Σ_v exp(z_v)   (online over vocabulary blocks)
                                              logp = z_y − lse
Backward, upstream gradient g per row:         dL/dz_v = g · (1[v = y] − exp(z_v − lse))
Ignored rows (y == ignore_index): logp = 0, lse = 0, gradient 0.

Memory traffic: the forward reads each logit once and writes two numbers per row (logp and the lse the backward
needs); the backward reads each logit once more and writes the gradient once. No [N, V] intermediate exists; all math
is fp32 (fp64 for fp64 inputs) whatever the storage dtype. The gradient goes to a new tensor: the logits are never
written, so an op that saved them (or saved its own output that they are) still sees the right values in backward.

Rows are addressed as a [P, Q] grid with strides (stride_p, stride_q), the last dimension contiguous: a slice such as
``logits[:, :-1]`` of a [B, T + 1, V] tensor is read in place, without a copy.
"""

import os

import torch
import triton
import triton.language as tl

# Vocabulary block per program step. 4096 fp32 values per step keeps the row loop short at V = 16K..185K on GPU
# while fitting registers with 8 warps; the interpreter prefers few, large steps (its cost is per step, not per value).
MAX_BLOCK_V = 4096
MAX_BLOCK_V_INTERPRETED = 16384


@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr,
    labels_ptr,
    logp_ptr,
    lse_ptr,
    Q,
    stride_p,
    stride_q,
    V,
    ignore_index,
    ACC: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + (row // Q) * stride_p + (row % Q) * stride_q
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index
    in_range = (label >= 0) & (label < V)

    # Ignored rows skip the vocabulary loop entirely (prompt positions cost no logit traffic).
    n_cols = tl.where(valid, V, 0)
    m = tl.full([], float("-inf"), ACC)
    s = tl.zeros([], ACC)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(ACC)
        m_new = tl.maximum(m, tl.max(x, 0))
        # While every value seen is -inf, shift by 0 instead of m_new: exp(-inf - 0) = 0 and no -inf - -inf is formed.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), 0)
        m = m_new
    shift = tl.where(m == float("-inf"), 0.0, m)
    has_mass = s > 0
    lse = tl.where(has_mass, shift + tl.log(tl.where(has_mass, s, 1.0)), float("-inf"))
    lse = tl.where(valid, lse, 0.0)

    target = tl.load(row_ptr + tl.where(in_range, label, 0), mask=valid & in_range, other=0.0).to(ACC)
    # A label outside [0, V) (only reachable when the caller skipped validation) gives NaN, never an out-of-bounds read.
    logp = tl.where(in_range, target - lse, float("nan"))
    logp = tl.where(valid, logp, 0.0)
    tl.store(logp_ptr + row, logp)
    tl.store(lse_ptr + row, lse)


@triton.jit
def _logprobs_bwd_kernel(
    logits_ptr,
    labels_ptr,
    lse_ptr,
    grad_ptr,
    dlogits_ptr,
    Q,
    stride_p,
    stride_q,
    V,
    ignore_index,
    ACC: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1).to(tl.int64)
    row_ptr = logits_ptr + (row // Q) * stride_p + (row % Q) * stride_q
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index

    cols = block * BLOCK_V + tl.arange(0, BLOCK_V)
    in_row = cols < V
    # Ignored rows load nothing: x = -inf gives softmax 0 and gradient 0 without reading the row.
    x = tl.load(row_ptr + cols, mask=in_row & valid, other=float("-inf")).to(ACC)
    lse = tl.load(lse_ptr + row).to(ACC)
    g = tl.where(valid, tl.load(grad_ptr + row).to(ACC), 0.0)
    p = tl.exp(x - lse)
    onehot = tl.where(cols == label, 1.0, 0.0)
    dx = g * (onehot - p)
    tl.store(dlogits_ptr + row * V + cols, dx.to(dlogits_ptr.dtype.element_ty), mask=in_row)


def _rows_view(logits: torch.Tensor) -> tuple[torch.Tensor, int, int, int, int]:
    """``logits`` as rows on a [P, Q] grid: (tensor, P, Q, stride_p, stride_q); copies only when unavoidable."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if logits.dim() == 1:
        return logits, 1, 1, 0, 0
    if logits.dim() == 2:
        return logits, 1, logits.shape[0], 0, logits.stride(0)
    if logits.dim() > 3:
        logits = logits.flatten(0, -3)  # a view when the leading dims merge, else one copy
    return logits, logits.shape[0], logits.shape[1], logits.stride(0), logits.stride(1)


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _block_v(V: int, block_v: int | None) -> int:
    if block_v is not None:
        return triton.next_power_of_2(block_v)
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return min(triton.next_power_of_2(V), MAX_BLOCK_V_INTERPRETED if interpreted else MAX_BLOCK_V)


def logprobs_forward(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, block_v: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row log p(label) and log-sum-exp of ``logits[..., V]``; both flat [N], float32 (float64 for fp64 input).

    ``labels`` has the shape ``logits.shape[:-1]`` (any integer dtype). ``block_v`` overrides the vocabulary block.
    """
    V = logits.shape[-1]
    N = labels.numel()
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp = torch.empty(N, dtype=out_dtype, device=logits.device)
    lse = torch.empty(N, dtype=out_dtype, device=logits.device)
    if N == 0:
        return logp, lse
    rows, _, Q, stride_p, stride_q = _rows_view(logits)
    labels = labels.reshape(-1).contiguous()
    BLOCK_V = _block_v(V, block_v)
    with torch.device(logits.device):
        _logprobs_fwd_kernel[(N,)](
            rows,
            labels,
            logp,
            lse,
            Q,
            stride_p,
            stride_q,
            V,
            ignore_index,
            ACC=_acc_dtype(logits.dtype),
            BLOCK_V=BLOCK_V,
            num_warps=8 if BLOCK_V >= 2048 else 4,
        )
    return logp, lse


def logprobs_backward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_logp: torch.Tensor,
    ignore_index: int,
    block_v: int | None = None,
) -> torch.Tensor:
    """Gradient of the per-row log-probs w.r.t. ``logits``: a new contiguous tensor of the logits' shape and dtype.

    ``lse`` is the forward's flat [N] log-sum-exp; ``grad_logp`` is the upstream gradient, [N] elements in any layout.
    """
    V = logits.shape[-1]
    N = labels.numel()
    dlogits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if N == 0:
        return dlogits
    rows, _, Q, stride_p, stride_q = _rows_view(logits)
    labels = labels.reshape(-1).contiguous()
    grad_logp = grad_logp.reshape(-1).contiguous()
    BLOCK_V = _block_v(V, block_v)
    with torch.device(logits.device):
        _logprobs_bwd_kernel[(N, triton.cdiv(V, BLOCK_V))](
            rows,
            labels,
            lse,
            grad_logp,
            dlogits,
            Q,
            stride_p,
            stride_q,
            V,
            ignore_index,
            ACC=_acc_dtype(logits.dtype),
            BLOCK_V=BLOCK_V,
            num_warps=8 if BLOCK_V >= 2048 else 4,
        )
    return dlogits
