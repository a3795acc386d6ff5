"""Reference pairwise distances between feature matrices, written for reading: explicit differences like
``torch.cdist`` with small inputs, plain autograd. Materializes [B, M, N, D] (pool "none": [B, M, N, L, D])."""

from __future__ import annotations

import torch

COSINE_EPS = 1e-8  # norms are clamped at this before dividing (the convention of F.cosine_similarity)


def _safe_sqrt(sq: torch.Tensor) -> torch.Tensor:
    # sqrt with gradient 0 (not NaN) where the distance is exactly 0; a NaN stays NaN
    zero = sq == 0
    return torch.where(zero, 0.0, torch.where(zero, 1.0, sq).sqrt())


def pairwise_distance(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    kernel: str = "cosine",
    pool: str = "mean",
    sigma: float = 1.0,
) -> torch.Tensor:
    """Distance between every x[b, m] and y[b, n] feature matrix, pooled over the L tokens: [B, M, N].

    x: [B, M, L, D], y: [B, N, L, D], floating. Computes in float32 (float64 for float64 inputs) and returns that.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, y = x.to(acc), y.to(acc)
    if pool == "mean":
        a, c = x.mean(dim=2), y.mean(dim=2)  # [B, M, D], [B, N, D]
    elif pool == "max":
        a, c = x.max(dim=2).values, y.max(dim=2).values
    elif pool == "none":
        a, c = x, y  # [B, M, L, D]: one distance per token, averaged below
    else:
        raise ValueError(f"pool: expected one of ('mean', 'max', 'none'), got {pool!r}")
    a = a.unsqueeze(2)  # [B, M, 1, (L,) D]
    c = c.unsqueeze(1)  # [B, 1, N, (L,) D]

    if kernel == "cosine":
        dot = (a * c).sum(-1)
        norms = a.norm(dim=-1).clamp_min(COSINE_EPS) * c.norm(dim=-1).clamp_min(COSINE_EPS)
        dist = 1.0 - dot / norms
    else:
        sq = (a - c).pow(2).sum(-1)
        if kernel == "sqeuclidean":
            dist = sq
        elif kernel == "euclidean":
            dist = _safe_sqrt(sq)
        elif kernel == "rbf":
            dist = 2.0 - 2.0 * torch.exp(-sq / (2.0 * sigma**2))
        else:
            raise ValueError(f"kernel: expected one of ('cosine', 'euclidean', 'sqeuclidean', 'rbf'), got {kernel!r}")
    if pool == "none":
        dist = dist.mean(-1)
    return dist
