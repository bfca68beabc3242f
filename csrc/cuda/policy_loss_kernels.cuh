// The CUDA kernels of ppo_ext::policy_loss and its backward, and their launch configuration. Device code
// and plain host functions only, with no ATen (see kernel_common.cuh): nvcc compiles them for the GPU
// (policy_loss_cuda.cu), the CPU simulator of tests/cuda_sim runs the same source on every test run.
//
// Forward, one kernel (after a 4-byte memset of its block counter):
// policy_loss_kernel: a block takes whole rows (grid-stride, so any B), computes each token's loss,
// counters and gradient with the shared math of policy_loss.h, writes the gradient, and leaves one
// Partials per block. Sequence-level ratios need the row's masked mean first, so a block reads a row
// in up to three passes (counts / log-ratio sum, loss, "seq" gradient); each pass streams the row once
// with coalesced loads. The last block to finish (it takes the last ticket of the block counter) then
// combines every block's Partials in block order, reads the normalisers (numbers or device tensors)
// and writes loss, metrics, counts and grad scale.
// Backward, one launch: grad_log_probs = grad_loss * grad_scale * token_grad.
// No atomics on floats, no host synchronisation: the result is bitwise the same from run to run on
// a given GPU (the grid depends only on B and the GPU's SM count).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "../policy_loss.h"
#include "kernel_common.cuh"

namespace ppo_ext::cuda {

constexpr int kThreads = 512;  // of the forward kernel
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kBackwardThreads = 256;

// A (B, T) view of an input in element strides; col_stride 0 broadcasts a per-row value.
struct StridedInput {
  const void* data = nullptr;  // nullptr: not given
  DType dtype = DType::F32;
  int64_t row_stride = 0;
  int64_t col_stride = 0;
};

// A 0-dim tensor of any real dtype, or a number, or nothing (the default applies).
struct DeviceNormaliser {
  const void* data = nullptr;
  DType dtype = DType::F32;
  bool given = false;
  double value = 0.0;
};

template <typename acc_t>
__device__ __forceinline__ acc_t load(const StridedInput& in, int64_t i, int64_t t, acc_t absent_value) {
  if (in.data == nullptr) return absent_value;
  return load_element<acc_t>(in.data, in.dtype, i * in.row_stride + t * in.col_stride);
}

// Non-zero = valid, compared in a precision that keeps every non-zero value of the mask's dtype non-zero
// (a float64 1e-300 is 0 as a float32).
__device__ __forceinline__ bool is_valid(const StridedInput& mask, int64_t i, int64_t t) {
  if (mask.data == nullptr) return true;
  const int64_t k = i * mask.row_stride + t * mask.col_stride;
  if (mask.dtype == DType::F64) return static_cast<const double*>(mask.data)[k] != 0.0;
  return load_element<float>(mask.data, mask.dtype, k) != 0.0f;
}

struct PolicyLossKernelArgs {
  StridedInput log_probs, old_log_probs, advantages, mask, token_weights, rollout_log_probs, ref_log_probs;
  int64_t B, T;
  LossOptions options;
  DeviceNormaliser num_tokens, num_seqs, loss_scale_factor;
  void* token_grad;            // (B, T) contiguous acc_t, or nullptr
  Partials* partials;          // one per block
  unsigned int* blocks_done;   // 0 at launch
  void* loss;                  // acc_t
  void* grad_scale;            // acc_t
  float* metrics;
  int64_t* counts;
};

// Token (i, t)'s term of the sequence-level log-ratio (math::seq_log_ratio_term), from its log-probs and
// advantage; the caller knows the token is valid.
template <typename acc_t>
__device__ __forceinline__ math::LogRatioTerm<acc_t> seq_term(const PolicyLossKernelArgs& a, int64_t i, int64_t t) {
  const acc_t lp = load<acc_t>(a.log_probs, i, t, 0);
  const acc_t adv = a.options.loss_type == LossType::GeoMean ? load<acc_t>(a.advantages, i, t, 0) : acc_t(0);
  return math::seq_log_ratio_term<math::ScalarOps<acc_t>>(lp - load<acc_t>(a.old_log_probs, i, t, lp), adv,
                                                          a.options);
}

// Deterministic block-wide sum: warp shuffles, then warp 0 over the warp totals, in a fixed order.
template <typename T>
__device__ T block_sum(T v, T* scratch) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T total = T(0);
  if (threadIdx.x == 0) {
    for (int w = 0; w < kWarps; ++w) total += scratch[w];
    scratch[0] = total;
  }
  __syncthreads();
  return scratch[0];
}

template <typename T, bool kMax>
__device__ T block_extreme(T v, T* scratch) {
  using math::nan_maximum;
  using math::nan_minimum;
  for (int offset = 16; offset > 0; offset /= 2) {
    const T other = __shfl_down_sync(0xffffffffu, v, offset);
    v = kMax ? nan_maximum(v, other) : nan_minimum(v, other);
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    T r = scratch[0];
    for (int w = 1; w < kWarps; ++w) r = kMax ? nan_maximum(r, scratch[w]) : nan_minimum(r, scratch[w]);
    scratch[0] = r;
  }
  __syncthreads();
  return scratch[0];
}

__device__ __forceinline__ Normaliser read_normaliser(const DeviceNormaliser& n) {
  if (n.data != nullptr) return {true, load_element<double>(n.data, n.dtype, 0)};
  return {n.given, n.value};
}

// Another block's Partials, read from L2 (bypassing this SM's L1, which is not coherent).
__device__ __forceinline__ Partials load_partials(const Partials* p) {
  static_assert(sizeof(Partials) % sizeof(unsigned long long) == 0, "Partials is read in 8-byte words");
  constexpr int kWords = sizeof(Partials) / sizeof(unsigned long long);
  unsigned long long words[kWords];
  const auto* src = reinterpret_cast<const unsigned long long*>(p);
  for (int k = 0; k < kWords; ++k) words[k] = __ldcg(src + k);
  Partials r;
  memcpy(&r, words, sizeof(Partials));
  return r;
}

// Run by the first warp of the last block: lane k combines partials k, k + 32, ... in order, then
// lane 0 combines the 32 lane results in order, so the sum is the same on every run.
template <typename acc_t>
__device__ void finalize_warp(const PolicyLossKernelArgs& a, int num_partials) {
  __shared__ Partials lane_totals[32];
  Partials total;
  math::init_partials(total);
  for (int b = threadIdx.x; b < num_partials; b += 32) math::combine_partials(total, load_partials(a.partials + b));
  lane_totals[threadIdx.x] = total;
  __syncwarp();
  if (threadIdx.x != 0) return;
  for (int lane = 1; lane < 32; ++lane) math::combine_partials(total, lane_totals[lane]);
  const double denominator = math::loss_denominator(
      a.options.loss_agg_mode, read_normaliser(a.num_tokens), read_normaliser(a.num_seqs),
      read_normaliser(a.loss_scale_factor), total.counts[kValidTokens], total.counts[kValidSeqs], a.T);
  math::finalize<acc_t>(total, denominator, a.options, static_cast<acc_t*>(a.loss),
                        static_cast<acc_t*>(a.grad_scale), a.metrics, a.counts);
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads) policy_loss_kernel(const PolicyLossKernelArgs a) {
  using Ops = math::ScalarOps<acc_t>;
  __shared__ double scratch_d[kWarps];
  __shared__ long long scratch_i[kWarps];
  const LossOptions& o = a.options;
  const bool seq_level = o.importance_sampling != ImportanceSampling::Token;
  const bool seq_grad = o.importance_sampling == ImportanceSampling::Seq && a.token_grad != nullptr;
  const bool ratio_grad = math::gradient_through_ratio(o);
  const bool kl_in_grad = o.has_ref_kl && o.kl_coef != 0;
  const acc_t kl_coef = static_cast<acc_t>(o.kl_coef);
  const bool rollout_on = o.rollout_is != RolloutIs::None;
  const bool rollout_seq = is_row_level(o.rollout_is);
  const bool row_log_ratio = has_row_log_ratio(o.loss_type, o.importance_sampling);
  const bool row_rollout_sum = math::has_row_rollout_sum(o);
  const bool weighting = rollout_weights_loss(o.loss_type);
  const bool needs_prepass = row_log_ratio || row_rollout_sum ||
                             (o.loss_agg_mode == LossAggMode::SeqMeanTokenMean && a.mask.data != nullptr);

  // This thread's sums over all the rows of this block. Its counts are 32-bit (summed as 64-bit over the block):
  // a thread sees at most ceil(B / grid) ceil(T / kThreads) tokens, below 2^28 for any batch whose log-probs fit
  // in a GPU's memory; 64-bit ones made the float32 kernel spill 276 bytes instead of 64 (ptxas, sm_90).
  acc_t loss = 0, ratio_sum = 0, kl_sum = 0;
  acc_t ratio_min = INFINITY, ratio_max = -INFINITY;
  acc_t ref_kl_sum = 0, ref_kl_agg = 0;
  int n_valid_seqs = 0, n_valid = 0, n_low = 0, n_high = 0, n_active = 0, n_dual = 0;
  acc_t rollout_sum = 0, rollout_min = INFINITY, rollout_max = -INFINITY;
  int n_filtered = 0, n_filtered_seqs = 0;

  for (int64_t i = blockIdx.x; i < a.B; i += gridDim.x) {
    // Pass 1: the row's valid tokens and, for a row statistic, the masked sums of its log-ratio and rollout terms.
    long long row_valid = a.T;
    double log_ratio_sum = 0, row_rollout_sum_value = 0;
    if (needs_prepass) {
      int count = 0;
      acc_t sum = 0, rollout = 0;
      for (int64_t t = threadIdx.x; t < a.T; t += kThreads) {
        if (!is_valid(a.mask, i, t)) continue;
        ++count;
        if (row_log_ratio) sum += seq_term<acc_t>(a, i, t).value;
        if (row_rollout_sum) {
          const acc_t lp = load<acc_t>(a.log_probs, i, t, 0);
          const acc_t rollout_log_ratio =
              load<acc_t>(a.old_log_probs, i, t, lp) - load<acc_t>(a.rollout_log_probs, i, t, 0);
          rollout += math::rollout_row_term<Ops>(rollout_log_ratio, o);
        }
      }
      row_valid = block_sum<long long>(count, scratch_i);
      if (row_log_ratio) log_ratio_sum = block_sum<double>(static_cast<double>(sum), scratch_d);
      if (row_rollout_sum) row_rollout_sum_value = block_sum<double>(static_cast<double>(rollout), scratch_d);
    }
    // The rollout correction's unit log-ratio of this row (sequence levels).
    const acc_t row_rollout =
        static_cast<acc_t>(math::row_rollout_log_ratio(o.rollout_is, row_rollout_sum_value, row_valid));
    // vespo's Gamma weights of the row's log-weight (its rollout terms included), for A >= 0 and A < 0.
    acc_t row_weight_pos = 0, row_weight_neg = 0;
    if (o.loss_type == LossType::Vespo) {
      const acc_t log_w = static_cast<acc_t>(math::vespo_row_log_weight(log_ratio_sum + row_rollout_sum_value));
      row_weight_pos = math::vespo_row_weight(log_w, true, o);
      row_weight_neg = math::vespo_row_weight(log_w, false, o);
    }
    const math::Ratio<acc_t> row_ratio = math::ratio_of<Ops>(
        math::clamp_log_ratio<Ops>(static_cast<acc_t>(math::row_mean_log_ratio(log_ratio_sum, row_valid)), o));
    const acc_t agg_weight = static_cast<acc_t>(math::row_agg_weight(o.loss_agg_mode, row_valid));
    acc_t* grad_row = a.token_grad ? static_cast<acc_t*>(a.token_grad) + i * a.T : nullptr;

    // Pass 2: the per-token loss, metrics, counters and (but for "seq") gradient.
    int row_count = 0;
    acc_t dloss_sum = 0;
    for (int64_t t = threadIdx.x; t < a.T; t += kThreads) {
      const bool valid = is_valid(a.mask, i, t);
      if (!valid) {
        if (grad_row != nullptr && !seq_grad) grad_row[t] = acc_t(0);
        continue;
      }
      const acc_t lp = load<acc_t>(a.log_probs, i, t, 0);
      const acc_t old = load<acc_t>(a.old_log_probs, i, t, lp);
      const auto log_ratio = math::clamp_log_ratio<Ops>(lp - old, o);
      const math::Ratio<acc_t> r = seq_level                   ? row_ratio
                                   : has_ratio(o.loss_type) ? math::ratio_of<Ops>(log_ratio)
                                                             : math::Ratio<acc_t>{1, 0};
      const acc_t adv = load<acc_t>(a.advantages, i, t, 0);
      acc_t weight = load<acc_t>(a.token_weights, i, t, 1);
      if (rollout_on) {  // the correction's weight, a constant of the loss, times the given weight
        const acc_t rollout_log_ratio = old - load<acc_t>(a.rollout_log_probs, i, t, 0);
        const auto rw = math::rollout_weight<Ops>(rollout_log_ratio, rollout_seq ? row_rollout : rollout_log_ratio, o);
        if (weighting) weight *= rw.weight;
        rollout_sum += rw.weight;
        rollout_min = math::nan_minimum(rollout_min, rw.weight);
        rollout_max = math::nan_maximum(rollout_max, rw.weight);
        n_filtered += rw.filtered;
      }
      const math::TokenInputs<acc_t> x{r.ratio, lp, old, lp - old, adv, weight, row_weight_pos, row_weight_neg};
      const auto terms = math::token_terms<Ops>(x, o);
      // d ratio / d lp: through this token's log-ratio term (seq-token's local gradient; 1 but for geo_mean)
      const acc_t dratio = r.dratio * math::seq_log_ratio_term<Ops>(lp - old, adv, o).derivative;
      acc_t dloss_dratio = terms.dloss_dratio, dloss_dlog_prob = terms.dloss_dlog_prob;
      if (o.has_ref_kl) {  // the KL to the reference: its own sums (not weighted), kl_coef times its gradient
        const auto kl = math::ref_kl_terms<Ops>(lp, load<acc_t>(a.ref_log_probs, i, t, 0), r.ratio, o);
        ref_kl_sum += kl.value;
        ref_kl_agg += agg_weight * kl.value;
        if (kl_in_grad) {
          dloss_dratio += kl_coef * kl.dratio;
          dloss_dlog_prob += kl_coef * kl.dlog_prob;
        }
      }
      loss += agg_weight * terms.loss;
      ratio_sum += r.ratio;
      kl_sum -= log_ratio.value;
      ratio_min = math::nan_minimum(ratio_min, r.ratio);
      ratio_max = math::nan_maximum(ratio_max, r.ratio);
      ++row_count;
      n_low += terms.clipped_low;
      n_high += terms.clipped_high;
      n_active += terms.clip_active;
      n_dual += terms.dual_clipped;
      if (seq_grad) {
        // The direct term now; pass 3 adds the gradient through the row's ratio.
        dloss_sum += agg_weight * dloss_dratio;
        grad_row[t] = agg_weight * dloss_dlog_prob;
      } else if (grad_row != nullptr) {
        const acc_t direct = agg_weight * dloss_dlog_prob;
        grad_row[t] = ratio_grad ? agg_weight * dloss_dratio * dratio + direct : direct;
      }
    }
    n_valid += row_count;
    if (!needs_prepass) row_valid = block_sum<long long>(row_count, scratch_i);
    if (threadIdx.x == 0) {
      n_valid_seqs += row_valid > 0;
      n_filtered_seqs += math::rollout_row_filtered(o, row_valid, row_rollout);
    }

    // Pass 3 ("seq"): every valid token u gets (sum_t m agg_weight dl/dr) * dr/ddbar / n (times the derivative
    // of its log-ratio term, for geo_mean), added to its direct term (each thread reads back the tokens it wrote
    // in pass 2).
    if (seq_grad) {
      const double row_dloss = block_sum<double>(static_cast<double>(dloss_sum), scratch_d);
      const acc_t coefficient =
          row_valid > 0 && ratio_grad ? static_cast<acc_t>(row_dloss * row_ratio.dratio / row_valid) : acc_t(0);
      const bool term_derivative = o.loss_type == LossType::GeoMean;
      for (int64_t t = threadIdx.x; t < a.T; t += kThreads) {
        if (!is_valid(a.mask, i, t)) {
          grad_row[t] = acc_t(0);
          continue;
        }
        grad_row[t] += term_derivative ? coefficient * seq_term<acc_t>(a, i, t).derivative : coefficient;
      }
    }
  }

  Partials p;
  p.loss = block_sum<double>(static_cast<double>(loss), scratch_d);
  p.ratio_sum = block_sum<double>(static_cast<double>(ratio_sum), scratch_d);
  p.neg_log_ratio_sum = block_sum<double>(static_cast<double>(kl_sum), scratch_d);
  p.ratio_min = block_extreme<double, false>(static_cast<double>(ratio_min), scratch_d);
  p.ratio_max = block_extreme<double, true>(static_cast<double>(ratio_max), scratch_d);
  p.rollout_weight_sum = block_sum<double>(static_cast<double>(rollout_sum), scratch_d);
  p.rollout_weight_min = block_extreme<double, false>(static_cast<double>(rollout_min), scratch_d);
  p.rollout_weight_max = block_extreme<double, true>(static_cast<double>(rollout_max), scratch_d);
  p.ref_kl_sum = block_sum<double>(static_cast<double>(ref_kl_sum), scratch_d);
  p.ref_kl_agg = block_sum<double>(static_cast<double>(ref_kl_agg), scratch_d);
  p.counts[kValidTokens] = block_sum<long long>(n_valid, scratch_i);
  p.counts[kValidSeqs] = block_sum<long long>(n_valid_seqs, scratch_i);
  p.counts[kClippedLow] = block_sum<long long>(n_low, scratch_i);
  p.counts[kClippedHigh] = block_sum<long long>(n_high, scratch_i);
  p.counts[kClippedActive] = block_sum<long long>(n_active, scratch_i);
  p.counts[kDualClipped] = block_sum<long long>(n_dual, scratch_i);
  p.counts[kRolloutFilteredTokens] = block_sum<long long>(n_filtered, scratch_i);
  p.counts[kRolloutFilteredSeqs] = block_sum<long long>(n_filtered_seqs, scratch_i);

  // Publish this block's partials, then take a ticket; the block with the last ticket sees every
  // block's partials (each was fenced before its ticket: release; the last block fences after it: acquire,
  // which the barrier below extends to its other threads) and finalizes.
  __shared__ bool is_last_block;
  if (threadIdx.x == 0) {
    a.partials[blockIdx.x] = p;
    __threadfence();
    const bool last = atomicAdd(a.blocks_done, 1u) == gridDim.x - 1;
    if (last) __threadfence();
    is_last_block = last;
  }
  __syncthreads();
  if (is_last_block && threadIdx.x < 32) finalize_warp<acc_t>(a, gridDim.x);
}

template <typename acc_t, typename out_t>
__global__ void __launch_bounds__(kBackwardThreads)
    policy_loss_backward_kernel(const void* grad_loss, DType grad_loss_dtype, const acc_t* grad_scale,
                                const acc_t* token_grad, out_t* grad_log_probs, int64_t numel) {
  const acc_t scale = load_element<acc_t>(grad_loss, grad_loss_dtype, 0) * grad_scale[0];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < numel; k += stride) {
    grad_log_probs[k] = narrow<out_t>(token_grad[k] * scale);
  }
}

// Launch configuration, shared by the host code (ops_host.h) and the simulator's tests.

// Blocks of the forward: one per row up to 4 per multiprocessor (grid-stride beyond), and at least one,
// which finalizes even when B = 0.
inline int policy_loss_blocks(int64_t B, int sm_count) {
  return static_cast<int>(std::clamp<int64_t>(B, 1, 4LL * sm_count));
}

// The forward's workspace: one Partials per block, then the 4-byte block counter, zeroed before the launch.
struct PolicyLossWorkspace {
  int64_t counter_offset;  // bytes from the start; the Partials start at 0
  int64_t bytes;
};
inline PolicyLossWorkspace policy_loss_workspace(int blocks) {
  const int64_t partials = blocks * static_cast<int64_t>(sizeof(Partials));
  return {partials, partials + static_cast<int64_t>(sizeof(unsigned int))};
}

// Blocks of the backward (numel > 0): one element per thread up to 8 blocks per multiprocessor, grid-stride beyond.
inline int policy_loss_backward_blocks(int64_t numel, int sm_count) {
  return static_cast<int>(std::min<int64_t>((numel + kBackwardThreads - 1) / kBackwardThreads, 8LL * sm_count));
}

}  // namespace ppo_ext::cuda
