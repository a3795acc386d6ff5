// CUDA kernel of diverse_select (rules in diverse_select.h): one thread block per prompt, threads over candidates.
// Built only where torch has CUDA (silmm_fast/_ext.py), with --fmad=false so it rounds like the CPU kernel and the
// reference (the arithmetic is +, -, *, / only: IEEE-exact on both). Per-prompt state (distances, residual gains,
// factor rows [n, K], picked flags) lives in a global workspace; each pick is a block-wide argmax (ties: lowest
// index) followed by a parallel update over candidates.
#include "diverse_select.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace silmm_fast {
namespace {

constexpr int kMaxThreads = 256;

struct Best {
  double value;
  int64_t index;  // -1: none
};

__device__ inline bool Better(const Best& a, const Best& b) {
  if (a.index < 0) return false;
  if (b.index < 0) return true;
  return a.value > b.value || (a.value == b.value && a.index < b.index);
}

// Block-wide argmax of score(i) over unpicked candidates; every thread gets the result.
template <typename ScoreFn>
__device__ Best BlockArgmax(ScoreFn score, const unsigned char* picked, int64_t K, Best* shared) {
  Best mine{0.0, -1};
  for (int64_t i = threadIdx.x; i < K; i += blockDim.x) {
    if (picked[i]) continue;
    const Best candidate{score(i), i};
    if (Better(candidate, mine)) mine = candidate;
  }
  shared[threadIdx.x] = mine;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride && Better(shared[threadIdx.x + stride], shared[threadIdx.x])) {
      shared[threadIdx.x] = shared[threadIdx.x + stride];
    }
    __syncthreads();
  }
  const Best result = shared[0];
  __syncthreads();
  return result;
}

template <typename scalar_t>
__global__ void DiverseSelectKernel(
    const scalar_t* __restrict__ sim, int64_t stride_b, int64_t stride_i, int64_t stride_j,
    const double* __restrict__ scale,    // contiguous [B, K] or nullptr
    const double* __restrict__ quality,  // contiguous [B, K] or nullptr
    int64_t K, int64_t n, bool dpp, double eps, double* __restrict__ dist_ws, double* __restrict__ d2_ws,
    double* __restrict__ w_ws, double* __restrict__ gain_ws, unsigned char* __restrict__ picked_ws,
    int64_t* __restrict__ out) {
  __shared__ Best shared[kMaxThreads];
  const int64_t b = blockIdx.x;
  const scalar_t* s = sim + b * stride_b;
  const double* c = scale == nullptr ? nullptr : scale + b * K;
  const double* q = quality == nullptr ? nullptr : quality + b * K;
  double* dist = dist_ws + b * K;
  double* d2 = d2_ws + b * K;
  double* w = w_ws + b * n * K;
  double* gain = gain_ws + b * n;
  unsigned char* picked = picked_ws + b * K;
  int64_t* o = out + b * n;
  // the similarity rules of diverse_select.h, computed on access
  auto S = [&](int64_t i, int64_t j) {
    const double g = static_cast<double>(s[i * stride_i + j * stride_j]);
    if (c == nullptr) return g;
    if (i == j) return c[i] > 0.0 ? 1.0 : 0.0;
    return fmin(fmax((g * c[i]) * c[j], -1.0), 1.0);
  };
  auto Q = [&](int64_t i) { return q == nullptr ? 1.0 : q[i]; };

  for (int64_t i = threadIdx.x; i < K; i += blockDim.x) {
    picked[i] = 0;
    d2[i] = (Q(i) * S(i, i)) * Q(i);
  }
  __syncthreads();
  // distance from the whole set (1 - row mean), needed only by an FPS first pick
  auto init_dist = [&] {
    for (int64_t i = threadIdx.x; i < K; i += blockDim.x) {
      double acc = 0.0;
      for (int64_t j = 0; j < K; ++j) acc += S(i, j);
      dist[i] = 1.0 - acc / static_cast<double>(K);
    }
    __syncthreads();
  };
  if (!dpp) init_dist();

  bool in_dpp = dpp;  // block-uniform: every thread computes the same decisions from the same reductions
  double tol = 0.0;
  if (in_dpp) {
    const Best max_diag = BlockArgmax([&](int64_t i) { return d2[i]; }, picked, K, shared);
    tol = eps * max_diag.value;
  }
  for (int64_t k = 0; k < n; ++k) {
    int64_t j = -1;
    double g = 0.0;
    if (in_dpp) {
      const Best best = BlockArgmax([&](int64_t i) { return d2[i]; }, picked, K, shared);
      if (best.value > tol) {
        j = best.index;
        g = best.value;
      } else {
        in_dpp = false;
        if (k == 0) init_dist();
      }
    }
    if (j < 0) j = BlockArgmax([&](int64_t i) { return Q(i) * dist[i]; }, picked, K, shared).index;
    if (in_dpp && k + 1 < n) {
      // w_ki = L_ji - sum_t (w_tj / g_t) w_ti, d_i^2 -= w_ki (w_ki / g_k) for every i (picked ones too: unused);
      // rows t < k are not written this step, and every read of d2 finished inside BlockArgmax
      for (int64_t i = threadIdx.x; i < K; i += blockDim.x) {
        double acc = (Q(j) * S(j, i)) * Q(i);
        for (int64_t t = 0; t < k; ++t) acc -= (w[t * K + j] / gain[t]) * w[t * K + i];
        w[k * K + i] = acc;
        d2[i] -= acc * (acc / g);
      }
      if (threadIdx.x == 0) gain[k] = g;
    }
    for (int64_t i = threadIdx.x; i < K; i += blockDim.x) {
      const double to_pick = 1.0 - S(i, j);
      dist[i] = k == 0 ? to_pick : fmin(dist[i], to_pick);
    }
    if (threadIdx.x == 0) {
      o[k] = j;
      picked[j] = 1;
    }
    __syncthreads();
  }
}

}  // namespace

at::Tensor DiverseSelectCuda(
    const at::Tensor& similarity,
    const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& quality,
    int64_t n,
    const std::string& method,
    double eps) {
  const SelectMethod m = CheckDiverseSelectArgs(similarity, scale, quality, n, method, eps);
  TORCH_CHECK(similarity.is_cuda(), "diverse_select (CUDA kernel): similarity must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(similarity.device());
  const int64_t B = similarity.size(0);
  const int64_t K = similarity.size(1);
  at::Tensor c, q;
  if (scale.has_value()) c = scale->to(at::kDouble).contiguous();
  if (quality.has_value()) q = quality->to(at::kDouble).contiguous();
  const auto f64 = similarity.options().dtype(at::kDouble);
  at::Tensor out = at::empty({B, n}, similarity.options().dtype(at::kLong));
  if (B == 0) return out;
  at::Tensor dist = at::empty({B, K}, f64);
  at::Tensor d2 = at::empty({B, K}, f64);
  at::Tensor w = at::empty({B, n, K}, f64);
  at::Tensor gain = at::empty({B, n}, f64);
  at::Tensor picked = at::empty({B, K}, similarity.options().dtype(at::kByte));
  int threads = 32;
  while (threads < K && threads < kMaxThreads) threads *= 2;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(similarity.scalar_type(), "diverse_select_cuda", [&] {
    DiverseSelectKernel<scalar_t><<<static_cast<unsigned int>(B), threads, 0, stream>>>(
        similarity.data_ptr<scalar_t>(), similarity.stride(0), similarity.stride(1), similarity.stride(2),
        c.defined() ? c.data_ptr<double>() : nullptr, q.defined() ? q.data_ptr<double>() : nullptr, K, n,
        m == SelectMethod::kDpp, eps, dist.data_ptr<double>(), d2.data_ptr<double>(), w.data_ptr<double>(),
        gain.data_ptr<double>(), picked.data_ptr<unsigned char>(), out.data_ptr<int64_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace silmm_fast
