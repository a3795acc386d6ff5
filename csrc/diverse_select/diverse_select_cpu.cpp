// CPU kernel of diverse_select (rules in diverse_select.h): one prompt per task, prompts in parallel over the batch.
// Per prompt the similarity is copied once into a float64 buffer (K^2 reads through the input's strides), then the
// greedy loop runs on contiguous arrays. Compiled with -ffp-contract=off (see silmm_fast/_ext.py): a fused
// multiply-add would round differently from the reference's separate multiply and subtract.
#include "diverse_select.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace silmm_fast {
namespace {

struct Workspace {
  explicit Workspace(int64_t K, int64_t n)
      : s(K * K), q(K), dist(K), d2(K), chol(n * K), score(K), picked(K) {}
  std::vector<double> s, q, dist, d2, chol, score;
  std::vector<char> picked;
};

// First index of the largest value among unpicked candidates (ties: lowest index).
inline int64_t ArgmaxUnpicked(const double* score, const char* picked, int64_t K) {
  int64_t best = -1;
  double best_value = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < K; ++i) {
    if (picked[i]) continue;
    if (best < 0 || score[i] > best_value) {
      best = i;
      best_value = score[i];
    }
  }
  return best;
}

void SelectOne(Workspace& w, int64_t K, int64_t n, SelectMethod method, double eps, int64_t* out) {
  const double* s = w.s.data();
  const double* q = w.q.data();
  double* dist = w.dist.data();
  double* d2 = w.d2.data();
  double* chol = w.chol.data();
  double* score = w.score.data();
  char* picked = w.picked.data();
  std::fill(w.picked.begin(), w.picked.end(), 0);

  for (int64_t i = 0; i < K; ++i) {
    double acc = 0.0;
    for (int64_t j = 0; j < K; ++j) acc += s[i * K + j];
    dist[i] = 1.0 - acc / static_cast<double>(K);
  }

  bool in_dpp = method == SelectMethod::kDpp;
  double tol = 0.0;
  if (in_dpp) {
    double max_diag = -std::numeric_limits<double>::infinity();
    for (int64_t i = 0; i < K; ++i) {
      d2[i] = (q[i] * s[i * K + i]) * q[i];
      max_diag = std::max(max_diag, d2[i]);
    }
    tol = eps * max_diag;
  }

  for (int64_t k = 0; k < n; ++k) {
    int64_t j = -1;
    if (in_dpp) {
      j = ArgmaxUnpicked(d2, picked, K);
      const double gain = d2[j];
      if (gain > tol) {
        if (k + 1 < n) {
          const double d_j = std::sqrt(gain);
          for (int64_t i = 0; i < K; ++i) {
            if (picked[i] || i == j) continue;
            double acc = (q[j] * s[j * K + i]) * q[i];
            for (int64_t t = 0; t < k; ++t) acc -= chol[t * K + j] * chol[t * K + i];
            const double e = acc / d_j;
            chol[k * K + i] = e;
            d2[i] -= e * e;
          }
        }
      } else {
        in_dpp = false;
        j = -1;
      }
    }
    if (j < 0) {
      for (int64_t i = 0; i < K; ++i) score[i] = q[i] * dist[i];
      j = ArgmaxUnpicked(score, picked, K);
    }
    out[k] = j;
    picked[j] = 1;
    for (int64_t i = 0; i < K; ++i) {
      const double to_pick = 1.0 - s[i * K + j];
      dist[i] = k == 0 ? to_pick : std::min(dist[i], to_pick);
    }
  }
}

template <typename scalar_t>
void Run(const at::Tensor& similarity, const at::Tensor& quality, int64_t n, SelectMethod method, double eps,
         at::Tensor& out) {
  const int64_t B = similarity.size(0);
  const int64_t K = similarity.size(1);
  const auto S = similarity.accessor<scalar_t, 3>();
  // quality arrives as a contiguous float64 [B, K] tensor, or undefined
  const double* Q = quality.defined() ? quality.data_ptr<double>() : nullptr;
  auto O = out.accessor<int64_t, 2>();
  // at least ~64K inner-loop operations per task, so small problems do not pay for threads they cannot use
  const int64_t work = K * K + n * n * K;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(work, 1));
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    Workspace w(K, n);
    for (int64_t b = begin; b < end; ++b) {
      const auto Sb = S[b];
      for (int64_t i = 0; i < K; ++i) {
        const auto Si = Sb[i];
        for (int64_t j = 0; j < K; ++j) w.s[i * K + j] = static_cast<double>(Si[j]);
        w.q[i] = Q != nullptr ? Q[b * K + i] : 1.0;
      }
      SelectOne(w, K, n, method, eps, &O[b][0]);
    }
  });
}

}  // namespace

at::Tensor DiverseSelectCpu(
    const at::Tensor& similarity,
    const std::optional<at::Tensor>& quality,
    int64_t n,
    const std::string& method,
    double eps) {
  const SelectMethod m = CheckDiverseSelectArgs(similarity, quality, n, method, eps);
  TORCH_CHECK(similarity.device().is_cpu(), "diverse_select (CPU kernel): similarity must be a CPU tensor");
  at::Tensor q;
  if (quality.has_value()) q = quality->to(at::kDouble).contiguous();
  at::Tensor out = at::empty({similarity.size(0), n}, similarity.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(similarity.scalar_type(), "diverse_select_cpu",
                             [&] { Run<scalar_t>(similarity, q, n, m, eps, out); });
  return out;
}

}  // namespace silmm_fast
