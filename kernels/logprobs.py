"""Log-probability of a target class per row of a logits matrix, without materializing log_softmax.

Forward, per row z (length V) with target y:   m = max_v z_v,  r = log Σ_v exp(z_v − m)   (online over blocks)
                                              logp = (z_y − m) − r          (lse = m + r)
Backward, upstream gradient g per row:         dL/dz_v = g · (1[v = y] − exp((z_v − m) − r))
Ignored rows (y == ignore_index): logp = 0, m = r = 0, gradient 0.

m and r are kept apart instead of folding them into one lse: with |z| ~ 1e4 an fp32 lse has an ulp of 1e-3, while
z − m is exact near the maximum, so log-probs and softmax keep fp32 relative accuracy at extreme logits.

Memory traffic: the forward reads each logit once and writes three numbers per row (logp, and m and r for the
backward); the backward reads each logit once more and writes the gradient once. No [N, V] intermediate exists; all math
is fp32 (fp64 for fp64 inputs) whatever the storage dtype. The gradient goes to a new tensor: the logits are never
written, so an op that saved them (or saved its own output that they are) still sees the right values in backward.

Rows are addressed as a [P, Q] grid with strides (stride_p, stride_q), the last dimension contiguous: a slice such as
``logits[:, :-1]`` of a [B, T + 1, V] tensor is read in place, without a copy.
"""

import torch
import triton
import triton.language as tl
from silmm_fast.kernels._common import acc_types, interpreted, on_device

# Vocabulary block per program step. 4096 fp32 values per step keeps the row loop short at V = 16K..185K on GPU
# while fitting registers with 8 warps; the interpreter prefers few, large steps (its cost is per step, not per value).
MAX_BLOCK_V = 4096
MAX_BLOCK_V_INTERPRETED = 16384


@triton.jit
def _logprobs_fwd_kernel(
    # pointers: logits rows [P, Q, V] (last dim contiguous), labels [N], outputs [N]
    logits_ptr,
    labels_ptr,
    logp_ptr,
    max_ptr,
    logsum_ptr,
    # shapes and strides
    Q,
    V,
    stride_p,
    stride_q,
    # constants
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
    # s = 0 only for ignored rows (empty loop) and rows that are all -inf (r = -inf, logp NaN, as in log_softmax).
    logsum = tl.where(s > 0, tl.log(tl.where(s > 0, s, 1.0)), float("-inf"))
    logsum = tl.where(valid, logsum, 0.0)

    target = tl.load(row_ptr + tl.where(in_range, label, 0), mask=valid & in_range, other=0.0).to(ACC)
    # A label outside [0, V) (only reachable when the caller skipped validation) gives NaN, never an out-of-bounds read.
    logp = tl.where(in_range, (target - shift) - logsum, float("nan"))
    logp = tl.where(valid, logp, 0.0)
    tl.store(logp_ptr + row, logp)
    tl.store(max_ptr + row, shift)
    tl.store(logsum_ptr + row, logsum)


@triton.jit
def _logprobs_bwd_kernel(
    # pointers: logits rows as in the forward, its per-row statistics, upstream gradient [N], dlogits [N, V]
    logits_ptr,
    labels_ptr,
    max_ptr,
    logsum_ptr,
    grad_ptr,
    dlogits_ptr,
    # shapes and strides
    Q,
    V,
    stride_p,
    stride_q,
    # constants
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
    shift = tl.load(max_ptr + row).to(ACC)
    logsum = tl.load(logsum_ptr + row).to(ACC)
    g = tl.where(valid, tl.load(grad_ptr + row).to(ACC), 0.0)
    p = tl.exp((x - shift) - logsum)
    onehot = tl.where(cols == label, 1.0, 0.0)
    dx = g * (onehot - p)
    tl.store(dlogits_ptr + row * V + cols, dx.to(dlogits_ptr.dtype.element_ty), mask=in_row)


def _rows_view(logits: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """``logits`` as rows on a [P, Q] grid: (tensor, Q, stride_p, stride_q); copies only when unavoidable."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if logits.dim() == 1:
        return logits, 1, 0, 0
    if logits.dim() == 2:
        return logits, logits.shape[0], 0, logits.stride(0)
    if logits.dim() > 3:
        logits = logits.flatten(0, -3)  # a view when the leading dims merge, else one copy
    return logits, logits.shape[1], logits.stride(0), logits.stride(1)


def default_block_v(V: int) -> int:
    """The vocabulary block for rows of ``V`` logits: the next power of two, capped per step (see MAX_BLOCK_V)."""
    return min(triton.next_power_of_2(V), MAX_BLOCK_V_INTERPRETED if interpreted() else MAX_BLOCK_V)


def logprobs_fwd(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int, block_v: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row log p(label), row max m and r = log Σ exp(z − m) of ``logits[..., V]`` (lse = m + r).

    All three are flat [N], float32 (float64 for fp64 input). ``labels`` has the shape ``logits.shape[:-1]`` (any
    integer dtype). ``block_v``: vocabulary columns per program step (rounded up to a power of two; None:
    ``default_block_v``).
    """
    V = logits.shape[-1]
    N = labels.numel()
    acc_t, acc_tl = acc_types(logits.dtype)
    logp, row_max, row_logsum = (torch.empty(N, dtype=acc_t, device=logits.device) for _ in range(3))
    if N == 0:
        return logp, row_max, row_logsum
    rows, Q, stride_p, stride_q = _rows_view(logits)
    BLOCK_V = default_block_v(V) if block_v is None else triton.next_power_of_2(block_v)
    with on_device(logits.device):
        _logprobs_fwd_kernel[(N,)](
            # pointers
            logits_ptr=rows,
            labels_ptr=labels.reshape(-1).contiguous(),
            logp_ptr=logp,
            max_ptr=row_max,
            logsum_ptr=row_logsum,
            # shapes and strides
            Q=Q,
            V=V,
            stride_p=stride_p,
            stride_q=stride_q,
            # constants
            ignore_index=ignore_index,
            ACC=acc_tl,
            BLOCK_V=BLOCK_V,
            num_warps=8 if BLOCK_V >= 2048 else 4,
        )
    return logp, row_max, row_logsum


def logprobs_bwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    row_max: torch.Tensor,
    row_logsum: torch.Tensor,
    grad_logp: torch.Tensor,
    *,
    ignore_index: int,
    block_v: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient of the per-row log-probs w.r.t. ``logits``: a new contiguous tensor of the logits' shape and dtype,
    or ``out`` (contiguous, the logits' shape, any floating dtype).

    ``row_max`` / ``row_logsum`` are ``logprobs_fwd``'s flat [N] statistics; ``grad_logp`` is the upstream gradient,
    [N] elements in any layout. ``out`` may be ``logits`` itself (each program reads its block before writing it): the
    fused DPO head writes dz over its own logit slab. Never pass an input that autograd saved.
    """
    V = logits.shape[-1]
    N = labels.numel()
    dlogits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device) if out is None else out
    if N == 0:
        return dlogits
    rows, Q, stride_p, stride_q = _rows_view(logits)
    BLOCK_V = default_block_v(V) if block_v is None else triton.next_power_of_2(block_v)
    with on_device(logits.device):
        _logprobs_bwd_kernel[(N, triton.cdiv(V, BLOCK_V))](
            # pointers
            logits_ptr=rows,
            labels_ptr=labels.reshape(-1).contiguous(),
            max_ptr=row_max,
            logsum_ptr=row_logsum,
            grad_ptr=grad_logp.reshape(-1).to(row_max.dtype).contiguous(),
            dlogits_ptr=dlogits,
            # shapes and strides
            Q=Q,
            V=V,
            stride_p=stride_p,
            stride_q=stride_q,
            # constants
            ignore_index=ignore_index,
            ACC=acc_types(logits.dtype)[1],
            BLOCK_V=BLOCK_V,
            num_warps=8 if BLOCK_V >= 2048 else 4,
        )
    return dlogits
