// CPU kernel of diverse_select (rules in diverse_select.h): one prompt per task, prompts in parallel over the batch.
// Per prompt the similarity is copied once into a float64 buffer (K^2 reads through the input's strides, scaled to
// cosine when a scale is given), then the greedy loop runs on contiguous arrays. Compiled with -ffp-contract=off (see
// silmm_fast/_ext.py): a fused multiply-add would round differently from the reference's separate multiply and
// subtract.
#include "diverse_select.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
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

// --- FPS straight from the features (no Gram matrix) -----------------------------------------------------------
// FPS reads only n - 1 columns of the similarity (one per pick but the last) plus the row means before the first
// pick, and the row means need no Gram either: mean_j s_ij = c_i <x_i, m> / K with m = sum_j c_j x_j. That is
// (n + 2) K D multiply-adds per prompt instead of the K^2 D of a Gram product (B = 1024, K = 64, n = 16: 3.6x fewer),
// and one read of the features from memory. Inner products run in the features' precision (float32 for float32
// input, like the Gram product of the DPP path); everything after them is float64.

// Inner products sum in kLanes partial sums (lane l takes d = l mod kLanes, in d order; one 512-bit register of
// float32), folded by halves at the end. Four rows at a time, so four independent addition chains hide the latency
// of each (one row at a time is latency bound: measured 3.5x slower). The reference repeats this order exactly.
constexpr int kLanes = 16;

template <typename scalar_t>
inline scalar_t FoldLanes(scalar_t* a) {
  for (int w = kLanes / 2; w >= 1; w /= 2) {
    for (int l = 0; l < w; ++l) a[l] += a[l + w];
  }
  return a[0];
}

// out[r] = <x[r], v[r]> for r < 4 (rows of length D), in the lane order above.
template <typename scalar_t>
inline void LaneDots4(const scalar_t* const* x, const scalar_t* const* v, int64_t D, scalar_t* out) {
  scalar_t a0[kLanes] = {}, a1[kLanes] = {}, a2[kLanes] = {}, a3[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      a0[l] += x[0][d + l] * v[0][d + l];
      a1[l] += x[1][d + l] * v[1][d + l];
      a2[l] += x[2][d + l] * v[2][d + l];
      a3[l] += x[3][d + l] * v[3][d + l];
    }
  }
  for (int l = 0; d < D; ++d, ++l) {
    a0[l] += x[0][d] * v[0][d];
    a1[l] += x[1][d] * v[1][d];
    a2[l] += x[2][d] * v[2][d];
    a3[l] += x[3][d] * v[3][d];
  }
  out[0] = FoldLanes(a0);
  out[1] = FoldLanes(a1);
  out[2] = FoldLanes(a2);
  out[3] = FoldLanes(a3);
}

// out[r] = <x[r], v> for r < 4: LaneDots4 with one shared right-hand row, loaded once per chunk (same bits). Written
// out per row like LaneDots4: GCC keeps these four accumulators in registers; a [R][kLanes] template of the same loop
// measured 1.4x slower (R = 4) and 1.2x slower (R = 8).
template <typename scalar_t>
inline void LaneDots4Shared(const scalar_t* const* x, const scalar_t* v, int64_t D, scalar_t* out) {
  scalar_t a0[kLanes] = {}, a1[kLanes] = {}, a2[kLanes] = {}, a3[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const scalar_t v_l = v[d + l];
      a0[l] += x[0][d + l] * v_l;
      a1[l] += x[1][d + l] * v_l;
      a2[l] += x[2][d + l] * v_l;
      a3[l] += x[3][d + l] * v_l;
    }
  }
  for (int l = 0; d < D; ++d, ++l) {
    a0[l] += x[0][d] * v[d];
    a1[l] += x[1][d] * v[d];
    a2[l] += x[2][d] * v[d];
    a3[l] += x[3][d] * v[d];
  }
  out[0] = FoldLanes(a0);
  out[1] = FoldLanes(a1);
  out[2] = FoldLanes(a2);
  out[3] = FoldLanes(a3);
}

// out[i] = <x_i, v> for the rows i = rows[0 .. count) of x [K, D] (contiguous).
template <typename scalar_t>
SILMM_MULTIVERSION void InnerProducts(const scalar_t* x, const scalar_t* v, const int64_t* rows, int64_t count,
                                      int64_t D, scalar_t* out) {
  const scalar_t* xs[4];
  for (int64_t r0 = 0; r0 < count; r0 += 4) {
    scalar_t res[4];
    for (int r = 0; r < 4; ++r) xs[r] = x + rows[std::min(r0 + r, count - 1)] * D;  // a short last group repeats
    LaneDots4Shared(xs, v, D, res);
    for (int r = 0; r < 4 && r0 + r < count; ++r) out[rows[r0 + r]] = res[r];
  }
}

// sqrt(v) for finite v > 0 by a fixed Newton iteration with +, *, / and exact power-of-two scaling only: the
// reference repeats these operations and gets the same bits (the vectorized sqrt behind torch.sqrt is not always
// correctly rounded, so neither side calls a library sqrt). v = f 2^e with f in [0.5, 2), e even; y0 = (1 + f) / 2
// >= sqrt(f) and 6 steps y = 0.5 (y + f / y) take the error from < 0.1 to within one ulp.
inline double NewtonSqrt(double v) {
  int e = 0;
  double f = std::frexp(v, &e);
  if (e & 1) {
    f *= 2.0;
    e -= 1;
  }
  double y = 0.5 * (1.0 + f);
  for (int it = 0; it < 6; ++it) y = 0.5 * (y + f / y);
  return std::ldexp(y, e / 2);
}

// One pass over the rows, four at a time: c_i = 1 / sqrt(<x_i, x_i>) (0 for a zero row) and m = sum_i c_i x_i in
// i order, each group of rows added to m while it is still in L1. False if a squared norm is not finite.
template <typename scalar_t>
SILMM_MULTIVERSION bool NormsAndSum(const scalar_t* x, int64_t K, int64_t D, double* c, scalar_t* m) {
  std::fill(m, m + D, scalar_t(0));
  const scalar_t* xs[4];
  for (int64_t r0 = 0; r0 < K; r0 += 4) {
    scalar_t sq[4];
    for (int r = 0; r < 4; ++r) xs[r] = x + std::min(r0 + r, K - 1) * D;  // a short last group repeats
    LaneDots4(xs, xs, D, sq);
    for (int r = 0; r < 4 && r0 + r < K; ++r) {
      const double v = static_cast<double>(sq[r]);
      if (!std::isfinite(v)) return false;
      const double c_i = v > 0.0 ? 1.0 / NewtonSqrt(v) : 0.0;
      c[r0 + r] = c_i;
      const scalar_t c_s = static_cast<scalar_t>(c_i);
      for (int64_t d = 0; d < D; ++d) m[d] += c_s * xs[r][d];
    }
  }
  return true;
}

template <typename scalar_t>
struct FpsWorkspace {
  FpsWorkspace(int64_t K, int64_t D) : x(K * D), m(D), acc(K), c(K), dist(K), score(K), picked(K), rows(K) {}
  std::vector<scalar_t> x, m, acc;
  std::vector<double> c, dist, score;
  std::vector<char> picked;
  std::vector<int64_t> rows;
};

// One prompt: selects n indices into out; false if a squared norm is not finite (NaN / Inf features).
template <typename scalar_t>
SILMM_MULTIVERSION bool FpsOne(const scalar_t* X, int64_t si, int64_t sd, const double* Q, int64_t K, int64_t D,
                               int64_t n, FpsWorkspace<scalar_t>& ws, int64_t* out) {
  const scalar_t* x = X;
  if (si != D || sd != 1) {  // rows are read n + 2 times: make them contiguous once
    scalar_t* copy = ws.x.data();
    for (int64_t i = 0; i < K; ++i) {
      for (int64_t d = 0; d < D; ++d) copy[i * D + d] = X[i * si + d * sd];
    }
    x = copy;
  }
  scalar_t* m = ws.m.data();
  scalar_t* acc = ws.acc.data();
  double* c = ws.c.data();
  double* dist = ws.dist.data();
  double* score = ws.score.data();
  char* picked = ws.picked.data();
  int64_t* rows = ws.rows.data();  // rows[0 .. alive): the unpicked candidates, in index order
  int64_t alive = K;
  for (int64_t i = 0; i < K; ++i) rows[i] = i;
  if (!NormsAndSum<scalar_t>(x, K, D, c, m)) return false;
  InnerProducts<scalar_t>(x, m, rows, K, D, acc);
  for (int64_t i = 0; i < K; ++i) dist[i] = 1.0 - (c[i] * static_cast<double>(acc[i])) / static_cast<double>(K);
  std::fill(ws.picked.begin(), ws.picked.end(), 0);
  for (int64_t k = 0; k < n; ++k) {
    for (int64_t i = 0; i < K; ++i) score[i] = (Q != nullptr ? Q[i] : 1.0) * dist[i];
    const int64_t j = ArgmaxUnpicked(score, picked, K);
    out[k] = j;
    picked[j] = 1;
    if (k + 1 == n) break;
    // a picked candidate's distance is never read again: its column entries are skipped (about n / 2K of the work)
    alive = std::remove(rows, rows + alive, j) - rows;
    InnerProducts<scalar_t>(x, x + j * D, rows, alive, D, acc);
    const double c_j = c[j];
    for (int64_t r = 0; r < alive; ++r) {
      const int64_t i = rows[r];
      const double s = std::min(std::max((c[i] * c_j) * static_cast<double>(acc[i]), -1.0), 1.0);
      dist[i] = k == 0 ? 1.0 - s : std::min(dist[i], 1.0 - s);
    }
  }
  return true;
}

template <typename scalar_t>
void RunFps(const at::Tensor& features, const at::Tensor& quality, int64_t n, at::Tensor& out) {
  const int64_t B = features.size(0), K = features.size(1), D = features.size(2);
  const scalar_t* F = features.data_ptr<scalar_t>();
  const int64_t sb = features.stride(0), si = features.stride(1), sd = features.stride(2);
  const double* Q = quality.defined() ? quality.data_ptr<double>() : nullptr;
  int64_t* O = out.data_ptr<int64_t>();
  const int64_t work = (n + 3) * K * D;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(work, 1));
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    FpsWorkspace<scalar_t> ws(K, D);
    for (int64_t b = begin; b < end; ++b) {
      if (!FpsOne<scalar_t>(F + b * sb, si, sd, Q != nullptr ? Q + b * K : nullptr, K, D, n, ws, O + b * n)) {
        std::fill(O + b * n, O + (b + 1) * n, int64_t{-1});
      }
    }
  });
}

}  // namespace

at::Tensor DiverseSelectFpsCpu(const at::Tensor& features, const std::optional<at::Tensor>& quality, int64_t n) {
  CheckDiverseSelectFpsArgs(features, quality, n);
  TORCH_CHECK(features.device().is_cpu(), "diverse_select_fps (CPU kernel): features must be a CPU tensor");
  at::Tensor q;
  if (quality.has_value()) q = quality->to(at::kDouble).contiguous();
  at::Tensor out = at::empty({features.size(0), n}, features.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "diverse_select_fps_cpu",
                             [&] { RunFps<scalar_t>(features, q, n, out); });
  return out;
}

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
