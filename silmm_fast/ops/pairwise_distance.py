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


# --- torch backend: the Triton kernels' algorithm in vectorized PyTorch, with the same gradient conventions --------
# Rows are handled as [*, R, D] batches: * = B for pooled inputs, * = (B, L) for pool "none" (one distance per token).
def _pool(t: torch.Tensor, pool: str, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[B, R, L, D] -> rows in ``acc``: pooled [B, R, D] or per token [B, L, R, D]; for "max" over L > 1 tokens also
    the first argmax token per feature (kept for backward: [B, R, D] indices, 1/L of the input)."""
    if pool == "none":
        return t.transpose(1, 2).to(acc), None
    if t.shape[2] == 1:
        return t[:, :, 0].to(acc), None
    if pool == "mean":
        return t.mean(dim=2, dtype=acc), None
    values, index = t.max(dim=2)  # the first maximal token on ties
    return values.to(acc), index


def _forward_stats(a: torch.Tensor, c: torch.Tensor, kernel: str, sigma: float):
    """Distances [*, M, N], the rows backward multiplies (cosine: the unit rows â, ĉ; else a, c) and the statistics
    it needs: (cos, ‖a‖ clamped, ‖c‖ clamped) [*, M, N], [*, M, 1], [*, N, 1] for cosine, else (sq,)."""
    if kernel == "cosine":
        ra = torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp_min_(COSINE_EPS)
        rc = torch.linalg.vector_norm(c, dim=-1, keepdim=True).clamp_min_(COSINE_EPS)
        a_hat, c_hat = a / ra, c / rc
        cos = torch.bmm(a_hat, c_hat.transpose(1, 2)) if a.dim() == 3 else torch.matmul(a_hat, c_hat.transpose(-1, -2))
        return 1.0 - cos, a_hat, c_hat, (cos, ra, rc)
    na, nc = (a * a).sum(-1), (c * c).sum(-1)
    # ‖a‖² + ‖c‖² − 2a·c in one batched matmul; the expansion can round slightly below zero
    sq = (
        torch.baddbmm(na.unsqueeze(-1) + nc.unsqueeze(-2), a, c.transpose(-1, -2), alpha=-2.0)
        if a.dim() == 3
        else (na.unsqueeze(-1) + nc.unsqueeze(-2) - 2.0 * torch.matmul(a, c.transpose(-1, -2)))
    )
    sq = sq.clamp_min_(0.0)
    if kernel == "euclidean":
        dist = sq.sqrt()
    elif kernel == "sqeuclidean":
        dist = sq
    else:
        dist = 2.0 - 2.0 * torch.exp(-sq / (2.0 * sigma**2))
    return dist, a, c, (sq,)


def _coefficients(sq: torch.Tensor, kernel: str, sigma: float) -> torch.Tensor:
    """P = ∂f/∂‖a‖² for the distances of sq = ‖a − c‖² (Q = ∂f/∂(a·c) = −2P)."""
    if kernel == "euclidean":
        positive = sq > 0
        p = torch.where(positive, 0.5 * torch.where(positive, sq, 1.0).rsqrt(), 0.0)  # gradient 0 at distance 0
    elif kernel == "sqeuclidean":
        p = torch.ones_like(sq)
    else:
        inv = 1.0 / (2.0 * sigma**2)
        p = (2.0 * inv) * torch.exp(-sq * inv)
    return p


def _grad_rows(go, rows, cols, stats, kernel, sigma):
    """∂/∂rows_i of Σ go·distance = Σ_j go_ij·(2·P_ij·rows_i + Q_ij·cols_j); go, stats oriented rows × cols."""
    if kernel == "cosine":
        # with P = cos/(2·ra²), Q = −1/(ra·rc): (Σ_j go_ij·cos_ij·â_i − Σ_j go_ij·ĉ_j) / ra_i, and no gradient through
        # a norm clamped at eps; rows, cols are the unit rows here
        cos, ra = stats
        coef = torch.where(ra > COSINE_EPS, (go * cos).sum(-1, keepdim=True), 0.0)
        return (coef * rows - torch.matmul(go, cols)) / ra
    (sq,) = stats
    wp = go * _coefficients(sq, kernel, sigma)
    return 2.0 * (wp.sum(-1, keepdim=True) * rows - torch.matmul(wp, cols))  # Q = −2P


def _route(grad: torch.Tensor, meta: tuple, pool: str, index: torch.Tensor | None) -> torch.Tensor:
    """Gradient of the pooling, back to the [B, R, L, D] input given as (shape, dtype)."""
    shape, dtype = meta
    if pool == "none":
        return grad.transpose(1, 2).to(dtype)
    if pool == "mean" or index is None:  # index is None for max over a single token
        return (grad / shape[2]).to(dtype).unsqueeze(2).expand(shape)
    out = torch.zeros(shape, dtype=dtype, device=grad.device)
    return out.scatter_(2, index.unsqueeze(2), grad.to(dtype).unsqueeze(2))


def _torch_forward(x, y, kernel, pool, sigma):
    acc = _acc_dtype(x.dtype)
    (a, ia), (c, ic) = _pool(x, pool, acc), _pool(y, pool, acc)
    dist, a, c, stats = _forward_stats(a, c, kernel, sigma)
    out = dist.mean(1) if pool == "none" else dist
    return out, (a, c, ia, ic, *stats)


class _TorchPairwiseDistance(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, kernel, pool, sigma):
        out, saved = _torch_forward(x, y, kernel, pool, sigma)
        # pooled rows ([B, R, D]; pool "none": the inputs) and [*, M, N] statistics, never a [B, M, N, D] tensor
        ctx.save_for_backward(*saved)
        ctx.config = (kernel, pool, sigma, (x.shape, x.dtype), (y.shape, y.dtype))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        a, c, ia, ic, *stats = ctx.saved_tensors
        kernel, pool, sigma, x_meta, y_meta = ctx.config
        go = grad_out.to(a.dtype)
        if pool == "none":  # each token's distance enters the output with weight 1/L
            go = (go / a.shape[1]).unsqueeze(1)
        gx = gy = None
        if kernel == "cosine":
            cos, ra, rc = stats
            stats_x, stats_y = (cos, ra), (cos.transpose(-1, -2), rc)
        else:
            stats_x, stats_y = tuple(stats), (stats[0].transpose(-1, -2),)
        if ctx.needs_input_grad[0]:
            gx = _route(_grad_rows(go, a, c, stats_x, kernel, sigma), x_meta, pool, ia)
        if ctx.needs_input_grad[1]:
            gy = _route(_grad_rows(go.transpose(-1, -2), c, a, stats_y, kernel, sigma), y_meta, pool, ic)
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
    if backend == "triton":
        return _TritonPairwiseDistance.apply(x, y, kernel, pool, sigma)
    if torch.is_grad_enabled() and (x.requires_grad or y.requires_grad):
        return _TorchPairwiseDistance.apply(x, y, kernel, pool, sigma)
    return _torch_forward(x, y, kernel, pool, sigma)[0]  # inference: nothing to save
