"""Public ``diverse_select``: keep the ``n`` most diverse of ``K`` candidates per prompt.

Work per call: mean-pool over tokens (4-D input only), then per method:

- ``"dpp"``: one batched Gram matmul ``X·Xᵀ`` in the features' precision (the only pass over the features), the
  ``B·K`` inverse norms from its diagonal (checked finite), then one C++ call
  (``torch.ops.silmm_fast.diverse_select``, ``csrc/diverse_select``) that scales the Gram to cosine similarities and
  runs the greedy DPP per prompt in float64, prompts in parallel over the batch; O(K² + n²K) per prompt after the Gram.
- ``"fps"`` on CPU: one C++ call (``torch.ops.silmm_fast.diverse_select_fps``) straight from the pooled features,
  forming only the columns of the picks: (n + 2)·K·D multiply-adds per prompt instead of the K²·D of a Gram product,
  inner products in the features' precision, selection in float64. On CUDA: the Gram route as for the DPP.
- ``reference``: ``silmm_fast.reference.diverse_select`` (the same rules, batched PyTorch), used when the extension
  is disabled (``SILMM_FAST_NO_EXT=1``), cannot be built (one warning) or is forced with ``use_backend("reference")``.

The C++ and reference paths of each route pick identical indices (same IEEE operations in the same order). The
selection rules are documented in ``silmm_fast.reference.diverse_select`` and
``csrc/diverse_select/diverse_select.h``. The public op validates its arguments once and hands them to
``diverse_select_on``, which runs one backend.
"""

from __future__ import annotations

import threading

import torch

from silmm_fast import _backend, _ext
from silmm_fast._validate import check_choice, check_float, check_ndim, check_same_device, has_data
from silmm_fast.reference import diverse_select as _reference

METHODS = _reference.METHODS
DPP_EPS = _reference.DPP_EPS

_fake_lock = threading.Lock()
_fake_registered = False


def _register_fake() -> None:
    """Shape-only kernel of the C++ op (for torch.compile / FakeTensor / opcheck); registered once, after loading."""
    global _fake_registered
    with _fake_lock:
        if _fake_registered:
            return

        @torch.library.register_fake("silmm_fast::diverse_select")
        def _(similarity, scale, quality, n, method, eps):
            torch._check(similarity.dim() == 3, lambda: "diverse_select: similarity must be [B, K, K]")
            return similarity.new_empty((similarity.shape[0], n), dtype=torch.long)

        @torch.library.register_fake("silmm_fast::diverse_select_fps")
        def _(features, quality, n):
            torch._check(features.dim() == 3, lambda: "diverse_select_fps: features must be [B, K, D]")
            return features.new_empty((features.shape[0], n), dtype=torch.long)

        _fake_registered = True


def cpp_op(name: str = "diverse_select"):
    """``torch.ops.silmm_fast.<name>`` (building / loading the extension first), or None if unavailable."""
    if _ext.load() is None:
        return None
    _register_fake()
    return getattr(torch.ops.silmm_fast, name).default


def _check_n(n: object, K: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n: expected an int, got {type(n).__name__}")
    if not 1 <= n <= K:
        raise ValueError(f"n: expected 1 <= n <= K (K = features.shape[1] = {K}), got {n}")
    return n


def _skip_data_checks(x: torch.Tensor) -> bool:
    # a data-dependent check cannot run inside torch.compile tracing or CUDA graph capture, nor on a meta tensor
    if not has_data(x) or torch.compiler.is_compiling():
        return True
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _validate(features: object, n: object, method: object, quality: object) -> None:
    check_float("features", features)
    assert isinstance(features, torch.Tensor)
    check_ndim("features", features, (3, 4), "[B, K, L, D] or [B, K, D]")
    if features.shape[-1] == 0 or (features.dim() == 4 and features.shape[2] == 0):
        raise ValueError(
            f"features: expected at least one token and one feature dim ([B, K, L, D] or [B, K, D]), "
            f"got {tuple(features.shape)}"
        )
    _check_n(n, features.shape[1])
    check_choice("method", method, METHODS)
    if quality is not None:
        check_float("quality", quality)
        assert isinstance(quality, torch.Tensor)
        B, K = features.shape[:2]
        if tuple(quality.shape) != (B, K):
            raise ValueError(f"quality: expected shape [B, K] = {(B, K)}, got {tuple(quality.shape)}")
        check_same_device(features=features, quality=quality)
        if not _skip_data_checks(quality) and quality.numel() > 0:
            if not bool(torch.isfinite(quality).all()):
                raise ValueError("quality: contains NaN or Inf")
            if bool((quality < 0).any()):
                raise ValueError("quality: expected non-negative values (per-candidate weights)")


def _raise_non_finite(features: torch.Tensor, dtype: torch.dtype) -> None:
    if not bool(torch.isfinite(features).all()):
        raise ValueError("features: contains NaN or Inf")
    raise ValueError(f"features: squared norms overflow {dtype} (values too large); scale the features or pass float64")


def _check_finite_gram(features: torch.Tensor, gram: torch.Tensor) -> None:
    """A NaN / Inf feature (or an overflowing squared norm) makes diag(G) non-finite: B·K values to check, not
    B·K·L·D. Costs one host sync on CUDA."""
    sq_norms = gram.diagonal(dim1=1, dim2=2)
    if _skip_data_checks(gram) or sq_norms.numel() == 0 or bool(torch.isfinite(sq_norms).all()):
        return
    _raise_non_finite(features, gram.dtype)


def diverse_select_on(
    backend: str, features: torch.Tensor, n: int, *, method: str, quality: torch.Tensor | None
) -> torch.Tensor:
    """``diverse_select`` on ``backend`` (``"cpp"``, or ``"reference"``; ``"cpp"`` falls back to the reference when
    the extension is unavailable) for checked inputs: what the public op runs once it has validated its arguments.

    FPS on CPU goes straight from the pooled features (``_fps_from_features``). Every other case, DPP anywhere and FPS
    on CUDA, takes the Gram route: one batched Gram product, its diagonal checked finite, the inverse norms, then the
    C++ op or the reference's ``select_from_similarity`` (a GPU multiplies matrices faster than it walks columns)."""
    pooled = _reference.pooled_features(features)
    if method == "fps" and not pooled.is_cuda:
        return _fps_from_features(features, pooled, n, quality, backend)
    gram = _reference.gram_matrix(pooled)
    _check_finite_gram(features, gram)
    scale = _reference.inverse_norms(gram)
    eps = DPP_EPS[gram.dtype] if method == "dpp" else 0.0
    op = cpp_op() if backend == "cpp" else None
    if op is not None:
        return op(gram, scale, quality, n, method, eps)
    return _reference.select_from_similarity(gram, scale, quality, n, method, eps)


def _fps_from_features(
    features: torch.Tensor, pooled: torch.Tensor, n: int, quality: torch.Tensor | None, backend: str
) -> torch.Tensor:
    """FPS on CPU without a Gram matrix: C++ ``diverse_select_fps`` or the reference ``fps_from_features`` (identical
    bits). A NaN / Inf feature shows as a −1 first pick (C++) or a non-finite squared norm (checked here)."""
    op = cpp_op("diverse_select_fps") if backend == "cpp" else None
    if op is not None:
        out = op(pooled, quality, n)
        if out.numel() > 0 and not _skip_data_checks(out) and bool((out[:, 0] < 0).any()):
            _raise_non_finite(features, pooled.dtype)
        return out
    if pooled.numel() > 0 and not _skip_data_checks(pooled):
        sq = _reference.lane_dot(pooled, pooled)
        if not bool(torch.isfinite(sq).all()):
            _raise_non_finite(features, pooled.dtype)
    return _reference.fps_from_features(pooled, quality, n)


def diverse_select(
    features: torch.Tensor,
    n: int,
    *,
    method: str = "dpp",
    quality: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indices of the ``n`` most diverse of ``K`` candidates per prompt, by greedy k-DPP MAP or farthest-point sampling.

    Equivalent to (per prompt ``b``; ``x_i`` the candidates' features mean-pooled over tokens)::

        S = cos(x_i, x_j)                                     # [K, K], S_ii = 1 (0 for an all-zero candidate)
        "dpp": greedy argmax_Y det(L_Y), L = diag(q)·S·diag(q), one candidate at a time (Chen et al. 2018)
        "fps": greedy argmax_i q_i · min_{j picked} (1 − S_ij); first pick argmax_i q_i · (1 − mean_j S_ij)

    Ties go to the lowest index. The DPP stops when the best remaining gain is ``≤ eps · max_i L_ii`` (``eps`` =
    ``DPP_EPS[Gram dtype]``: 1e-5 for float32, 1e-10 for float64; hit by duplicates, or by more picks than the
    feature rank) and fills the remaining picks by the ``"fps"`` rule from the picks so far. Without quality the first
    DPP pick is index 0 (all singletons are equal). Deterministic; the C++ and reference backends pick identical
    indices.

    Args:
        features: ``[B, K, L, D]`` (mean-pooled over ``L``) or ``[B, K, D]``; float16 / bfloat16 / float32 (inner
            products in float32) or float64 (in float64). Any strides. NaN / Inf raise.
        n: how many to keep per prompt, ``1 <= n <= K``.
        method: ``"dpp"`` (default) or ``"fps"``.
        quality: optional ``[B, K]`` non-negative finite weights (e.g. self-feedback scores mapped to ``[0, 1]``); a
            zero-quality candidate is picked only once nothing else adds anything.

    Returns:
        ``[B, n]`` int64 indices into ``K``, in pick order, distinct per row, on the features' device.

    Memory: DPP, the ``[B, K, K]`` Gram plus O(K² + n·K) float64 workspace per thread; FPS on CPU, no Gram, O(K·D)
    workspace per thread only for non-contiguous input. The features are read from memory once (plus once by the
    pooling of 4-D input).
    """
    _validate(features, n, method, quality)
    backend = _backend.choose("diverse_select", features.device)
    return diverse_select_on(backend, features, n, method=method, quality=quality)
