// CPU kernel of diverse_select (rules in diverse_select.h): one prompt per task, prompts in parallel over the batch.
// Per prompt the similarity is copied once into a float64 buffer (K^2 reads through the input's strides, scaled to
// cosine when a scale is given), then the greedy loop runs on contiguous arrays. Compiled with -ffp-contract=off (see
// silmm_fast/_ext.py): a fused multiply-add would round differently from the reference's separate multiply and
// subtract.
#include "diverse_select.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <vector>

// The hot loops get AVX2 / AVX-512 clones picked at load time (GCC on x86-64), about 2x on the selection itself.
// Without FMA contraction every clone rounds exactly like the baseline.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SILMM_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SILMM_MULTIVERSION
#endif

namespace silmm_fast {
namespace {

struct Workspace {
  Workspace(int64_t K, int64_t n) : s(K * K), q(K), dist(K), d2(K), w(n * K), gain(n), acc(K), score(K), picked(K) {}
  std::vector<double> s, q, dist, d2, w, gain, acc, score;
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

// Copies one prompt's similarity into ws.s as float64; with a scale, s_ij = clamp((g_ij c_i) c_j, -1, 1) off the
// diagonal and s_ii = [c_i > 0].
template <typename scalar_t>
SILMM_MULTIVERSION void LoadPrompt(const scalar_t* S, int64_t si, int64_t sj, const double* C, const double* Q,
                                   int64_t K, Workspace& ws) {
  double* s = ws.s.data();
  for (int64_t i = 0; i < K; ++i) {
    const scalar_t* row = S + i * si;
    double* s_i = s + i * K;
    if (sj == 1) {
      for (int64_t j = 0; j < K; ++j) s_i[j] = static_cast<double>(row[j]);
    } else {
      for (int64_t j = 0; j < K; ++j) s_i[j] = static_cast<double>(row[j * sj]);
    }
    ws.q[i] = Q != nullptr ? Q[i] : 1.0;
  }
  if (C == nullptr) return;
  for (int64_t i = 0; i < K; ++i) {
    double* s_i = s + i * K;
    const double c_i = C[i];
    for (int64_t j = 0; j < K; ++j) s_i[j] = std::min(std::max((s_i[j] * c_i) * C[j], -1.0), 1.0);
    s_i[i] = c_i > 0.0 ? 1.0 : 0.0;
  }
}

SILMM_MULTIVERSION void SelectOne(Workspace& ws, int64_t K, int64_t n, SelectMethod method, double eps,
                                  int64_t* out) {
  const double* s = ws.s.data();
  const double* q = ws.q.data();
  double* dist = ws.dist.data();
  double* d2 = ws.d2.data();
  double* w = ws.w.data();
  double* gain = ws.gain.data();
  double* acc = ws.acc.data();
  double* score = ws.score.data();
  char* picked = ws.picked.data();
  std::fill(ws.picked.begin(), ws.picked.end(), 0);

  // distance from the whole set, 1 - mean_j s_ij (needed only by an FPS first pick); row sums in j order for every
  // i at once: the same additions as one row at a time, but the loop over i vectorizes
  auto init_dist = [&] {
    std::fill(dist, dist + K, 0.0);
    for (int64_t j = 0; j < K; ++j) {
      for (int64_t i = 0; i < K; ++i) dist[i] += s[i * K + j];
    }
    for (int64_t i = 0; i < K; ++i) dist[i] = 1.0 - dist[i] / static_cast<double>(K);
  };
  bool in_dpp = method == SelectMethod::kDpp;
  double tol = 0.0;
  if (in_dpp) {
    double max_diag = -std::numeric_limits<double>::infinity();
    for (int64_t i = 0; i < K; ++i) {
      d2[i] = (q[i] * s[i * K + i]) * q[i];
      max_diag = std::max(max_diag, d2[i]);
    }
    tol = eps * max_diag;
  } else {
    init_dist();
  }

  for (int64_t k = 0; k < n; ++k) {
    int64_t j = -1;
    if (in_dpp) {
      j = ArgmaxUnpicked(d2, picked, K);
      const double g = d2[j];
      if (g > tol) {
        if (k + 1 < n) {
          // w_ki = L_ji - sum_t (w_tj / g_t) w_ti for every i (picked ones too: unused, as in the reference), the
          // sum in t order; the loops over i vectorize
          const double qj = q[j];
          const double* s_j = s + j * K;
          for (int64_t i = 0; i < K; ++i) acc[i] = (qj * s_j[i]) * q[i];
          for (int64_t t = 0; t < k; ++t) {
            const double a = w[t * K + j] / gain[t];
            const double* w_t = w + t * K;
            for (int64_t i = 0; i < K; ++i) acc[i] -= a * w_t[i];
          }
          double* w_k = w + k * K;
          for (int64_t i = 0; i < K; ++i) {
            w_k[i] = acc[i];
            d2[i] -= acc[i] * (acc[i] / g);
          }
          gain[k] = g;
        }
      } else {
        in_dpp = false;
        j = -1;
        if (k == 0) init_dist();
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
void Run(const at::Tensor& similarity, const at::Tensor& scale, const at::Tensor& quality, int64_t n,
         SelectMethod method, double eps, at::Tensor& out) {
  const int64_t B = similarity.size(0);
  const int64_t K = similarity.size(1);
  const scalar_t* S = similarity.data_ptr<scalar_t>();
  const int64_t sb = similarity.stride(0), si = similarity.stride(1), sj = similarity.stride(2);
  // scale and quality arrive as contiguous float64 [B, K] tensors, or undefined
  const double* C = scale.defined() ? scale.data_ptr<double>() : nullptr;
  const double* Q = quality.defined() ? quality.data_ptr<double>() : nullptr;
  int64_t* O = out.data_ptr<int64_t>();
  // at least ~64K inner-loop operations per task, so small problems do not pay for threads they cannot use
  const int64_t work = K * K + n * n * K;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(work, 1));
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    Workspace ws(K, n);
    for (int64_t b = begin; b < end; ++b) {
      LoadPrompt<scalar_t>(S + b * sb, si, sj, C != nullptr ? C + b * K : nullptr, Q != nullptr ? Q + b * K : nullptr,
                           K, ws);
      SelectOne(ws, K, n, method, eps, O + b * n);
    }
  });
}

}  // namespace

at::Tensor DiverseSelectCpu(
    const at::Tensor& similarity,
    const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& quality,
    int64_t n,
    const std::string& method,
    double eps) {
  const SelectMethod m = CheckDiverseSelectArgs(similarity, scale, quality, n, method, eps);
  TORCH_CHECK(similarity.device().is_cpu(), "diverse_select (CPU kernel): similarity must be a CPU tensor");
  at::Tensor c, q;
  if (scale.has_value()) c = scale->to(at::kDouble).contiguous();
  if (quality.has_value()) q = quality->to(at::kDouble).contiguous();
  at::Tensor out = at::empty({similarity.size(0), n}, similarity.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(similarity.scalar_type(), "diverse_select_cpu",
                             [&] { Run<scalar_t>(similarity, c, q, n, m, eps, out); });
  return out;
}

}  // namespace silmm_fast
