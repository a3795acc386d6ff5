// Batched diverse selection: pick n of K candidates per prompt from a [B, K, K] cosine-similarity matrix.
//
//   diverse_select(similarity [B, K, K] float32/float64, quality [B, K] or None, n, method, eps) -> int64 [B, n]
//
// Indices come back in pick order. All selection arithmetic is float64 whatever the input dtype, in the same order
// as the reference (silmm_fast/reference/diverse_select.py), so both pick the same indices. Ties go to the lowest
// index. q_i = quality[b, i], or 1 without quality; s_ij = similarity[b, i, j].
//
// method "fps": farthest-point sampling on the cosine distance 1 - s_ij, quality weighted. A candidate's distance is
//   dist_i = 1 - mean_j s_ij before any pick (its distance from the whole set: the first pick is the most atypical
//   candidate) and min over picked j of (1 - s_ij) after; each step picks the unpicked argmax of q_i * dist_i.
//   O(K^2) per prompt.
// method "dpp": greedy MAP inference of a k-DPP (Chen, Zhang & Zhou, NeurIPS 2018) with kernel
//   L_ij = (q_i * s_ij) * q_j, by incremental Cholesky: residual gains d_i^2 start at L_ii; after picking j,
//   e_i = (L_ji - <c_j, c_i>) / d_j, c_i gets e_i appended, d_i^2 -= e_i^2. O(n^2 K) per prompt. Each step picks the
//   unpicked argmax of d_i^2. When that gain is <= eps * max_i L_ii (every remaining candidate is spanned by the
//   picks: duplicates, or n above the feature rank) the DPP stops and the remaining picks follow the "fps" rule from
//   the picks made so far. The similarity must be PSD (a cosine Gram matrix is).
//
// Prompts run in parallel over the batch (at::parallel_for on CPU, one CUDA block per prompt). Inputs may be
// non-contiguous. The checks below run before either kernel.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

namespace silmm_fast {

enum class SelectMethod { kFps = 0, kDpp = 1 };

inline SelectMethod CheckDiverseSelectArgs(
    const at::Tensor& similarity,
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
  if (quality.has_value()) {
    const at::Tensor& q = *quality;
    TORCH_CHECK(q.dim() == 2 && q.size(0) == similarity.size(0) && q.size(1) == K,
                "diverse_select: quality must have shape [B, K] = [", similarity.size(0), ", ", K, "], got ",
                q.sizes());
    TORCH_CHECK(at::isFloatingType(q.scalar_type()), "diverse_select: quality must be floating, got ",
                q.scalar_type());
    TORCH_CHECK(q.device() == similarity.device(), "diverse_select: quality is on ", q.device(),
                ", similarity on ", similarity.device());
  }
  return method == "dpp" ? SelectMethod::kDpp : SelectMethod::kFps;
}

at::Tensor DiverseSelectCpu(
    const at::Tensor& similarity,
    const std::optional<at::Tensor>& quality,
    int64_t n,
    const std::string& method,
    double eps);

#ifdef SILMM_WITH_CUDA
at::Tensor DiverseSelectCuda(
    const at::Tensor& similarity,
    const std::optional<at::Tensor>& quality,
    int64_t n,
    const std::string& method,
    double eps);
#endif

// Device dispatch for direct (pybind) callers; torch.ops.silmm_fast.diverse_select dispatches by dispatch key.
inline at::Tensor DiverseSelect(
    const at::Tensor& similarity,
    const std::optional<at::Tensor>& quality,
    int64_t n,
    const std::string& method,
    double eps) {
  if (similarity.is_cuda()) {
#ifdef SILMM_WITH_CUDA
    return DiverseSelectCuda(similarity, quality, n, method, eps);
#else
    TORCH_CHECK(false, "diverse_select: this build of silmm_fast._C has no CUDA kernels");
#endif
  }
  return DiverseSelectCpu(similarity, quality, n, method, eps);
}

}  // namespace silmm_fast
