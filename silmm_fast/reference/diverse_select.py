"""Reference diverse selection: cosine similarity of pooled features, then farthest-point sampling or greedy k-DPP MAP.

Readable over fast, batched over prompts, with the exact rules the C++ extension (``csrc/diverse_select``) follows, so
both pick the same indices. The selection arithmetic is float64, uses only +, −, ×, ÷ and comparisons (IEEE-exact in
PyTorch and C++ alike; PyTorch's vectorized sqrt may differ from C's in the last bit, so none is taken here) and runs
in the same order as the C++ loops:

- Gram ``G = X·Xᵀ`` (one batched matmul in the features' precision, shared with the fast path): features
  ``[B, K, L, D]`` are mean-pooled over ``L`` (``[B, K, D]`` used as is). Scale ``c_i = 1/‖x_i‖`` (``rsqrt`` of
  ``G_ii`` in float64; 0 for an all-zero candidate), computed once and passed to both paths.
- cosine similarity, float64: ``S_ij = clamp((G_ij·c_i)·c_j, −1, 1)`` and ``S_ii = 1`` exactly (``0`` for an all-zero
  candidate, whose row is all 0). ``S`` is a Gram matrix of unit vectors, hence positive semi-definite, as the DPP
  needs.
- FPS (max-min cosine distance, optionally quality weighted): before any pick a candidate's distance is
  ``1 − mean_j S_ij`` (its distance from the candidate set as a whole, so the first pick is the most atypical
  candidate); after picks it is ``min over picked j of (1 − S_ij)``. Each step picks the unpicked candidate with the
  largest ``q_i · dist_i`` (``q = 1`` without quality), the lowest index on ties. On CPU, ``fps_from_features``
  computes the same rule without a Gram matrix (only the columns of the picks, inner products in the features'
  precision; the C++ ``diverse_select_fps`` repeats its operations in its order); on CUDA and after a stopped DPP,
  ``select_from_similarity`` computes it from ``S``.
- DPP (Chen, Zhang & Zhou 2018, greedy MAP): kernel ``L_ij = (q_i·S_ij)·q_j``; each step picks the unpicked candidate
  with the largest residual gain ``d_i²`` (the first pick: the largest ``L_ii``, index 0 when all are equal), the
  lowest index on ties. The incremental factorization is their Cholesky update in square-root-free form: picking
  ``j`` with gain ``g_k = d_j²`` computes ``w_ki = L_ji − Σ_{t<k} (w_tj / g_t)·w_ti`` and ``d_i² −= w_ki·(w_ki / g_k)``
  (their ``e_i`` is ``w_ki / √g_k``). When the largest remaining gain is ``≤ eps · max_i L_ii`` (every remaining
  candidate is already spanned by the picks: duplicates, or more picks than the feature rank) the DPP stops and the
  remaining picks continue by the FPS rule above from the picks made so far.
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


def gram_matrix(pooled: torch.Tensor) -> torch.Tensor:
    """``[B, K, D]`` → ``[B, K, K]`` inner products ``X·Xᵀ`` (one batched matmul), dtype of ``pooled``. A NaN / Inf
    feature makes its diagonal entry non-finite (callers check ``B·K`` values instead of ``B·K·D``)."""
    return torch.bmm(pooled, pooled.transpose(1, 2))


def inverse_norms(gram: torch.Tensor) -> torch.Tensor:
    """``[B, K, K]`` Gram → ``[B, K]`` float64 ``1/‖x_i‖`` (0 for an all-zero candidate)."""
    sq_norms = gram.diagonal(dim1=1, dim2=2).double()
    return torch.where(sq_norms > 0, sq_norms.rsqrt(), 0.0)


def scaled_similarity(gram: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``S_ij = clamp((G_ij·c_i)·c_j, −1, 1)``, ``S_ii = [c_i > 0]``, float64 (cosine for ``c = inverse_norms(G)``)."""
    sim = ((gram.double() * scale[:, :, None]) * scale[:, None, :]).clamp(-1.0, 1.0)
    sim.diagonal(dim1=1, dim2=2).copy_((scale > 0).double())
    return sim


def cosine_similarity_matrix(features: torch.Tensor) -> torch.Tensor:
    """Features ``[B, K, L, D]`` or ``[B, K, D]`` → ``[B, K, K]`` float64 cosine similarities of the pooled features."""
    gram = gram_matrix(pooled_features(features))
    return scaled_similarity(gram, inverse_norms(gram))


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
    similarity: torch.Tensor,
    scale: torch.Tensor | None,
    quality: torch.Tensor | None,
    n: int,
    method: str,
    eps: float,
) -> torch.Tensor:
    """Greedy selection of ``n`` of ``K`` candidates per prompt from a ``[B, K, K]`` similarity, or from a Gram matrix
    with ``scale`` (``[B, K]``; see ``scaled_similarity``).

    Equivalent to ``torch.ops.silmm_fast.diverse_select(similarity, scale, quality, n, method, eps)`` (the C++ op).
    Returns ``[B, n]`` int64 indices in pick order.
    """
    B, K, _ = similarity.shape
    dev = similarity.device
    S = similarity.double() if scale is None else scaled_similarity(similarity, scale.double())
    q = torch.ones(B, K, dtype=torch.float64, device=dev) if quality is None else quality.double()
    rows = torch.arange(B, device=dev)
    picked = torch.zeros(B, K, dtype=torch.bool, device=dev)
    out = torch.empty(B, n, dtype=torch.long, device=dev)
    dist = 1.0 - _row_means(S)  # FPS state: distance from the picks (from the whole set before any pick)

    if method == "dpp":
        Lk = (q[:, :, None] * S) * q[:, None, :]
        d2 = Lk.diagonal(dim1=1, dim2=2).clone()
        tol = eps * d2.max(dim=1).values
        w = torch.zeros(B, n, K, dtype=torch.float64, device=dev)  # factor rows w_t
        gains = torch.ones(B, n, dtype=torch.float64, device=dev)  # g_t
        in_dpp = torch.ones(B, dtype=torch.bool, device=dev)

    for k in range(n):
        fps_pick = _argmax_unpicked(q * dist, picked)
        if method == "dpp":
            dpp_pick = _argmax_unpicked(d2, picked)
            gain = d2[rows, dpp_pick]
            in_dpp = in_dpp & (gain > tol)
            j = torch.where(in_dpp, dpp_pick, fps_pick)
            if k + 1 < n:
                # w_ki = L_ji − Σ_t (w_tj / g_t)·w_ti, then d_i² −= w_ki·(w_ki / g_k); prompts that left the DPP compute
                # values nobody reads (their gain is replaced by 1 to keep them finite)
                g = torch.where(in_dpp, gain, 1.0)
                acc = Lk[rows, j, :]
                for t in range(k):
                    a = w[rows, t, j] / gains[:, t]
                    acc = acc - a[:, None] * w[:, t, :]
                w[:, k, :] = acc
                gains[:, k] = g
                d2 = d2 - acc * (acc / g[:, None])
        else:
            j = fps_pick
        out[:, k] = j
        picked[rows, j] = True
        to_pick = 1.0 - S[rows, :, j]
        dist = to_pick if k == 0 else torch.minimum(dist, to_pick)
    return out


LANES = 16  # partial sums per inner product in the C++ kernel (csrc/diverse_select/diverse_select_cpu.cpp)


def lane_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``⟨a, b⟩`` over the last dim (broadcasting), in the dtype of the inputs and the C++ kernel's order: ``LANES``
    running sums (lane ``l`` takes ``d ≡ l mod LANES``, in ``d`` order), then folded by halves (``s_l += s_{l+w}`` for
    ``w = 8, 4, 2, 1``). Same IEEE operations in the same order, so the same bits."""
    prod = a * b
    D = prod.shape[-1]
    prod = torch.nn.functional.pad(prod, (0, -D % LANES)).unflatten(-1, (-1, LANES))
    s = prod[..., 0, :]
    for chunk in range(1, prod.shape[-2]):
        s = s + prod[..., chunk, :]
    w = LANES // 2
    while w >= 1:
        s = s[..., :w] + s[..., w : 2 * w]
        w //= 2
    return s[..., 0]


def newton_sqrt(v: torch.Tensor) -> torch.Tensor:
    """``√v`` for finite ``v > 0`` (float64) by the C++ kernel's fixed Newton iteration (``NewtonSqrt``): ``v = f·2ᵉ``
    with ``f ∈ [0.5, 2)``, ``e`` even; ``y₀ = (1 + f)/2``, six steps ``y = 0.5·(y + f/y)``; ``y·2^(e/2)``. Only
    +, ×, ÷ and exact scaling, so both give the same bits (torch.sqrt is not always correctly rounded)."""
    f, e = torch.frexp(v)
    odd = (e % 2) == 1
    f = torch.where(odd, f * 2.0, f)
    e = torch.where(odd, e - 1, e)
    y = 0.5 * (1.0 + f)
    for _ in range(6):
        y = 0.5 * (y + f / y)
    return torch.ldexp(y, torch.div(e, 2, rounding_mode="floor"))


def fps_from_features(pooled: torch.Tensor, quality: torch.Tensor | None, n: int) -> torch.Tensor:
    """The ``"fps"`` rule computed from pooled features ``[B, K, D]`` (float32 or float64), forming only the picks'
    columns of the cosine similarity (no ``[B, K, K]`` Gram): ``c_i = 1/newton_sqrt(⟨x_i, x_i⟩)`` (0 for an all-zero
    candidate), distances before the first pick ``1 − c_i·⟨x_i, m⟩ / K`` with ``m = Σ_j c_j x_j`` (which is
    ``1 − mean_j S_ij``), after a pick of ``j`` the running minimum of ``1 − clamp((c_i·c_j)·⟨x_i, x_j⟩, −1, 1)``.
    Inner products and squared norms by ``lane_dot`` and ``m`` (summed in ``j`` order) in the features' dtype, the
    rest in float64: the C++ kernel's operations in its order.

    Equivalent to ``torch.ops.silmm_fast.diverse_select_fps(pooled, quality, n)``. Returns ``[B, n]`` int64 indices in
    pick order.
    """
    x = pooled
    B, K, D = x.shape
    rows = torch.arange(B, device=x.device)
    sq = lane_dot(x, x).double()
    c = torch.where(sq > 0, 1.0 / newton_sqrt(torch.where(sq > 0, sq, 1.0)), 0.0)
    m = torch.zeros(B, D, dtype=x.dtype, device=x.device)
    for j in range(K):
        m = m + c[:, j, None].to(x.dtype) * x[:, j]
    dist = 1.0 - (c * lane_dot(x, m[:, None, :]).double()) / K
    q = torch.ones(B, K, dtype=torch.float64, device=x.device) if quality is None else quality.double()
    picked = torch.zeros(B, K, dtype=torch.bool, device=x.device)
    out = torch.empty(B, n, dtype=torch.long, device=x.device)
    for k in range(n):
        j = _argmax_unpicked(q * dist, picked)
        out[:, k] = j
        picked[rows, j] = True
        if k + 1 < n:
            col = (c * c[rows, j, None]) * lane_dot(x, x[rows, j, None, :]).double()
            to_pick = 1.0 - col.clamp(-1.0, 1.0)
            dist = to_pick if k == 0 else torch.minimum(dist, to_pick)
    return out


def diverse_select(
    features: torch.Tensor, n: int, *, method: str = "dpp", quality: torch.Tensor | None = None
) -> torch.Tensor:
    """Pick ``n`` diverse candidates of ``K`` per prompt (reference implementation, no input checks).

    Equivalent to the rules in this module's docstring. Args: features ``[B, K, L, D]`` or ``[B, K, D]`` float;
    quality ``[B, K]`` non-negative or None. Returns ``[B, n]`` int64 indices in pick order.
    """
    pooled = pooled_features(features)
    if method == "fps":
        return fps_from_features(pooled, quality, n)
    gram = gram_matrix(pooled)
    return select_from_similarity(gram, inverse_norms(gram), quality, n, method, DPP_EPS[gram.dtype])
