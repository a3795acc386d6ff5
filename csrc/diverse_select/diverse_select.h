// Batched diverse selection: pick n of K candidates per prompt from a [B, K, K] similarity (or Gram) matrix.
//
//   diverse_select(similarity [B, K, K] float32/float64, scale [B, K] or None, quality [B, K] or None, n, method,
//                  eps) -> int64 [B, n]
//
// Indices come back in pick order. All selection arithmetic is float64 whatever the input dtype, uses only +, -, *,
// / and comparisons (IEEE-exact everywhere, unlike sqrt, whose vectorized versions in PyTorch may differ in the last
// bit), in the same order as the reference (silmm_fast/reference/diverse_select.py), so both pick the same indices.
// Ties go to the lowest index. q_i = quality[b, i], or 1 without quality.
//
// Similarity: with scale (c_i = scale[b, i], e.g. 1 / ||x_i|| for a Gram matrix g_ij = <x_i, x_j>, which makes
//   cosine similarities here, per prompt, instead of in B*K^2 elementwise passes in PyTorch):
//   s_ij = clamp((g_ij * c_i) * c_j, -1, 1) for i != j and s_ii = 1 if c_i > 0 else 0 (an all-zero candidate).
//   Without scale: s_ij = similarity[b, i, j] as given.
//
// method "fps": farthest-point sampling on the cosine distance 1 - s_ij, quality weighted. A candidate's distance is
//   dist_i = 1 - mean_j s_ij before any pick (its distance from the whole set: the first pick is the most atypical
//   candidate) and min over picked j of (1 - s_ij) after; each step picks the unpicked argmax of q_i * dist_i.
//   O(K^2) per prompt.
// method "dpp": greedy MAP inference of a k-DPP (Chen, Zhang & Zhou, NeurIPS 2018) with kernel
//   L_ij = (q_i * s_ij) * q_j, by their incremental factorization in square-root-free (LDL^T) form: residual gains
//   d_i^2 start at L_ii; picking j with gain g_k = d_j^2 at step k computes
//     w_ki = L_ji - sum_{t<k} (w_tj / g_t) * w_ti,   d_i^2 -= w_ki * (w_ki / g_k)
//   (Chen et al.'s e_i = w_ki / sqrt(g_k)). O(n^2 K) per prompt. Each step picks the unpicked argmax of d_i^2. When
//   that gain is <= eps * max_i L_ii (every remaining candidate is spanned by the picks: duplicates, or n above the
//   feature rank) the DPP stops and the remaining picks follow the "fps" rule from the picks made so far. The
//   similarity must be PSD (a cosine Gram matrix is).
//
// Prompts run in parallel over the batch (at::parallel_for on CPU, one CUDA block per prompt). Inputs may be
// non-contiguous. The checks below run before either kernel.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <utility>

namespace silmm_fast {

enum class SelectMethod { kFps = 0, kDpp = 1 };

inline SelectMethod CheckDiverseSelectArgs(
    const at::Tensor& similarity,
    const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& quality,
    int64_t n,
    const std::string& method,
    double eps) {
  TORCH_CHECK(similarity.dim() == 3 && similarity.size(1) == similarity.size(2),
              "diverse_select: similarity must have shape [B, K, K], got ", similarity.sizes());
  TORCH_CHECK(similarity.scalar_type() == at::kFloat || similarity.scalar_type() == at::kDouble,
              "diverse_select: similarity must be float32 or float64, got ", similarity.scalar_type());
  const int64_t K = similarity.size(1);
  TORCH_CHECK(n >= 1 && n <= K, "diverse_select: n must be in [1, K=", K, "], got ", n);
  TORCH_CHECK(eps >= 0.0, "diverse_select: eps must be >= 0, got ", eps);
  TORCH_CHECK(method == "fps" || method == "dpp", "diverse_select: method must be \"dpp\" or \"fps\", got \"", method,
              "\"");
  for (const auto& [name, t] : {std::pair<const char*, const std::optional<at::Tensor>*>{"scale", &scale},
                                 std::pair<const char*, const std::optional<at::Tensor>*>{"quality", &quality}}) {
    if (!t->has_value()) continue;
    const at::Tensor& v = **t;
    TORCH_CHECK(v.dim() == 2 && v.size(0) == similarity.size(0) && v.size(1) == K, "diverse_select: ", name,
                " must have shape [B, K] = [", similarity.size(0), ", ", K, "], got ", v.sizes());
    TORCH_CHECK(at::isFloatingType(v.scalar_type()), "diverse_select: ", name, " must be floating, got ",
                v.scalar_type());
    TORCH_CHECK(v.device() == similarity.device(), "diverse_select: ", name, " is on ", v.device(),
                ", similarity on ", similarity.device());
  }
  return method == "dpp" ? SelectMethod::kDpp : SelectMethod::kFps;
}

// diverse_select_fps(features [B, K, D] float32/float64, quality [B, K] or None, n) -> int64 [B, n]
//
// The "fps" rule above computed from the (pooled) features instead of a similarity matrix, in float64: c_i =
// 1 / sqrt(<x_i, x_i>) (sqrt by a fixed Newton iteration, repeated bit for bit by the reference) (0 for an all-zero candidate), s_ij = clamp((c_i * c_j) * <x_i, x_j>, -1, 1), and the
// distances before the first pick 1 - c_i * <x_i, m> / K with m = sum_j c_j x_j (= 1 - mean_j s_ij). Only the
// columns of the picks are formed. Inner products sum in 8 lanes (d mod 8), an order the reference repeats; a prompt whose features hold NaN / Inf gets a row of -1 (the Python
// wrapper raises).
inline void CheckDiverseSelectFpsArgs(const at::Tensor& features, const std::optional<at::Tensor>& quality,
                                      int64_t n) {
  TORCH_CHECK(features.dim() == 3, "diverse_select_fps: features must have shape [B, K, D], got ", features.sizes());
  TORCH_CHECK(features.scalar_type() == at::kFloat || features.scalar_type() == at::kDouble,
              "diverse_select_fps: features must be float32 or float64, got ", features.scalar_type());
  const int64_t K = features.size(1);
  TORCH_CHECK(n >= 1 && n <= K, "diverse_select_fps: n must be in [1, K=", K, "], got ", n);
  if (quality.has_value()) {
    const at::Tensor& v = *quality;
    TORCH_CHECK(v.dim() == 2 && v.size(0) == features.size(0) && v.size(1) == K,
                "diverse_select_fps: quality must have shape [B, K] = [", features.size(0), ", ", K, "], got ",
                v.sizes());
    TORCH_CHECK(at::isFloatingType(v.scalar_type()), "diverse_select_fps: quality must be floating, got ",
                v.scalar_type());
    TORCH_CHECK(v.device() == features.device(), "diverse_select_fps: quality is on ", v.device(), ", features on ",
                features.device());
  }
}

at::Tensor DiverseSelectFpsCpu(const at::Tensor& features, const std::optional<at::Tensor>& quality, int64_t n);

at::Tensor DiverseSelectCpu(
    const at::Tensor& similarity,
    const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& quality,
    int64_t n,
    const std::string& method,
    double eps);

#ifdef SILMM_WITH_CUDA
at::Tensor DiverseSelectCuda(
    const at::Tensor& similarity,
    const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& quality,
    int64_t n,
    const std::string& method,
    double eps);
#endif

// Device dispatch for direct (pybind) callers; torch.ops.silmm_fast.diverse_select dispatches by dispatch key.
inline at::Tensor DiverseSelect(
    const at::Tensor& similarity,
    const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& quality,
    int64_t n,
    const std::string& method,
    double eps) {
  if (similarity.is_cuda()) {
#ifdef SILMM_WITH_CUDA
    return DiverseSelectCuda(similarity, scale, quality, n, method, eps);
#else
    TORCH_CHECK(false, "diverse_select: this build of silmm_fast._C has no CUDA kernels");
#endif
  }
  return DiverseSelectCpu(similarity, scale, quality, n, method, eps);
}

}  // namespace silmm_fast
