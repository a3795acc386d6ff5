"""``pairwise_distance``: kernel-induced distances between pooled feature matrices, with the backend decision.

Backends (``silmm_fast._backend.choose("pairwise_distance", device)``):
- ``triton``: the fused kernels in ``silmm_fast.kernels.pairwise_distance`` (pool while loading, Gram through
  ``tl.dot``, distance epilogue; hand-written backward that re-reads the inputs once).
- ``torch``: the same algorithm in vectorized PyTorch (the CPU path): pool once, one batched matmul for the Gram
  (cosine: on the unit rows), the same epilogue and gradient conventions, differentiated by autograd; no tensor
  larger than the pooled rows and the [B, M, N(, L)] distances, never a [B, M, N, D] difference tensor. (A
  hand-written autograd Function here measured slower at small CPU shapes: its Python overhead outweighs the ops
  it saves.) Pairs where the expansion cancels are recomputed from their differences (below).
- ``reference``: ``silmm_fast.reference.pairwise_distance`` (explicit differences, plain autograd).
"""

from __future__ import annotations

import torch

from silmm_fast import _backend
from silmm_fast._validate import (
    check_choice,
    check_float,
    check_ndim,
    check_positive,
    check_same_device,
    has_data,
)
from silmm_fast.reference import pairwise_distance as _reference

KERNELS = ("cosine", "euclidean", "sqeuclidean", "rbf")
POOLS = ("mean", "max", "none")
COSINE_EPS = _reference.COSINE_EPS
# The Gram expansion ‖a‖² + ‖c‖² − 2a·c has a rounding error of about ε·(‖a‖² + ‖c‖²): for two points of norm 8e3 at
# distance 8e-3 it returns 0 in fp32. A pair whose expanded squared distance is below EXACT_RATIO·(‖a‖² + ‖c‖²)
# (2^17·ε: fewer than ~17 correct bits left) is recomputed from its difference a − c, in every backend (the Triton
# kernels use the same ratios).
EXACT_RATIO = {torch.float32: 2.0**-6, torch.float64: 2.0**-35}


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- torch backend: the Triton kernels' algorithm in vectorized PyTorch, differentiated by autograd ---------------
# Rows are [*, R, D] batches: * = B for pooled inputs, * = (B, L) for pool "none" (one distance per token). Autograd
# keeps only [B, R, D]-sized tensors (pooled rows, unit rows, norms; max-pool indices) and [*, M, N] statistics.
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


def _torch_distance(x: torch.Tensor, y: torch.Tensor, kernel: str, pool: str, sigma: float) -> torch.Tensor:
    acc = _acc_dtype(x.dtype)
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
    k, i, j = (flagged[:, 0], flagged[:, 1], flagged[:, 2]) if sq.dim() == 3 else (None, None, None)
    if sq.dim() == 4:  # pool "none": rows are [B, L, M|N, D]
        lead = sq.shape[1]
        k = flagged[:, 0] * lead + flagged[:, 1]
        i, j = flagged[:, 2], flagged[:, 3]
    diff = a.reshape(-1, M, D)[k, i] - c.reshape(-1, N, D)[k, j]
    exact = (diff * diff).sum(-1)
    return sq.reshape(-1, M, N).index_put((k, i, j), exact).reshape(sq.shape)


class _TritonPairwiseDistance(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, kernel, pool, sigma):
        from silmm_fast.kernels import pairwise_distance as kern

        out, g, na, nc = kern.pairwise_distance_fwd(x, y, kernel, pool, sigma)
        ctx.save_for_backward(x, y, g, na, nc)
        ctx.config = (kernel, pool, sigma)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from silmm_fast.kernels import pairwise_distance as kern

        x, y, g, na, nc = ctx.saved_tensors
        kernel, pool, sigma = ctx.config
        gx, gy = kern.pairwise_distance_bwd(
            grad_out, x, y, g, na, nc, kernel, pool, sigma, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        )
        return gx, gy, None, None, None


def _check(x: object, y: object, kernel: object, pool: object, sigma: object) -> float:
    x = check_float("x", x)
    y = check_float("y", y)
    check_ndim("x", x, 4, "[B, M, L, D]")
    check_ndim("y", y, 4, "[B, N, L, D]")
    if y.dtype != x.dtype:
        raise TypeError(f"y: expected dtype {x.dtype} (same as x), got {y.dtype}")
    if y.shape[0] != x.shape[0] or y.shape[2:] != x.shape[2:]:
        raise ValueError(
            f"y: expected shape [B, N, L, D] = [{x.shape[0]}, N, {x.shape[2]}, {x.shape[3]}] to match x "
            f"{tuple(x.shape)}, got {tuple(y.shape)}"
        )
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"x: expected at least one token (L) and one feature (D), got shape {tuple(x.shape)}")
    check_same_device(x=x, y=y)
    check_choice("kernel", kernel, KERNELS)
    check_choice("pool", pool, POOLS)
    return check_positive("sigma", sigma)


def pairwise_distance(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    kernel: str = "cosine",
    pool: str = "mean",
    sigma: float = 1.0,
) -> torch.Tensor:
    """Kernel-induced distance between every pair of feature matrices x[b, m] and y[b, n] of a batch: [B, M, N].

    Equivalent to (``a``, ``c`` the feature matrices pooled over their L tokens)::

        a = x.mean(2) | x.amax(2);  c = y.mean(2) | y.amax(2)            # pool "mean" | "max"
        cosine:      1 − a·c / (max(‖a‖, 1e-8)·max(‖c‖, 1e-8))
        euclidean:   ‖a − c‖
        sqeuclidean: ‖a − c‖²
        rbf:         2 − 2·exp(−‖a − c‖² / (2σ²))                          # the RBF kernel-induced distance
        pool "none": the distance of each token pair x[b, m, l], y[b, n, l], averaged over the L tokens

    Args:
        x: [B, M, L, D] floating (fp16, bf16, fp32, fp64). y: [B, N, L, D], same dtype and device.
        kernel: ``"cosine"`` | ``"euclidean"`` | ``"sqeuclidean"`` | ``"rbf"``.
        pool: ``"mean"`` | ``"max"`` | ``"none"``.
        sigma: > 0, the RBF bandwidth (checked for every kernel, used by ``"rbf"`` only).

    Returns:
        [B, M, N], float32 (float64 for float64 inputs), differentiable in x and y (gradients in their dtypes).

    Precision and gradients: the fast paths use the Gram expansion ‖a‖² + ‖c‖² − 2a·c (clamped at 0) accumulated
    in fp32 (fp64), whose absolute error is about ε·(‖a‖² + ‖c‖²). For ``"euclidean"``, ``"sqeuclidean"`` and
    ``"rbf"`` every pair whose squared distance is below ``EXACT_RATIO`` (2^17·ε) times ‖a‖² + ‖c‖² (near-coincident
    points far from the origin) is recomputed from its difference a − c, values and gradients, so the relative
    error stays near 2^-17 (fp32) everywhere; the reference always uses differences. ``"cosine"`` keeps the
    expansion: its error is ~ε absolute on a distance in [0, 2], whatever the norms. Conventions: ``"euclidean"``
    has gradient 0 where the distance is exactly 0; ``"cosine"`` clamps norms at 1e-8 (a zero vector is at distance
    1 from everything and a norm below 1e-8 passes no gradient through the norm); ``"max"`` routes the gradient to
    the first maximal token.
    NaN / Inf inputs are not checked (that would cost a host sync on CUDA); a NaN feature makes every distance of
    its matrix NaN, also under max pooling.

    Memory: the Triton path keeps only [B, M, N, L'] statistics for backward (L' = L for pool ``"none"``, else 1),
    the torch path pooled [B, M|N, D] rows plus one D-row per recomputed pair; neither forms the [B, M, N, D]
    differences the reference does.

    Raises:
        TypeError: non-tensor or non-floating input, x and y of different dtypes. ValueError: wrong ranks,
        mismatched B / L / D, different devices, empty L or D, unknown ``kernel`` / ``pool``, ``sigma`` not a
        finite number > 0.
    """
    sigma = _check(x, y, kernel, pool, sigma)
    backend = _backend.choose("pairwise_distance", x.device)
    if backend == "reference":
        return _reference.pairwise_distance(x, y, kernel=kernel, pool=pool, sigma=sigma)
    if backend == "triton" and x.shape[0] * x.shape[1] * y.shape[1] == 0:
        backend = "torch"  # nothing to launch for an empty batch; the torch path returns the empty result
    if backend == "triton":
        return _TritonPairwiseDistance.apply(x, y, kernel, pool, sigma)
    return _torch_distance(x, y, kernel, pool, sigma)
