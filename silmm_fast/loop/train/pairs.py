"""From answers to preference pairs: per-image scores and top-k × bottom-k pairs per prompt."""

from __future__ import annotations

import torch


def aggregate_scores(p_yes: torch.Tensor, p_no: torch.Tensor, owner: torch.Tensor, n_images: int) -> torch.Tensor:
    """Score of each image: the mean over its questions of p(yes) − p(no), in [−1, 1].

    p_yes, p_no: [Q] per (image, question); owner: [Q] long, the image each question is about; returns [n_images]
    float32. An image with no question scores 0.
    """
    if not (p_yes.shape == p_no.shape == owner.shape) or p_yes.dim() != 1:
        raise ValueError(
            f"p_yes, p_no, owner: expected equal 1-d shapes, got {p_yes.shape}, {p_no.shape}, {owner.shape}"
        )
    diff = p_yes.float() - p_no.float()
    total = torch.zeros(n_images, dtype=torch.float32).index_add_(0, owner, diff)
    count = torch.zeros(n_images, dtype=torch.float32).index_add_(0, owner, torch.ones_like(diff))
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))


def make_pairs(scores: torch.Tensor, k: int, min_margin: float = 0.0) -> list[tuple[int, int, int, float]]:
    """Top-k winners × bottom-k losers per prompt, keeping pairs whose score gap is at least ``min_margin``.

    scores: [P, N]; returns (prompt, winner, loser, gap) tuples, prompts in order, winners best first, losers worst
    first. Ties are broken by the lower candidate index (stable sort), so the result is deterministic.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores: expected [P, N], got {tuple(scores.shape)}")
    n = scores.shape[1]
    if k < 1 or 2 * k > n:
        raise ValueError(f"k: expected an integer in [1, N/2 = {n // 2}], got {k}")
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    worst_first = torch.sort(scores, dim=1, descending=False, stable=True).indices
    pairs = []
    for p in range(scores.shape[0]):
        for w in order[p, :k].tolist():
            for lo in worst_first[p, :k].tolist():
                gap = float(scores[p, w] - scores[p, lo])
                if w != lo and gap >= min_margin and gap > 0:
                    pairs.append((p, w, lo, gap))
    return pairs
