// The per-token and per-batch math of the clipped PPO policy loss (docs/SPEC.md), shared by
// the CPU and the CUDA kernels. Everything here is __host__ __device__ and templated on an "Ops"
// policy, so the CPU instantiates it with at::vec::Vectorized lanes and the GPU with plain floats:
// what the GPU computes is the code the CPU tests check.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define PPO_HD __host__ __device__ __forceinline__
#else
#define PPO_HD inline
#endif

namespace ppo_ext {

enum class ImportanceSampling : int32_t { Token, Seq, SeqToken };

enum class LossAggMode : int32_t {
  TokenMean,
  TokenSum,
  SeqMeanTokenMean,
  SeqMeanTokenSum,
  SeqMeanTokenSumNorm,
};

// Layout of the `metrics` output (ppo_ext.METRIC_NAMES) and the `counts` output (ppo_ext.COUNT_NAMES).
enum Metric : int {
  kClipfrac,
  kClipfracLow,
  kClipfracHigh,
  kClipfracActive,
  kDualClipfrac,
  kApproxKl,
  kRatioMean,
  kRatioMin,
  kRatioMax,
  kNumMetrics,
};
enum Count : int {
  kValidTokens,
  kValidSeqs,
  kClippedLow,
  kClippedHigh,
  kClippedActive,
  kDualClipped,
  kNumCounts,
};

// Validated scalar options of one call.
struct LossOptions {
  ImportanceSampling importance_sampling;
  LossAggMode loss_agg_mode;
  double ratio_low;   // 1 - clip_low
  double ratio_high;  // 1 + clip_high
  bool has_dual_clip;
  double dual_clip;
  bool has_ratio_cap;
  double ratio_cap;  // the unclipped term's ratio is min(r, ratio_cap) (TRL's two-sided clip, `delta`)
  bool has_log_ratio_clamp;
  double log_ratio_clamp;
};

// A normaliser given by the caller as a number (`value`), or not given (the default applies).
// Tensor normalisers are read into `value` by the backend before `loss_denominator`.
struct Normaliser {
  bool given;
  double value;
};

// Sums over the valid tokens of a chunk (CPU) or a block (CUDA), combined in a fixed order.
struct Partials {
  double loss;               // sum of m * agg_weight * l
  double ratio_sum;          // sum of m * r
  double neg_log_ratio_sum;  // sum of m * -clamp(d), for approx_kl
  double ratio_min;
  double ratio_max;
  int64_t counts[kNumCounts];
};

namespace math {

PPO_HD float exp_(float x) { return expf(x); }
PPO_HD double exp_(double x) { return exp(x); }
PPO_HD float fma_(float a, float b, float c) { return fmaf(a, b, c); }
PPO_HD double fma_(double a, double b, double c) { return fma(a, b, c); }

// torch.maximum / torch.minimum: NaN in either operand gives NaN.
template <typename T>
PPO_HD T nan_maximum(T a, T b) { return (a != a || a > b) ? a : b; }
template <typename T>
PPO_HD T nan_minimum(T a, T b) { return (a != a || a < b) ? a : b; }

// The Ops policy for one value at a time (the CUDA kernels and the CPU's scalar steps).
template <typename T>
struct ScalarOps {
  using V = T;
  using Mask = bool;
  static PPO_HD T select(bool c, T a, T b) { return c ? a : b; }
  static PPO_HD T maximum(T a, T b) { return nan_maximum(a, b); }
  static PPO_HD T minimum(T a, T b) { return nan_minimum(a, b); }
  static PPO_HD T clamp(T x, T lo, T hi) { return nan_minimum(nan_maximum(x, lo), hi); }
  static PPO_HD T exp(T x) { return exp_(x); }
  static PPO_HD T neg(T x) { return -x; }
  // a * b + c rounded once (the online softmax of log_softmax.h, whose results must not depend on what the
  // compiler chose to contract).
  static PPO_HD T fmadd(T a, T b, T c) { return fma_(a, b, c); }
};

// The log-ratio that is exponentiated, clamped to [-K, K] when K is set, and whether the clamp lets the
// gradient through (as torch.clamp: inside the interval, bounds included).
template <typename V, typename Mask>
struct ClampedLogRatio {
  V value;
  bool clamped;  // whether a clamp was applied; `passes` is meaningful only then
  Mask passes;
};

template <typename Ops, typename V>
PPO_HD ClampedLogRatio<V, typename Ops::Mask> clamp_log_ratio(V log_ratio, const LossOptions& o) {
  using Mask = typename Ops::Mask;
  if (!o.has_log_ratio_clamp) return {log_ratio, false, Mask(0)};
  const V lo(-o.log_ratio_clamp), hi(o.log_ratio_clamp);
  return {Ops::clamp(log_ratio, lo, hi), true, static_cast<Mask>((log_ratio >= lo) & (log_ratio <= hi))};
}

template <typename V>
struct Ratio {
  V ratio;   // exp(clamped log-ratio)
  V dratio;  // d ratio / d log-ratio: the ratio, or 0 where the clamp is active
};

template <typename Ops, typename V, typename Mask>
PPO_HD Ratio<V> ratio_of(const ClampedLogRatio<V, Mask>& c) {
  const V r = Ops::exp(c.value);
  return {r, c.clamped ? Ops::select(c.passes, r, V(0)) : r};
}

template <typename V, typename Mask>
struct TokenTerms {
  V loss;          // w * l
  V dloss_dratio;  // w * dl/dr
  Mask clipped_low, clipped_high, clip_active, dual_clipped;
};

// The clipped surrogate of one token (docs/SPEC.md "Per-token loss") and its derivative w.r.t. the ratio,
// with the gradient an eager torch.maximum / torch.minimum / torch.clamp would give, ties included
// (a tie splits the gradient evenly between the two operands).
template <typename Ops, typename V>
PPO_HD TokenTerms<V, typename Ops::Mask> token_terms(V ratio, V adv, V weight, const LossOptions& o) {
  using Mask = typename Ops::Mask;
  const V zero(0), half(0.5), one(1);
  const V lo(o.ratio_low), hi(o.ratio_high);
  const V neg_adv = Ops::neg(adv);
  // L1 = -A min(r, C) with the ratio cap C (as torch.clamp(r, max=C): the gradient passes where r <= C).
  V capped_ratio = ratio, cap_passes = one;
  if (o.has_ratio_cap) {
    const V cap(o.ratio_cap);
    capped_ratio = Ops::minimum(ratio, cap);
    cap_passes = Ops::select(ratio <= cap, one, zero);
  }
  const V unclipped = neg_adv * capped_ratio;                              // L1
  const V clipped = neg_adv * Ops::clamp(ratio, lo, hi);                   // L2
  V loss = Ops::maximum(unclipped, clipped);
  const V share_unclipped = Ops::select(unclipped < clipped, zero, Ops::select(unclipped == clipped, half, one));
  const V share_clipped = Ops::select(unclipped > clipped, zero, Ops::select(unclipped == clipped, half, one));
  const V clamp_passes = Ops::select((ratio >= lo) & (ratio <= hi), one, zero);
  // The share of dl/dr = -A that reaches the ratio: 1, 0.5 at a tie, 0 where the clip or the cap is in force.
  V share = share_unclipped * cap_passes + share_clipped * clamp_passes;
  Mask dual_clipped(0);
  if (o.has_dual_clip) {
    const V cap = neg_adv * V(o.dual_clip);
    const Mask negative = adv < zero;
    const V share_loss = Ops::select(loss > cap, zero, Ops::select(loss == cap, half, one));
    dual_clipped = negative & (loss > cap);
    loss = Ops::select(negative, Ops::minimum(loss, cap), loss);
    share = Ops::select(negative, share * share_loss, share);
  }
  // Where no share reaches the ratio the derivative is exactly 0, as eager autograd's masked backward
  // gives it, even for a non-finite weight or advantage.
  const V dloss = Ops::select(share != zero, weight * neg_adv * share, zero);
  return {weight * loss, dloss, ratio < lo, ratio > hi, clipped > unclipped, dual_clipped};
}

// The weight of a row's tokens in the aggregated sum before the final division.
PPO_HD double row_agg_weight(LossAggMode mode, int64_t valid_tokens) {
  if (mode != LossAggMode::SeqMeanTokenMean) return 1.0;
  return valid_tokens > 0 ? 1.0 / static_cast<double>(valid_tokens) : 0.0;
}

// Sequence-level log-ratio: the masked mean of d over the row, 0 for a row with no valid token.
PPO_HD double row_mean_log_ratio(double sum_log_ratio, int64_t valid_tokens) {
  return valid_tokens > 0 ? sum_log_ratio / static_cast<double>(valid_tokens) : 0.0;
}

// A given normaliser's value, else the default. One read from a device tensor cannot be checked on the
// host without a synchronisation: an invalid one (negative, NaN, inf) makes the loss NaN instead of
// silently wrong. (Numbers, and tensors on the CPU, are checked before they get here.)
PPO_HD double given_or(Normaliser n, double otherwise) {
  if (!n.given) return otherwise;
  return n.value >= 0 && n.value < INFINITY ? n.value : NAN;
}

// The denominator of the aggregated loss (docs/SPEC.md "Aggregation").
PPO_HD double loss_denominator(LossAggMode mode, Normaliser num_tokens, Normaliser num_seqs,
                               Normaliser loss_scale_factor, int64_t valid_tokens, int64_t valid_seqs,
                               int64_t seq_len) {
  const double tokens = given_or(num_tokens, static_cast<double>(valid_tokens));
  const double seqs = given_or(num_seqs, static_cast<double>(valid_seqs));
  const double scale = given_or(loss_scale_factor, static_cast<double>(seq_len));
  switch (mode) {
    case LossAggMode::TokenMean: return tokens;
    case LossAggMode::TokenSum: return 1.0;
    case LossAggMode::SeqMeanTokenMean:
    case LossAggMode::SeqMeanTokenSum: return seqs;
    case LossAggMode::SeqMeanTokenSumNorm: return seqs * scale;
  }
  return 1.0;
}

PPO_HD void init_partials(Partials& p) {
  p.loss = p.ratio_sum = p.neg_log_ratio_sum = 0.0;
  p.ratio_min = INFINITY;
  p.ratio_max = -INFINITY;
  for (int k = 0; k < kNumCounts; ++k) p.counts[k] = 0;
}

PPO_HD void combine_partials(Partials& into, const Partials& p) {
  into.loss += p.loss;
  into.ratio_sum += p.ratio_sum;
  into.neg_log_ratio_sum += p.neg_log_ratio_sum;
  into.ratio_min = nan_minimum(into.ratio_min, p.ratio_min);
  into.ratio_max = nan_maximum(into.ratio_max, p.ratio_max);
  for (int k = 0; k < kNumCounts; ++k) into.counts[k] += p.counts[k];
}

// Loss, gradient scale (1/denominator, 0 for a zero denominator) and metrics from the batch sums.
template <typename acc_t>
PPO_HD void finalize(const Partials& s, double denominator, acc_t* loss, acc_t* grad_scale, float* metrics,
                     int64_t* counts) {
  const bool has_denominator = denominator != 0.0;
  *loss = has_denominator ? static_cast<acc_t>(s.loss / denominator) : acc_t(0);
  *grad_scale = has_denominator ? static_cast<acc_t>(1.0 / denominator) : acc_t(0);
  const int64_t n = s.counts[kValidTokens];
  const double inv_n = n > 0 ? 1.0 / static_cast<double>(n) : 0.0;
  metrics[kClipfracLow] = static_cast<float>(s.counts[kClippedLow] * inv_n);
  metrics[kClipfracHigh] = static_cast<float>(s.counts[kClippedHigh] * inv_n);
  metrics[kClipfrac] = static_cast<float>((s.counts[kClippedLow] + s.counts[kClippedHigh]) * inv_n);
  metrics[kClipfracActive] = static_cast<float>(s.counts[kClippedActive] * inv_n);
  metrics[kDualClipfrac] = static_cast<float>(s.counts[kDualClipped] * inv_n);
  metrics[kApproxKl] = static_cast<float>(s.neg_log_ratio_sum * inv_n);
  metrics[kRatioMean] = n > 0 ? static_cast<float>(s.ratio_sum * inv_n) : 1.0f;
  metrics[kRatioMin] = n > 0 ? static_cast<float>(s.ratio_min) : 1.0f;
  metrics[kRatioMax] = n > 0 ? static_cast<float>(s.ratio_max) : 1.0f;
  for (int k = 0; k < kNumCounts; ++k) counts[k] = s.counts[k];
}

}  // namespace math
}  // namespace ppo_ext
