"""Reference diverse selection: cosine similarity of pooled features, then farthest-point sampling or greedy k-DPP MAP.

Readable over fast, batched over prompts, with the exact rules the C++ extension (``csrc/diverse_select``) follows, so
both pick the same indices. All selection arithmetic is float64 and written in the same order as the C++ loops:

- similarity ``S`` (computed once, shared with the fast path): features ``[B, K, L, D]`` are mean-pooled over ``L``
  (``[B, K, D]`` used as is), ``G = X·Xᵀ`` (one batched matmul), ``S_ij = G_ij / (‖x_i‖·‖x_j‖)`` with the norms read
  off ``diag(G)``, clamped to [-1, 1], ``S_ii = 1`` exactly (``0`` for an all-zero candidate, whose row is all 0).
  ``S`` is a Gram matrix of unit vectors, hence positive semi-definite, as the DPP needs.
- FPS (max-min cosine distance, optionally quality weighted): before any pick a candidate's distance is
  ``1 − mean_j S_ij`` (its distance from the candidate set as a whole, so the first pick is the most atypical
  candidate); after picks it is ``min over picked j of (1 − S_ij)``. Each step picks the unpicked candidate with the
  largest ``q_i · dist_i`` (``q = 1`` without quality), the lowest index on ties.
- DPP (Chen, Zhang & Zhou 2018, greedy MAP with incremental Cholesky): kernel ``L_ij = (q_i·S_ij)·q_j``; each step
  picks the unpicked candidate with the largest residual gain ``d_i²`` (the first pick: the largest ``L_ii``, index 0
  when all are equal), the lowest index on ties. When the largest remaining gain is ``≤ eps · max_i L_ii`` (every
  remaining candidate is already spanned by the picks: duplicates, or more picks than the feature rank) the DPP stops
  and the remaining picks continue by the FPS rule above from the picks made so far.
"""

from __future__ import annotations

import torch

METHODS = ("dpp", "fps")
# DPP stop threshold, relative to the largest diagonal entry of L, by the dtype of S. A residual gain below it is
# within rounding noise of S (float32 cosines of wide features carry ~1e-6 relative error), i.e. a duplicate.
DPP_EPS = {torch.float32: 1e-5, torch.float64: 1e-10}


def pooled_features(features: torch.Tensor) -> torch.Tensor:
    """``[B, K, L, D]`` → mean over ``L``; ``[B, K, D]`` as is. float16 / bfloat16 are computed in float32."""
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    if features.dim() == 4:
        return features.mean(dim=2, dtype=dtype)
    return features.to(dtype)


def cosine_similarity_and_sq_norms(pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, K, D]`` → (``[B, K, K]`` cosine similarities by the rules in the module docstring, ``[B, K]`` squared
    norms ``diag(G)``), dtype of ``pooled``. A NaN / Inf feature makes its squared norm non-finite (callers check it:
    B·K values instead of B·K·D)."""
    gram = torch.bmm(pooled, pooled.transpose(1, 2))
    sq_norms = gram.diagonal(dim1=1, dim2=2).clone()
    nonzero = sq_norms > 0
    inv_norm = torch.where(nonzero, sq_norms.clamp_min(torch.finfo(gram.dtype).tiny).rsqrt(), 0.0)
    sim = (gram * inv_norm[:, :, None] * inv_norm[:, None, :]).clamp_(-1.0, 1.0)
    sim.diagonal(dim1=1, dim2=2).copy_(nonzero.to(sim.dtype))
    return sim, sq_norms


def cosine_similarity_matrix(pooled: torch.Tensor) -> torch.Tensor:
    """``[B, K, D]`` → ``[B, K, K]`` cosine similarities (the rules in the module docstring), dtype of ``pooled``."""
    return cosine_similarity_and_sq_norms(pooled)[0]


def _row_means(sim: torch.Tensor) -> torch.Tensor:
    # sequential sum over j (the C++ loop order), so both paths round identically
    acc = torch.zeros(sim.shape[:2], dtype=torch.float64, device=sim.device)
    for j in range(sim.shape[2]):
        acc = acc + sim[:, :, j]
    return acc / sim.shape[2]


def _argmax_unpicked(score: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
    # torch.argmax returns the first maximal index: ties go to the lowest index
    return score.masked_fill(picked, float("-inf")).argmax(dim=1)


def select_from_similarity(
    similarity: torch.Tensor, n: int, method: str, quality: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """Greedy selection of ``n`` of ``K`` candidates per prompt from a ``[B, K, K]`` similarity.

    Equivalent to ``torch.ops.silmm_fast.diverse_select(similarity, quality, n, method, eps)`` (the C++ op).
    Returns ``[B, n]`` int64 indices in pick order.
    """
    B, K, _ = similarity.shape
    dev = similarity.device
    S = similarity.double()
    q = torch.ones(B, K, dtype=torch.float64, device=dev) if quality is None else quality.double()
    rows = torch.arange(B, device=dev)
    picked = torch.zeros(B, K, dtype=torch.bool, device=dev)
    out = torch.empty(B, n, dtype=torch.long, device=dev)
    dist = 1.0 - _row_means(S)  # FPS state: distance from the picks (from the whole set before any pick)

    if method == "dpp":
        Lk = (q[:, :, None] * S) * q[:, None, :]
        d2 = Lk.diagonal(dim1=1, dim2=2).clone()
        tol = eps * d2.max(dim=1).values
        chol = torch.zeros(B, n, K, dtype=torch.float64, device=dev)
        in_dpp = torch.ones(B, dtype=torch.bool, device=dev)

    for k in range(n):
        fps_pick = _argmax_unpicked(q * dist, picked)
        if method == "dpp":
            dpp_pick = _argmax_unpicked(d2, picked)
            gain = d2[rows, dpp_pick]
            in_dpp = in_dpp & (gain > tol)
            j = torch.where(in_dpp, dpp_pick, fps_pick)
            if k + 1 < n:
                # incremental Cholesky: e_i = (L_ji − <c_j, c_i>) / d_j, then d_i² −= e_i²
                d_j = torch.where(in_dpp, gain, 1.0).sqrt()
                acc = Lk[rows, j, :]
                for t in range(k):
                    acc = acc - chol[rows, t, j][:, None] * chol[:, t, :]
                e = acc / d_j[:, None]
                chol[:, k, :] = e
                d2 = d2 - e * e
        else:
            j = fps_pick
        out[:, k] = j
        picked[rows, j] = True
        to_pick = 1.0 - S[rows, :, j]
        dist = to_pick if k == 0 else torch.minimum(dist, to_pick)
    return out


def diverse_select(
    features: torch.Tensor, n: int, *, method: str = "dpp", quality: torch.Tensor | None = None
) -> torch.Tensor:
    """Pick ``n`` diverse candidates of ``K`` per prompt (reference implementation, no input checks).

    Equivalent to the rules in this module's docstring. Args: features ``[B, K, L, D]`` or ``[B, K, D]`` float;
    quality ``[B, K]`` non-negative or None. Returns ``[B, n]`` int64 indices in pick order.
    """
    sim = cosine_similarity_matrix(pooled_features(features))
    return select_from_similarity(sim, n, method, quality, DPP_EPS[sim.dtype])
