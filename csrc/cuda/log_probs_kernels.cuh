// The CUDA kernels of ppo_ext::token_log_probs and its backward ops, and their launch configuration. Device
// code and plain host functions only, with no ATen (see kernel_common.cuh): nvcc compiles them for the GPU
// (log_probs_cuda.cu), the CPU simulator of tests/cuda_sim runs the same source on every test run.
//
// Forward, one kernel: a block takes whole rows (grid-stride, any number), its threads stream the row's
// vocabulary with 16-byte loads (8 bf16/fp16, 4 float32, 2 float64 values) through registers, each
// thread keeping the online max / sum-exp Stats of log_softmax.h (one exp per element, a rescale only
// when its max grows); the Stats are combined across the warp with shuffles and across warps in warp
// order (deterministic), and thread 0 writes the row's log-prob, log-sum-exp and entropy. The logits are
// read once.
// Backward, one kernel: the same rows, each element's gradient g * (onehot - exp(x - lse)) / temperature
// (plus, with an upstream gradient g_H of the entropy, its term -g_H p (log p + H) / temperature) computed
// from the saved log-sum-exp (and entropy) and written with 16-byte stores (into the logits themselves for the
// in-place op); a row with g == 0 (and g_H == 0) is zeros, written without reading its logits.
// Rows whose start is not 16-byte aligned (e.g. V odd) take scalar loads. No host synchronisation: a label
// out of [0, V) is not checked on the host, it gives a NaN log-prob (and no one-hot in the gradient).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "../log_softmax.h"
#include "kernel_common.cuh"

namespace ppo_ext::cuda {

constexpr int kMaxThreads = 256;
constexpr int kMaxWarps = kMaxThreads / kWarpSize;

// The shared math with the GPU's exp: float32 through the hardware ex2 (__expf: a few ulp, plus ~|x| 2^-22
// relative; the exponents here are offsets <= 0, and terms far below the max hardly count), float64 exact.
// (Only device code calls it; nvcc's host pass has no __expf.)
template <typename T>
struct GpuOps : math::ScalarOps<T> {};
template <>
struct GpuOps<float> : math::ScalarOps<float> {
  static __host__ __device__ __forceinline__ float exp(float x) {
#if defined(__CUDA_ARCH__) || defined(PPO_EXT_CUDA_SIM)
    return __expf(x);
#else
    return expf(x);
#endif
  }
};

struct LogitRows {
  const void* logits;
  int64_t B, T, V;
  int64_t stride_b, stride_t;
  const int64_t* labels;
  int64_t label_stride_b, label_stride_t;
  double inv_temperature;
};

struct LogProbsForwardArgs {
  LogitRows rows;
  void* log_probs;
  void* logsumexp;
  void* entropy;  // nullptr: not asked for
};

struct LogProbsBackwardArgs {
  LogitRows rows;
  const void* grad_log_probs;  // contiguous, accumulation type
  const void* logsumexp;       // contiguous, accumulation type
  const void* grad_entropy;    // contiguous, accumulation type; nullptr: no entropy term
  const void* entropy;         // the forward's entropy, with grad_entropy
  void* out;
  int64_t out_stride_b, out_stride_t;
};

template <typename scalar_t>
__device__ __forceinline__ const scalar_t* row_of(const LogitRows& r, int64_t k) {
  const int64_t i = k / r.T, t = k % r.T;
  return static_cast<const scalar_t*>(r.logits) + i * r.stride_b + t * r.stride_t;
}

__device__ __forceinline__ int64_t label_of(const LogitRows& r, int64_t k) {
  const int64_t i = k / r.T, t = k % r.T;
  return r.labels[i * r.label_stride_b + t * r.label_stride_t];
}

// Adds a group of raw logits (one pack, or one value) to a thread's Stats: the group is summed relative to
// max(running max, group max), apart (less rounding), then added; only when the max grew are the running
// sums rescaled (softmax::combine, a second exp).
template <bool kEntropy, typename Ops, typename acc_t, int N>
__device__ __forceinline__ void add_group(softmax::Stats<acc_t>& s, const acc_t (&raw)[N], acc_t inv_t) {
  acc_t raw_max = raw[0];
#pragma unroll
  for (int j = 1; j < N; ++j) raw_max = math::nan_maximum(raw_max, raw[j]);
  const acc_t m = math::nan_maximum(s.max, raw_max);
  const acc_t shift = softmax::shift_of<Ops>(m);
  softmax::Stats<acc_t> group{m, acc_t(0), acc_t(0)};
#pragma unroll
  for (int j = 0; j < N; ++j) softmax::accumulate<kEntropy, Ops>(group, softmax::offset_of(raw[j], shift, inv_t));
  if (m == s.max) {
    s.sum = s.sum + group.sum;
    if (kEntropy) s.xsum = s.xsum + group.xsum;
  } else {
    s = softmax::combine<kEntropy, Ops>(s, group, inv_t);
  }
}

// The block's Stats, valid in thread 0: warp shuffles, then warp 0's lane results in warp order.
template <bool kEntropy, typename Ops, typename acc_t>
__device__ softmax::Stats<acc_t> block_stats(softmax::Stats<acc_t> s, softmax::Stats<acc_t>* scratch, acc_t inv_t) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    const softmax::Stats<acc_t> other{__shfl_down_sync(0xffffffffu, s.max, offset),
                                      __shfl_down_sync(0xffffffffu, s.sum, offset),
                                      __shfl_down_sync(0xffffffffu, s.xsum, offset)};
    s = softmax::combine<kEntropy, Ops>(s, other, inv_t);
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();  // the scratch of the previous row has been read
  if (lane == 0) scratch[warp] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < static_cast<int>(blockDim.x / 32); ++w) s = softmax::combine<kEntropy, Ops>(s, scratch[w], inv_t);
  }
  return s;
}

template <typename scalar_t, typename acc_t, bool kEntropy>
__global__ void __launch_bounds__(kMaxThreads) token_log_probs_kernel(const LogProbsForwardArgs a) {
  using Ops = GpuOps<acc_t>;
  using P = Pack<scalar_t>;
  __shared__ softmax::Stats<acc_t> scratch[kMaxWarps];
  const LogitRows& r = a.rows;
  const int64_t rows = r.B * r.T, V = r.V;
  const acc_t inv_t = static_cast<acc_t>(r.inv_temperature);
  for (int64_t k = blockIdx.x; k < rows; k += gridDim.x) {
    const scalar_t* x = row_of<scalar_t>(r, k);
    softmax::Stats<acc_t> s = softmax::empty_stats<acc_t>();
    const int64_t v_vec = aligned16(x) ? V / P::kSize * P::kSize : 0;
#pragma unroll 4  // several 16-byte loads in flight per thread
    for (int64_t v = static_cast<int64_t>(threadIdx.x) * P::kSize; v < v_vec; v += blockDim.x * P::kSize) {
      const P p = *reinterpret_cast<const P*>(x + v);
      acc_t raw[P::kSize];
#pragma unroll
      for (int j = 0; j < P::kSize; ++j) raw[j] = static_cast<acc_t>(widen(p.v[j]));
      add_group<kEntropy, Ops>(s, raw, inv_t);
    }
    for (int64_t v = v_vec + threadIdx.x; v < V; v += blockDim.x) {
      const acc_t raw[1] = {static_cast<acc_t>(widen(x[v]))};
      add_group<kEntropy, Ops>(s, raw, inv_t);
    }
    s = block_stats<kEntropy, Ops>(s, scratch, inv_t);
    if (threadIdx.x == 0) {
      const int64_t label = label_of(r, k);
      const acc_t label_logit = label >= 0 && label < V ? static_cast<acc_t>(widen(x[label])) : acc_t(NAN);
      const auto out = softmax::finish<acc_t>(s, label_logit - s.max, inv_t);
      static_cast<acc_t*>(a.log_probs)[k] = out.log_prob;
      static_cast<acc_t*>(a.logsumexp)[k] = out.logsumexp;
      if (kEntropy) static_cast<acc_t*>(a.entropy)[k] = out.entropy;
    }
  }
}

template <typename scalar_t, typename acc_t, bool kEntropy>
__global__ void __launch_bounds__(kMaxThreads) token_log_probs_backward_kernel(const LogProbsBackwardArgs a) {
  using Ops = GpuOps<acc_t>;
  using P = Pack<scalar_t>;
  const LogitRows& r = a.rows;
  const int64_t rows = r.B * r.T, V = r.V;
  const acc_t inv_t = static_cast<acc_t>(r.inv_temperature);
  for (int64_t k = blockIdx.x; k < rows; k += gridDim.x) {
    const int64_t i = k / r.T, t = k % r.T;
    scalar_t* out = static_cast<scalar_t*>(a.out) + i * a.out_stride_b + t * a.out_stride_t;
    const acc_t g = static_cast<const acc_t*>(a.grad_log_probs)[k];
    const acc_t g_entropy = kEntropy ? static_cast<const acc_t*>(a.grad_entropy)[k] : acc_t(0);
    const bool out_aligned = aligned16(out);
    if (g == acc_t(0) && g_entropy == acc_t(0)) {  // a masked or clipped token: zeros, without reading its logits
      const int64_t v_vec = out_aligned ? V / P::kSize * P::kSize : 0;
      P zero;
#pragma unroll
      for (int j = 0; j < P::kSize; ++j) zero.v[j] = narrow<scalar_t>(acc_t(0));
      for (int64_t v = static_cast<int64_t>(threadIdx.x) * P::kSize; v < v_vec; v += blockDim.x * P::kSize) {
        store_pack(out + v, zero);
      }
      for (int64_t v = v_vec + threadIdx.x; v < V; v += blockDim.x) out[v] = narrow<scalar_t>(acc_t(0));
      continue;
    }
    const scalar_t* x = row_of<scalar_t>(r, k);  // == out in place: each element is read before it is written
    const acc_t lse = static_cast<const acc_t*>(a.logsumexp)[k];
    const int64_t label = label_of(r, k);
    const acc_t coefficient = g * inv_t;
    const softmax::RowGrad<acc_t> c{-coefficient, -(g_entropy * inv_t),
                                    kEntropy ? static_cast<const acc_t*>(a.entropy)[k] : acc_t(0)};
    const int64_t v_vec = out_aligned && aligned16(x) ? V / P::kSize * P::kSize : 0;
    for (int64_t v = static_cast<int64_t>(threadIdx.x) * P::kSize; v < v_vec; v += blockDim.x * P::kSize) {
      const P p = *reinterpret_cast<const P*>(x + v);
      P q;
#pragma unroll
      for (int j = 0; j < P::kSize; ++j) {
        const acc_t scaled = softmax::scaled<Ops>(static_cast<acc_t>(widen(p.v[j])), inv_t);
        acc_t grad = softmax::logit_grad<kEntropy, Ops>(scaled, lse, c);
        if (v + j == label) grad += coefficient;
        q.v[j] = narrow<scalar_t>(grad);
      }
      store_pack(out + v, q);
    }
    for (int64_t v = v_vec + threadIdx.x; v < V; v += blockDim.x) {
      const acc_t scaled = softmax::scaled<Ops>(static_cast<acc_t>(widen(x[v])), inv_t);
      acc_t grad = softmax::logit_grad<kEntropy, Ops>(scaled, lse, c);
      if (v == label) grad += coefficient;
      out[v] = narrow<scalar_t>(grad);
    }
  }
}

// Launch configuration, shared by the host code (ops_host.h) and the simulator's tests.

// Threads per row: about 4+ packs per thread, a whole number of warps, at most kMaxThreads.
inline int log_probs_threads(int64_t V, int pack) {
  int threads = kWarpSize;
  while (threads < kMaxThreads && static_cast<int64_t>(threads) * pack * 4 < V) threads *= 2;
  return threads;
}

// Blocks: one per row up to 8 waves of the blocks resident on the GPU (2048 threads a multiprocessor),
// grid-stride beyond; rows > 0.
inline int log_probs_blocks(int64_t rows, int threads, int sm_count) {
  const int64_t resident = static_cast<int64_t>(sm_count) * (2048 / threads);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(rows, 8 * resident)));
}

}  // namespace ppo_ext::cuda
