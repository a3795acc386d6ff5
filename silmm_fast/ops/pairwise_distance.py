"""``pairwise_distance``: kernel-induced distances between pooled feature matrices, with the backend decision.

Backends (``silmm_fast._backend.choose("pairwise_distance", device)``):
- ``triton``: the fused kernels in ``silmm_fast.kernels.pairwise_distance``, one launch forward and one backward
  (pool while loading, Gram through ``tl.dot``, distance epilogue and exact pairs in the same program; a
  hand-written backward that re-reads the inputs once for both gradients).
- ``torch``: ``silmm_fast.ops.torch_backend.pairwise_distance``, the same algorithm in vectorized PyTorch (the CPU
  path), differentiated by autograd.
- ``reference``: ``silmm_fast.reference.pairwise_distance`` (explicit differences, plain autograd).
"""

from __future__ import annotations

import torch

from silmm_fast import _backend
from silmm_fast._validate import check_choice, check_float, check_ndim, check_positive, check_same_device
from silmm_fast.ops.torch_backend import pairwise_distance as _torch_backend
from silmm_fast.ops.torch_backend.pairwise_distance import EXACT_RATIO
from silmm_fast.reference import pairwise_distance as _reference

KERNELS = ("cosine", "euclidean", "sqeuclidean", "rbf")
POOLS = ("mean", "max", "none")
COSINE_EPS = _reference.COSINE_EPS
__all__ = ["COSINE_EPS", "EXACT_RATIO", "KERNELS", "POOLS", "pairwise_distance"]


class _TritonPairwiseDistance(torch.autograd.Function):
    """One kernel launch forward, one backward (both gradients); ``tiles`` None picks the device's defaults."""

    @staticmethod
    def forward(ctx, x, y, kernel, pool, sigma, tiles=None):
        from silmm_fast.kernels import pairwise_distance as kern

        tiles = tiles or kern.default_tiles(x, y)
        out, stat, na, nc = kern.pairwise_distance_fwd(x, y, kernel, pool, sigma, tiles)
        ctx.save_for_backward(x, y, stat, na, nc)
        ctx.config = (kernel, pool, sigma, tiles)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from silmm_fast.kernels import pairwise_distance as kern

        x, y, stat, na, nc = ctx.saved_tensors
        kernel, pool, sigma, tiles = ctx.config
        gx, gy = kern.pairwise_distance_bwd(
            grad_out,
            x,
            y,
            stat,
            na,
            nc,
            kernel,
            pool,
            sigma,
            tiles,
            needs_x=ctx.needs_input_grad[0],
            needs_y=ctx.needs_input_grad[1],
        )
        return gx, gy, None, None, None, None


def distances(x: torch.Tensor, y: torch.Tensor, kernel: str, pool: str, sigma: float) -> torch.Tensor:
    """The backend decision and the call, for arguments already checked (``pairwise_distance`` and ``kc_dpo_loss``
    check theirs once, at their own boundary)."""
    backend = _backend.choose("pairwise_distance", x.device)
    if backend == "reference":
        return _reference.pairwise_distance(x, y, kernel=kernel, pool=pool, sigma=sigma)
    if backend == "triton" and x.shape[0] * x.shape[1] * y.shape[1] > 0:
        return _TritonPairwiseDistance.apply(x, y, kernel, pool, sigma)
    return _torch_backend.pairwise_distance(x, y, kernel, pool, sigma)  # also an empty batch: nothing to launch


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
    return distances(x, y, kernel, pool, _check(x, y, kernel, pool, sigma))
