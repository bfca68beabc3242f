// The CUDA implementation of ppo_ext::token_log_probs and its backward ops (TORCH_LIBRARY_IMPL(ppo_ext, CUDA)).
//
// Forward, one kernel: a block takes whole rows (grid-stride, any number), its threads stream the row's
// vocabulary with 16-byte loads (8 bf16/fp16, 4 float32, 2 float64 values) through registers, each
// thread keeping the online max / sum-exp Stats of log_softmax.h (one exp per element, a rescale only
// when its max grows); the Stats are combined across the warp with shuffles and across warps in warp
// order (deterministic), and thread 0 writes the row's log-prob, log-sum-exp and entropy. The logits are
// read once.
// Backward, one kernel: the same rows, each element's gradient g * (onehot - exp(x - lse)) / temperature
// computed from the saved log-sum-exp and written with 16-byte stores (into the logits themselves for the
// in-place op); a row with g == 0 is zeros, written without reading its logits.
// Rows whose start is not 16-byte aligned (e.g. V odd) take scalar loads. No host synchronisation: a label
// out of [0, V) is not checked on the host, it gives a NaN log-prob (and no one-hot in the gradient).
#include <algorithm>
#include <cstdint>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../log_softmax.h"
#include "../ops.h"

namespace ppo_ext::cuda {
namespace {

constexpr int kMaxThreads = 256;
constexpr int kMaxWarps = kMaxThreads / 32;

// The shared math with the GPU's exp: float32 through the hardware ex2 (__expf: a few ulp, plus ~|x| 2^-22
// relative; the exponents here are x - max <= 0, and terms far below the max hardly count), float64 exact.
template <typename T>
struct GpuOps : math::ScalarOps<T> {};
template <>
struct GpuOps<float> : math::ScalarOps<float> {
  static __host__ __device__ __forceinline__ float exp(float x) {
#if defined(__CUDA_ARCH__)
    return __expf(x);
#else
    return expf(x);
#endif
  }
};

struct Rows {
  const void* logits;
  int64_t B, T, V;
  int64_t stride_b, stride_t;
  const int64_t* labels;
  int64_t label_stride_b, label_stride_t;
  double inv_temperature;
};

struct ForwardArgs {
  Rows rows;
  void* log_probs;
  void* logsumexp;
  void* entropy;  // nullptr: not asked for
};

struct BackwardArgs {
  Rows rows;
  const void* grad_log_probs;  // contiguous, accumulation type
  const void* logsumexp;       // contiguous, accumulation type
  void* out;
  int64_t out_stride_b, out_stride_t;
};

// 16 bytes of a row.
template <typename scalar_t>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(scalar_t);
  scalar_t v[kSize];
};

template <typename scalar_t>
__device__ __forceinline__ const scalar_t* row_of(const Rows& r, int64_t k) {
  const int64_t i = k / r.T, t = k % r.T;
  return static_cast<const scalar_t*>(r.logits) + i * r.stride_b + t * r.stride_t;
}

__device__ __forceinline__ int64_t label_of(const Rows& r, int64_t k) {
  const int64_t i = k / r.T, t = k % r.T;
  return r.labels[i * r.label_stride_b + t * r.label_stride_t];
}

__device__ __forceinline__ bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Adds a group of raw logits (one pack, or one value) to a thread's Stats: the group is summed relative to
// max(running max, group max / temperature), apart (less rounding), then added; only when the max grew are
// the running sums rescaled (softmax::combine, a second exp). Offsets are one fused multiply-add each (see
// softmax::accumulate).
template <bool kEntropy, typename Ops, typename acc_t, int N>
__device__ __forceinline__ void add_group(softmax::Stats<acc_t>& s, const acc_t (&raw)[N], acc_t inv_t) {
  acc_t raw_max = raw[0];
#pragma unroll
  for (int j = 1; j < N; ++j) raw_max = math::nan_maximum(raw_max, raw[j]);
  const acc_t m = math::nan_maximum(s.max, raw_max * inv_t);  // x * inv_t is monotone in x
  const acc_t neg_shift = -softmax::shift_of<Ops>(m);
  softmax::Stats<acc_t> group{m, acc_t(0), acc_t(0)};
#pragma unroll
  for (int j = 0; j < N; ++j) softmax::accumulate<kEntropy, Ops>(group, Ops::fmadd(raw[j], inv_t, neg_shift));
  if (m == s.max) {
    s.sum = s.sum + group.sum;
    if (kEntropy) s.xsum = s.xsum + group.xsum;
  } else {
    s = softmax::combine<kEntropy, Ops>(s, group);
  }
}

// The block's Stats, valid in thread 0: warp shuffles, then warp 0's lane results in warp order.
template <bool kEntropy, typename Ops, typename acc_t>
__device__ softmax::Stats<acc_t> block_stats(softmax::Stats<acc_t> s, softmax::Stats<acc_t>* scratch) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    const softmax::Stats<acc_t> other{__shfl_down_sync(0xffffffffu, s.max, offset),
                                      __shfl_down_sync(0xffffffffu, s.sum, offset),
                                      __shfl_down_sync(0xffffffffu, s.xsum, offset)};
    s = softmax::combine<kEntropy, Ops>(s, other);
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();  // the scratch of the previous row has been read
  if (lane == 0) scratch[warp] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < static_cast<int>(blockDim.x / 32); ++w) s = softmax::combine<kEntropy, Ops>(s, scratch[w]);
  }
  return s;
}

template <typename scalar_t, typename acc_t, bool kEntropy>
__global__ void __launch_bounds__(kMaxThreads) token_log_probs_kernel(const ForwardArgs a) {
  using Ops = GpuOps<acc_t>;
  using P = Pack<scalar_t>;
  __shared__ softmax::Stats<acc_t> scratch[kMaxWarps];
  const Rows& r = a.rows;
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
      for (int j = 0; j < P::kSize; ++j) raw[j] = static_cast<acc_t>(p.v[j]);
      add_group<kEntropy, Ops>(s, raw, inv_t);
    }
    for (int64_t v = v_vec + threadIdx.x; v < V; v += blockDim.x) {
      const acc_t raw[1] = {static_cast<acc_t>(x[v])};
      add_group<kEntropy, Ops>(s, raw, inv_t);
    }
    s = block_stats<kEntropy, Ops>(s, scratch);
    if (threadIdx.x == 0) {
      const int64_t label = label_of(r, k);
      const acc_t label_offset =
          label >= 0 && label < V ? Ops::fmadd(static_cast<acc_t>(x[label]), inv_t, -s.max) : acc_t(NAN);
      const auto out = softmax::finish<acc_t>(s, label_offset);
      static_cast<acc_t*>(a.log_probs)[k] = out.log_prob;
      static_cast<acc_t*>(a.logsumexp)[k] = out.logsumexp;
      if (kEntropy) static_cast<acc_t*>(a.entropy)[k] = out.entropy;
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads) token_log_probs_backward_kernel(const BackwardArgs a) {
  using Ops = GpuOps<acc_t>;
  using P = Pack<scalar_t>;
  const Rows& r = a.rows;
  const int64_t rows = r.B * r.T, V = r.V;
  const acc_t inv_t = static_cast<acc_t>(r.inv_temperature);
  for (int64_t k = blockIdx.x; k < rows; k += gridDim.x) {
    const int64_t i = k / r.T, t = k % r.T;
    scalar_t* out = static_cast<scalar_t*>(a.out) + i * a.out_stride_b + t * a.out_stride_t;
    const acc_t g = static_cast<const acc_t*>(a.grad_log_probs)[k];
    const bool out_aligned = aligned16(out);
    if (g == acc_t(0)) {  // a masked or clipped token: zeros, without reading its logits
      const int64_t v_vec = out_aligned ? V / P::kSize * P::kSize : 0;
      P zero;
#pragma unroll
      for (int j = 0; j < P::kSize; ++j) zero.v[j] = scalar_t(0);
      for (int64_t v = static_cast<int64_t>(threadIdx.x) * P::kSize; v < v_vec; v += blockDim.x * P::kSize) {
        *reinterpret_cast<P*>(out + v) = zero;
      }
      for (int64_t v = v_vec + threadIdx.x; v < V; v += blockDim.x) out[v] = scalar_t(0);
      continue;
    }
    const scalar_t* x = row_of<scalar_t>(r, k);  // == out in place: each element is read before it is written
    const acc_t lse = static_cast<const acc_t*>(a.logsumexp)[k];
    const int64_t label = label_of(r, k);
    const acc_t coefficient = g * inv_t, neg_coefficient = -coefficient;
    const int64_t v_vec = out_aligned && aligned16(x) ? V / P::kSize * P::kSize : 0;
    for (int64_t v = static_cast<int64_t>(threadIdx.x) * P::kSize; v < v_vec; v += blockDim.x * P::kSize) {
      const P p = *reinterpret_cast<const P*>(x + v);
      P q;
#pragma unroll
      for (int j = 0; j < P::kSize; ++j) {
        acc_t grad = softmax::softmax_grad<Ops>(static_cast<acc_t>(p.v[j]) * inv_t, lse, neg_coefficient);
        if (v + j == label) grad += coefficient;
        q.v[j] = static_cast<scalar_t>(grad);
      }
      *reinterpret_cast<P*>(out + v) = q;
    }
    for (int64_t v = v_vec + threadIdx.x; v < V; v += blockDim.x) {
      acc_t grad = softmax::softmax_grad<Ops>(static_cast<acc_t>(x[v]) * inv_t, lse, neg_coefficient);
      if (v == label) grad += coefficient;
      out[v] = static_cast<scalar_t>(grad);
    }
  }
}

int sm_count(int device) {
  static int counts[64] = {};
  int n = device < 64 ? counts[device] : 0;
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    if (device < 64) counts[device] = n;
  }
  return n;
}

// Threads per row: about 4+ packs per thread, a whole number of warps, at most kMaxThreads.
int threads_for(int64_t V, int pack) {
  int threads = 32;
  while (threads < kMaxThreads && static_cast<int64_t>(threads) * pack * 4 < V) threads *= 2;
  return threads;
}

Rows rows_of(const at::Tensor& logits, const at::Tensor& labels, const LogitsLayout& l, double temperature) {
  return {logits.const_data_ptr(), l.B, l.T, l.V, l.stride_b, l.stride_t, labels.const_data_ptr<int64_t>(),
          l.label_stride_b, l.label_stride_t, 1.0 / temperature};
}

int blocks_for(int64_t rows, int threads, int device) {
  const int64_t resident = static_cast<int64_t>(sm_count(device)) * (2048 / threads);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(rows, 8 * resident)));
}

TokenLogProbsOutputs token_log_probs_cuda(const at::Tensor& logits, const at::Tensor& labels, double temperature,
                                          bool compute_entropy, bool /*inplace_backward: for the autograd formula*/) {
  const LogitsLayout layout = check_token_log_probs_args(logits, labels, temperature);
  const c10::cuda::CUDAGuard guard(logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto [log_probs, logsumexp, entropy] = empty_token_log_probs_outputs(logits, labels, compute_entropy);
  const int64_t rows = layout.B * layout.T;
  if (rows == 0) return {log_probs, logsumexp, entropy};
  ForwardArgs args{rows_of(logits, labels, layout, temperature), log_probs.mutable_data_ptr(),
                   logsumexp.mutable_data_ptr(), compute_entropy ? entropy.mutable_data_ptr() : nullptr};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ppo_ext_token_log_probs_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int threads = threads_for(layout.V, Pack<scalar_t>::kSize);
    const int blocks = blocks_for(rows, threads, logits.get_device());
    if (compute_entropy) {
      token_log_probs_kernel<scalar_t, acc_t, true><<<blocks, threads, 0, stream>>>(args);
    } else {
      token_log_probs_kernel<scalar_t, acc_t, false><<<blocks, threads, 0, stream>>>(args);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {log_probs, logsumexp, entropy};
}

void run_backward(const at::Tensor& grad_log_probs, const at::Tensor& logits, const at::Tensor& labels,
                  const at::Tensor& logsumexp, double temperature, const LogitsLayout& layout, void* out,
                  int64_t out_stride_b, int64_t out_stride_t) {
  const int64_t rows = layout.B * layout.T;
  if (rows == 0 || layout.V == 0) return;
  const auto acc = acc_type_for(logits.scalar_type());
  const at::Tensor grad = grad_log_probs.to(acc).contiguous();  // e.g. the expanded gradient of a sum()
  const at::Tensor lse = logsumexp.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  BackwardArgs args{rows_of(logits, labels, layout, temperature), grad.const_data_ptr(), lse.const_data_ptr(), out,
                    out_stride_b, out_stride_t};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                  "ppo_ext_token_log_probs_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int threads = threads_for(layout.V, Pack<scalar_t>::kSize);
    token_log_probs_backward_kernel<scalar_t, acc_t>
        <<<blocks_for(rows, threads, logits.get_device()), threads, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor token_log_probs_backward_cuda(const at::Tensor& grad_log_probs, const at::Tensor& logits,
                                         const at::Tensor& labels, const at::Tensor& logsumexp, double temperature) {
  const LogitsLayout layout =
      check_token_log_probs_backward_args(grad_log_probs, logits, labels, logsumexp, temperature);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor grad_logits = at::empty(logits.sizes(), logits.options());  // contiguous
  run_backward(grad_log_probs, logits, labels, logsumexp, temperature, layout, grad_logits.mutable_data_ptr(),
               layout.T * layout.V, logits.dim() == 3 ? layout.V : 0);
  return grad_logits;
}

void token_log_probs_backward_inplace_cuda(const at::Tensor& grad_log_probs, const at::Tensor& logits,
                                           const at::Tensor& labels, const at::Tensor& logsumexp,
                                           double temperature) {
  const LogitsLayout layout =
      check_token_log_probs_backward_args(grad_log_probs, logits, labels, logsumexp, temperature);
  check_writable_logits(logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  run_backward(grad_log_probs, logits, labels, logsumexp, temperature, layout, logits.mutable_data_ptr(),
               layout.stride_b, layout.stride_t);
}

}  // namespace

TORCH_LIBRARY_IMPL(ppo_ext, CUDA, m) {
  m.impl("token_log_probs", &token_log_probs_cuda);
  m.impl("token_log_probs_backward", &token_log_probs_backward_cuda);
  m.impl("token_log_probs_backward_inplace", &token_log_probs_backward_inplace_cuda);
}

}  // namespace ppo_ext::cuda
