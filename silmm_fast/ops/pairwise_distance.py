"""``pairwise_distance``: kernel-induced distances between pooled feature matrices, with the backend decision.

Backends (``silmm_fast._backend.choose("pairwise_distance", device)``):
- ``triton``: the fused kernels in ``silmm_fast.kernels.pairwise_distance`` (pool while loading, Gram through
  ``tl.dot``, distance epilogue; hand-written backward that re-reads the inputs once).
- ``torch``: the same algorithm in vectorized PyTorch (the CPU path): pool once, one batched matmul for the Gram,
  a closed-form backward; it keeps only the [B, M, N, L'] statistics, never a [B, M, N, D] difference tensor.
- ``reference``: ``silmm_fast.reference.pairwise_distance`` (explicit differences, plain autograd).
"""

from __future__ import annotations

import torch

from silmm_fast import _backend
from silmm_fast._validate import check_choice, check_float, check_ndim, check_positive, check_same_device
from silmm_fast.reference import pairwise_distance as _reference

KERNELS = ("cosine", "euclidean", "sqeuclidean", "rbf")
POOLS = ("mean", "max", "none")
COSINE_EPS = _reference.COSINE_EPS


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- torch backend: same statistics and closed-form gradients as the Triton kernels ------------------------------
def _pool(t: torch.Tensor, pool: str, acc: torch.dtype) -> torch.Tensor:
    if pool == "mean":
        return t.mean(dim=2, dtype=acc)
    if pool == "max":
        return t.amax(dim=2).to(acc)
    return t.to(acc)


def _stats(a: torch.Tensor, c: torch.Tensor, pool: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gram [B, M, N, L'], ‖a‖² [B, M, L'], ‖c‖² [B, N, L'] from pooled [B, M, D] / [B, N, D] or per-token inputs."""
    if pool == "none":
        g = torch.matmul(a.transpose(1, 2), c.permute(0, 2, 3, 1)).permute(0, 2, 3, 1)  # [B, L, M, N] -> [B, M, N, L]
        return g, a.pow(2).sum(-1), c.pow(2).sum(-1)
    g = torch.bmm(a, c.transpose(1, 2)).unsqueeze(-1)
    return g, a.pow(2).sum(-1, keepdim=True), c.pow(2).sum(-1, keepdim=True)


def _distance(g: torch.Tensor, na: torch.Tensor, nc: torch.Tensor, kernel: str, sigma: float) -> torch.Tensor:
    # g [B, M, N, L'], na [B, M, 1, L'], nc [B, 1, N, L']
    if kernel == "cosine":
        return 1.0 - g / (na.sqrt().clamp_min(COSINE_EPS) * nc.sqrt().clamp_min(COSINE_EPS))
    sq = (na + nc - 2.0 * g).clamp_min(0.0)  # the matmul expansion can round slightly below zero
    if kernel == "euclidean":
        return sq.sqrt()
    if kernel == "sqeuclidean":
        return sq
    return 2.0 - 2.0 * torch.exp(-sq / (2.0 * sigma**2))


def _coefficients(
    g: torch.Tensor, na: torch.Tensor, nc: torch.Tensor, kernel: str, sigma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """P = ∂f/∂‖a‖² and Q = ∂f/∂g (broadcast to [B, M, N, L']); the conventions of the module docstring of
    ``silmm_fast.kernels.pairwise_distance``."""
    if kernel == "cosine":
        norm_a = na.sqrt()
        ra, rc = norm_a.clamp_min(COSINE_EPS), nc.sqrt().clamp_min(COSINE_EPS)
        q = -1.0 / (ra * rc)
        p = torch.where(norm_a > COSINE_EPS, g / (2.0 * ra.pow(3) * rc), 0.0)
        return p, q
    sq = (na + nc - 2.0 * g).clamp_min(0.0)
    if kernel == "euclidean":
        d = sq.sqrt()
        p = torch.where(d > 0, 0.5 / torch.where(d > 0, d, 1.0), 0.0)
    elif kernel == "sqeuclidean":
        p = torch.ones_like(sq)
    else:
        inv = 1.0 / (2.0 * sigma**2)
        p = 2.0 * inv * torch.exp(-sq * inv)
    return p, -2.0 * p


def _route(grad_pooled: torch.Tensor, t: torch.Tensor, pool: str) -> torch.Tensor:
    """Gradient of the pooling: [B, R, D] (or per token [B, R, L, D]) back to t [B, R, L, D] in t's dtype."""
    if pool == "none":
        return grad_pooled.to(t.dtype)
    if pool == "mean":
        return (grad_pooled / t.shape[2]).to(t.dtype).unsqueeze(2).expand(t.shape)
    index = t.argmax(dim=2, keepdim=True)  # recomputed, not stored; the first maximal token on ties
    return torch.zeros_like(t).scatter_(2, index, grad_pooled.to(t.dtype).unsqueeze(2))


def _grad_rows(go, g, n_rows, n_cols, rows_pooled, cols_pooled, kernel, sigma, pool):
    # go [B, R, C], g [B, R, C, L'], n_rows [B, R, 1, L'], n_cols [B, 1, C, L']
    p, q = _coefficients(g, n_rows, n_cols, kernel, sigma)
    go = go.unsqueeze(-1) / g.shape[-1]  # pool "none" averages the L' per-token distances
    rowcoef = (go * p).sum(2)  # [B, R, L']
    w = go * q
    if pool == "none":  # rows_pooled [B, R, L, D]
        matrix = torch.matmul(w.permute(0, 3, 1, 2), cols_pooled.transpose(1, 2)).transpose(1, 2)
        return 2.0 * rowcoef.unsqueeze(-1) * rows_pooled + matrix
    return 2.0 * rowcoef * rows_pooled + torch.bmm(w.squeeze(-1), cols_pooled)


class _TorchPairwiseDistance(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, kernel, pool, sigma):
        acc = _acc_dtype(x.dtype)
        g, na, nc = _stats(_pool(x, pool, acc), _pool(y, pool, acc), pool)
        out = _distance(g, na.unsqueeze(2), nc.unsqueeze(1), kernel, sigma).mean(-1)
        ctx.save_for_backward(x, y, g, na, nc)
        ctx.config = (kernel, pool, sigma)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, y, g, na, nc = ctx.saved_tensors
        kernel, pool, sigma = ctx.config
        acc = g.dtype
        a, c = _pool(x, pool, acc), _pool(y, pool, acc)
        go = grad_out.to(acc)
        gx = gy = None
        if ctx.needs_input_grad[0]:
            gx = _route(_grad_rows(go, g, na.unsqueeze(2), nc.unsqueeze(1), a, c, kernel, sigma, pool), x, pool)
        if ctx.needs_input_grad[1]:
            gt = g.transpose(1, 2)
            gy = _route(
                _grad_rows(go.transpose(1, 2), gt, nc.unsqueeze(2), na.unsqueeze(1), c, a, kernel, sigma, pool), y, pool
            )
        return gx, gy, None, None, None


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
    in fp32 (fp64), so near-coincident points carry an absolute error of about ε·(‖a‖² + ‖c‖²) in the squared
    distance (its square root for ``"euclidean"``). Conventions: ``"euclidean"`` has gradient 0 where the distance
    is exactly 0; ``"cosine"`` clamps norms at 1e-8 (a zero vector is at distance 1 from everything and a norm below
    1e-8 passes no gradient through the norm); ``"max"`` routes the gradient to the first maximal token.
    Memory: the fast paths keep only [B, M, N, L'] statistics (L' = L for pool ``"none"``, else 1).

    Raises:
        TypeError: non-tensor or non-floating input, x and y of different dtypes. ValueError: wrong ranks,
        mismatched B / L / D, different devices, empty L or D, unknown ``kernel`` / ``pool``, ``sigma`` ≤ 0.
    """
    sigma = _check(x, y, kernel, pool, sigma)
    backend = _backend.choose("pairwise_distance", x.device)
    if backend == "reference":
        return _reference.pairwise_distance(x, y, kernel=kernel, pool=pool, sigma=sigma)
    if backend == "triton" and x.shape[0] * x.shape[1] * y.shape[1] == 0:
        backend = "torch"  # nothing to launch for an empty batch; the torch path returns the empty result
    fn = _TritonPairwiseDistance if backend == "triton" else _TorchPairwiseDistance
    return fn.apply(x, y, kernel, pool, sigma)
