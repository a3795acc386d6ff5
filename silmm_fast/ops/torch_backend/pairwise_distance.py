"""``pairwise_distance``'s torch backend: the Triton kernels' algorithm in vectorized PyTorch, differentiated by
autograd (the CPU path).

Pool once, one batched matmul for the Gram (cosine: on the unit rows), the same epilogue and gradient conventions as
the kernels. Rows are [*, R, D] batches: * = B for pooled inputs, * = (B, L) for pool "none" (one distance per
token). Autograd keeps only [B, R, D]-sized tensors (pooled rows, unit rows, norms; max-pool indices) and [*, M, N]
statistics, never a [B, M, N, D] difference tensor. Pairs where the expansion cancels are recomputed from their
differences, as in the kernels.
"""

from __future__ import annotations

import torch

from silmm_fast._validate import has_data
from silmm_fast.ops._common import acc_dtype
from silmm_fast.reference.pairwise_distance import COSINE_EPS

# The Gram expansion ‖a‖² + ‖c‖² − 2a·c has a rounding error of about ε·(‖a‖² + ‖c‖²): for two points of norm 8e3 at
# distance 8e-3 it returns 0 in fp32. A pair whose expanded squared distance is below EXACT_RATIO·(‖a‖² + ‖c‖²)
# (2^17·ε: fewer than ~17 correct bits left) is recomputed from its difference a − c (the Triton kernels use the
# same ratios).
EXACT_RATIO = {torch.float32: 2.0**-6, torch.float64: 2.0**-35}


def _pool(t: torch.Tensor, pool: str, acc: torch.dtype) -> torch.Tensor:
    if pool == "none":
        return t.transpose(1, 2).to(acc)
    if t.shape[2] == 1:
        return t[:, :, 0].to(acc)
    if pool == "mean":
        return t.mean(dim=2, dtype=acc)
    return t.max(dim=2).values.to(acc)  # backward routes to the first maximal token


def _gram(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return torch.bmm(a, c.transpose(1, 2)) if a.dim() == 3 else torch.matmul(a, c.transpose(-1, -2))


def pairwise_distance(x: torch.Tensor, y: torch.Tensor, kernel: str, pool: str, sigma: float) -> torch.Tensor:
    """Distances [B, M, N] of x [B, M, L, D] against y [B, N, L, D] (arguments already checked by the public op)."""
    acc = acc_dtype(x.dtype)
    a, c = _pool(x, pool, acc), _pool(y, pool, acc)
    if kernel == "cosine":
        ra = torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp_min(COSINE_EPS)
        rc = torch.linalg.vector_norm(c, dim=-1, keepdim=True).clamp_min(COSINE_EPS)
        dist = 1.0 - _gram(a / ra, c / rc)
    else:
        # ‖a‖² + ‖c‖² − 2a·c through one batched matmul; the expansion can round slightly below zero
        base = (a * a).sum(-1).unsqueeze(-1) + (c * c).sum(-1).unsqueeze(-2)
        if a.dim() == 3:
            sq = torch.baddbmm(base, a, c.transpose(1, 2), alpha=-2.0)
        else:
            sq = base - 2.0 * _gram(a, c)
        sq = _exact_where_cancelled(sq.clamp_min(0.0), base, a, c)
        if kernel == "euclidean":
            zero = sq == 0
            dist = torch.where(zero, 0.0, torch.where(zero, 1.0, sq).sqrt())  # gradient 0 at distance 0
        elif kernel == "sqeuclidean":
            dist = sq
        else:
            dist = 2.0 - 2.0 * torch.exp(-sq / (2.0 * sigma**2))
    return dist.mean(1) if pool == "none" else dist


def _exact_where_cancelled(sq: torch.Tensor, base: torch.Tensor, a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``sq`` with every pair where the expansion cancelled (sq < EXACT_RATIO·(‖a‖² + ‖c‖²)) replaced by Σ(a − c)²,
    differentiable through the differences. Only those pairs form a difference row ([pairs, D]); finding them costs
    one host sync on CUDA (the Triton path decides inside its kernels instead). Meta tensors have no values to
    look at; inside torch.compile tracing the data-dependent selection cannot run, so there every pair uses its
    difference ([..., M, N, D]: exact, more memory)."""
    if not has_data(sq):
        return sq
    if torch.compiler.is_compiling():
        exact = (a.unsqueeze(-2) - c.unsqueeze(-3)).pow(2).sum(-1)
        return torch.where(sq < EXACT_RATIO[sq.dtype] * base, exact, sq)
    with torch.no_grad():
        flagged = (sq < EXACT_RATIO[sq.dtype] * base).nonzero()  # NaN compares False: a NaN pair stays NaN
    if flagged.numel() == 0:
        return sq
    M, N, D = a.shape[-2], c.shape[-2], a.shape[-1]
    if sq.dim() == 4:  # pool "none": rows are [B, L, M|N, D]
        k = flagged[:, 0] * sq.shape[1] + flagged[:, 1]
        i, j = flagged[:, 2], flagged[:, 3]
    else:
        k, i, j = flagged[:, 0], flagged[:, 1], flagged[:, 2]
    diff = a.reshape(-1, M, D)[k, i] - c.reshape(-1, N, D)[k, j]
    exact = (diff * diff).sum(-1)
    return sq.reshape(-1, M, N).index_put((k, i, j), exact).reshape(sq.shape)
