// The per-token and per-batch math of the clipped PPO policy loss (docs/SPEC.md), shared by
// the CPU and the CUDA kernels. Everything here is __host__ __device__ and templated on an "Ops"
// policy, so the CPU instantiates it with at::vec::Vectorized lanes and the GPU with plain floats:
// what the GPU computes is the code the CPU tests check.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define PPO_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Forced: the per-token math is one vector expression per family, inlined into the kernel's loop (else a family
// switch too large for the inliner passes TokenInputs / TokenTerms of whole vectors through memory, ~3x slower).
#define PPO_HD inline __attribute__((always_inline))
#else
#define PPO_HD inline
#endif

namespace ppo_ext {

// The loss family (docs/SPEC.md "Loss families"): the clipped PPO surrogate and the other losses the
// frameworks register. Names in checks.cpp, ppo_ext/names.py LOSS_TYPES.
enum class LossType : int32_t { Vanilla, Cispo, Sapo, Gpg, Dro, DppoTv, DppoKl, GeoMean, Vespo, Value };

// Whether a family's gradient goes through the ratio (else it is its direct term w.r.t. lp alone, and the
// kernels never multiply by d ratio / d lp, which may be inf where the ratio overflows).
PPO_HD bool has_ratio_gradient(LossType t) {
  return t == LossType::Vanilla || t == LossType::Sapo || t == LossType::GeoMean;
}

// Whether the family has a ratio exp(lp - old): every family but the critic's value loss, where exp(v - v_old) would
// mean nothing; its ratio is 1 (not computed) and so are its ratio statistics.
PPO_HD bool has_ratio(LossType t) { return t != LossType::Value; }

enum class ImportanceSampling : int32_t { Token, Seq, SeqToken };

// The rollout correction (docs/SPEC.md "Rollout correction"): the unit whose ratio pi_old / pi_rollout is
// corrected (none, each token, the row's product, the row's geometric mean), how (truncated to the bounds, or
// masked outside them) and, when masked, what a kept token is weighted by (its unit's ratio or its own).
enum class RolloutIs : int32_t { None, Token, Seq, SeqMean };
enum class RolloutIsMode : int32_t { Truncate, Mask };
enum class RolloutIsMaskWeight : int32_t { Unit, Token };

// Whether the family reads a row statistic of the log-ratios, summed in the first pass: the sequence-level ratio
// (importance_sampling "seq", "seq-token"), or vespo's row log-weight.
PPO_HD bool has_row_log_ratio(LossType t, ImportanceSampling level) {
  return level != ImportanceSampling::Token || t == LossType::Vespo;
}

// Whether the rollout correction's weight multiplies the loss: for every family but vespo, whose row log-weight
// takes the log of it instead (TRL's get_gamma_weights).
PPO_HD bool rollout_weights_loss(LossType t) { return t != LossType::Vespo; }

// Whether the correction's unit is a row (its ratio from the row's sum of old - rollout, in the first pass).
PPO_HD bool is_row_level(RolloutIs level) { return level == RolloutIs::Seq || level == RolloutIs::SeqMean; }

// The estimator of the KL to the reference policy (docs/SPEC.md "KL to a reference policy"), from d = lp - ref:
// k1 = d, abs = |d|, k2 = d^2 / 2, k3 = exp(-d) + d - 1. Names in checks.cpp, ppo_ext/names.py KL_ESTIMATORS.
enum class KlEstimator : int32_t { K1, Abs, K2, K3 };

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
  kRolloutWeightMean,
  kRolloutWeightMin,
  kRolloutWeightMax,
  kRolloutFilteredFrac,
  kKl,
  kKlLoss,
  kNumMetrics,
};
enum Count : int {
  kValidTokens,
  kValidSeqs,
  kClippedLow,
  kClippedHigh,
  kClippedActive,
  kDualClipped,
  kRolloutFilteredTokens,
  kRolloutFilteredSeqs,
  kNumCounts,
};

// Validated scalar options of one call.
struct LossOptions {
  LossType loss_type;
  ImportanceSampling importance_sampling;
  LossAggMode loss_agg_mode;
  double clip_low, clip_high;  // the epsilons (dppo_*: the divergence thresholds; geo_mean: log-ratio bounds;
                               // value: the value clip range)
  double ratio_low;            // 1 - clip_low
  double ratio_high;           // 1 + clip_high
  bool has_dual_clip;
  double dual_clip;
  bool has_ratio_cap;
  double ratio_cap;  // vanilla: the unclipped term's ratio is min(r, C) (TRL's `delta`); dppo_*: the truncated ratio
  bool has_log_ratio_clamp;
  double log_ratio_clamp;
  double tau_pos, tau_neg;  // sapo's gate temperatures, for A > 0 and A <= 0
  double dro_beta;          // dro's quadratic penalty
  double vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg;  // vespo's Gamma weight, for A >= 0 and
                                                                        // A < 0
  RolloutIs rollout_is;
  RolloutIsMode rollout_is_mode;
  RolloutIsMaskWeight rollout_is_mask_weight;
  double rollout_is_low, rollout_is_high;  // the bounds (-inf / inf where not given)
  bool has_ref_kl;              // ref_log_probs given: the KL to the reference policy is computed
  double kl_coef;               // its coefficient in the loss (0: metrics only)
  KlEstimator kl_estimator;
  bool kl_straight_through;     // "+": the estimator's value with k2's gradient (verl's kl_penalty)
  double kl_clamp;              // the value clamped to [-kl_clamp, kl_clamp] (inf: not clamped)
  double kl_log_ratio_clamp;    // k3's lp - ref clamped to [-20, 20] first, as verl's (inf: not clamped)
  bool kl_bias_correction;      // times the loss's ratio, gradient through it (TRL's use_bias_correction_kl)
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
  double rollout_weight_sum;  // sum of m * rollout weight
  double rollout_weight_min;
  double rollout_weight_max;
  double ref_kl_sum;  // sum of m * the KL estimate, for the `kl` metric
  double ref_kl_agg;  // sum of m * agg_weight * the KL estimate: kl_loss before the division
  int64_t counts[kNumCounts];
};

namespace math {

PPO_HD float exp_(float x) { return expf(x); }
PPO_HD double exp_(double x) { return exp(x); }
PPO_HD float expm1_(float x) { return expm1f(x); }
PPO_HD double expm1_(double x) { return expm1(x); }
PPO_HD float log_(float x) { return logf(x); }
PPO_HD double log_(double x) { return log(x); }
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
  static PPO_HD T expm1(T x) { return expm1_(x); }
  static PPO_HD T log(T x) { return log_(x); }
  static PPO_HD T neg(T x) { return -x; }
  static PPO_HD bool mask_not(bool m) { return !m; }
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

// vespo's bounds (TRL's get_gamma_weights): a token's log-ratio is clamped to [-20, 20], the log of its rollout
// weight and the row's log-weight to [log(1e-8), 20].
constexpr double kVespoLogRatioBound = 20.0;
constexpr double kVespoLogWeightLow = -18.420680743952367;  // log(1e-8)

template <typename V>
struct LogRatioTerm {
  V value, derivative;  // derivative: w.r.t. the token's log-ratio d
};

// A token's term of the sequence-level log-ratio, the masked row mean of which is exponentiated: d itself, or
// for geo_mean GMPO's sign-aware clip sign(A) min(sign(A) d, sign(A) clamp(d, -eps_lo, eps_hi)), which is
// min(d, eps_hi) where A > 0, max(d, -eps_lo) where A < 0 and 0 where A = 0 (its derivative 1 where it is d,
// bounds included as torch.min's tie and torch.clamp's bound give it, else 0).
// For vespo, d clamped to [-20, 20] (the derivative unused: vespo's weight is a constant of the loss).
template <typename Ops, typename V>
PPO_HD LogRatioTerm<V> seq_log_ratio_term(V d, V adv, const LossOptions& o) {
  const V one(1);
  if (o.loss_type == LossType::Vespo) return {Ops::clamp(d, V(-kVespoLogRatioBound), V(kVespoLogRatioBound)), one};
  if (o.loss_type != LossType::GeoMean) return {d, one};
  const V zero(0), hi(o.clip_high), lo(-o.clip_low);
  const auto positive = adv > zero, negative = adv < zero;
  const V value = Ops::select(positive, Ops::minimum(d, hi), Ops::select(negative, Ops::maximum(d, lo), zero));
  const V derivative = Ops::select(positive, Ops::select(d <= hi, one, zero),
                                   Ops::select(negative, Ops::select(d >= lo, one, zero), zero));
  return {value, derivative};
}

template <typename V, typename Mask>
struct RolloutWeight {
  V weight;
  Mask filtered;  // the unit's ratio is outside the bounds
};

// The rollout-correction weight of a token, a constant of the loss: from the token's log-ratio old - rollout
// and its unit's (the token's own, or the row's sum or mean of them), exp(unit) truncated to [low, high], or
// exp(unit) (the token's own exp with RolloutIsMaskWeight::Token) where exp(unit) lies in [low, high], else 0.
template <typename Ops, typename V>
PPO_HD RolloutWeight<V, typename Ops::Mask> rollout_weight(V token_log_ratio, V unit_log_ratio, const LossOptions& o) {
  using Mask = typename Ops::Mask;
  const V lo(o.rollout_is_low), hi(o.rollout_is_high);
  const V unit = Ops::exp(unit_log_ratio);
  const Mask below = unit < lo, above = unit > hi;
  const Mask filtered = below | above;
  if (o.rollout_is_mode == RolloutIsMode::Truncate) return {Ops::clamp(unit, lo, hi), filtered};
  const V kept = o.rollout_is_mask_weight == RolloutIsMaskWeight::Token ? Ops::exp(token_log_ratio) : unit;
  const Mask keep = (unit >= lo) & (unit <= hi);
  return {Ops::select(keep, kept, V(0)), Ops::mask_not(keep)};
}

// The unit log-ratio of a row from the sum of its tokens' old - rollout (the product of the ratios, or their
// geometric mean); 0 for a row with no valid token.
PPO_HD double row_rollout_log_ratio(RolloutIs level, double sum, int64_t valid_tokens) {
  if (level == RolloutIs::SeqMean) return valid_tokens > 0 ? sum / static_cast<double>(valid_tokens) : 0.0;
  return sum;
}

// Whether the first pass sums a term of the rollout correction over the row (rollout_row_term).
PPO_HD bool has_row_rollout_sum(const LossOptions& o) {
  return is_row_level(o.rollout_is) || (o.loss_type == LossType::Vespo && o.rollout_is != RolloutIs::None);
}

// A valid token's term of that row sum, from its log-ratio old - rollout: itself (the row-level units), or for
// vespo (token level) the log of its correction weight clamped to [log(1e-8), 20], which joins the row's log-weight.
template <typename Ops, typename V>
PPO_HD V rollout_row_term(V rollout_log_ratio, const LossOptions& o) {
  if (o.loss_type != LossType::Vespo) return rollout_log_ratio;
  const V weight = rollout_weight<Ops>(rollout_log_ratio, rollout_log_ratio, o).weight;
  return Ops::clamp(Ops::log(weight), V(kVespoLogWeightLow), V(kVespoLogRatioBound));
}

// vespo's row log-weight log w: the sum of its valid tokens' clamped log-ratios (and rollout terms), clamped to
// [log(1e-8), 20]; 0 for a row with no valid token.
PPO_HD double vespo_row_log_weight(double sum) {
  return sum != sum ? sum : fmin(fmax(sum, kVespoLogWeightLow), kVespoLogRatioBound);
}

template <typename V>
struct Ratio {
  V ratio;   // exp(clamped log-ratio)
  V dratio;  // d ratio / d log-ratio: the ratio, or 0 where the clamp is active
};

// The ratio of a clamped log-ratio, given its exp r = exp(c.value) (computed apart by the CPU kernel).
template <typename Ops, typename V, typename Mask>
PPO_HD Ratio<V> ratio_with_exp(const ClampedLogRatio<V, Mask>& c, V r) {
  return {r, c.clamped ? Ops::select(c.passes, r, V(0)) : r};
}

template <typename Ops, typename V, typename Mask>
PPO_HD Ratio<V> ratio_of(const ClampedLogRatio<V, Mask>& c) {
  return ratio_with_exp<Ops>(c, Ops::exp(c.value));
}

// What the per-token loss of every family reads: the ratio (token or sequence level, after the log-ratio
// clamp), the token's log-probs, its unclamped log-ratio lp - old, its advantage, its weight and, for vespo, its
// row's Gamma weights for A >= 0 and A < 0 (vespo_row_weight, once per row).
template <typename V>
struct TokenInputs {
  V ratio, log_prob, old_log_prob, log_ratio, adv, weight, row_weight_pos, row_weight_neg;
};

// One token's weighted loss w * l and its derivative, split in two: through the ratio (the kernel applies
// d ratio / d log_prob, which depends on the importance-sampling level and the clamp) and directly w.r.t.
// the token's log-prob (the families whose loss is a stop-gradient weight times lp: cispo, gpg, dro, dppo_*).
// The counters are the family's (docs/SPEC.md "Loss families"); 0 where a family has none.
template <typename V, typename Mask>
struct TokenTerms {
  V loss;              // w * l
  V dloss_dratio;      // w * dl/dr
  V dloss_dlog_prob;   // w * dl/dlp at a fixed ratio
  Mask clipped_low, clipped_high, clip_active, dual_clipped;
};

// vanilla: the clipped surrogate (docs/SPEC.md "Per-token loss") and its derivative w.r.t. the ratio,
// with the gradient an eager torch.maximum / torch.minimum / torch.clamp would give, ties included
// (a tie splits the gradient evenly between the two operands).
template <typename Ops, typename V>
PPO_HD TokenTerms<V, typename Ops::Mask> vanilla_terms(const TokenInputs<V>& x, const LossOptions& o) {
  using Mask = typename Ops::Mask;
  const V zero(0), half(0.5), one(1);
  const V lo(o.ratio_low), hi(o.ratio_high);
  const V ratio = x.ratio, adv = x.adv;
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
  const V dloss = Ops::select(share != zero, x.weight * neg_adv * share, zero);
  return {x.weight * loss, dloss, zero, ratio < lo, ratio > hi, clipped > unclipped, dual_clipped};
}

// cispo: -sg(clip(r, lo, hi)) * A * lp; the gradient flows through lp only. Counters as vanilla's clip:
// below / above the bounds, and "active" where the clipped PPO surrogate would take the clipped term.
template <typename Ops, typename V>
PPO_HD TokenTerms<V, typename Ops::Mask> cispo_terms(const TokenInputs<V>& x, const LossOptions& o) {
  using Mask = typename Ops::Mask;
  const V zero(0), lo(o.ratio_low), hi(o.ratio_high);
  const V coefficient = x.weight * Ops::neg(x.adv) * Ops::clamp(x.ratio, lo, hi);
  const Mask low = x.ratio < lo, high = x.ratio > hi;
  const Mask active = (high & (x.adv > zero)) | (low & (x.adv < zero));
  return {coefficient * x.log_prob, zero, coefficient, low, high, active, Mask(0)};
}

// sapo: -A * sigmoid(tau (r - 1)) * 4 / tau, tau = tau_pos where A > 0, else tau_neg. No counters.
template <typename Ops, typename V>
PPO_HD TokenTerms<V, typename Ops::Mask> sapo_terms(const TokenInputs<V>& x, const LossOptions& o) {
  using Mask = typename Ops::Mask;
  const V zero(0), one(1), four(4);
  const V tau = Ops::select(x.adv > zero, V(o.tau_pos), V(o.tau_neg));
  const V gate = one / (one + Ops::exp(Ops::neg(tau * (x.ratio - one))));  // sigmoid(tau (r - 1))
  const V neg_adv = x.weight * Ops::neg(x.adv);
  return {neg_adv * (gate * (four / tau)), neg_adv * (four * gate * (one - gate)), zero, Mask(0), Mask(0), Mask(0),
          Mask(0)};
}

// gpg: -A * lp. dro: -(A lp - beta / 2 (lp - old)^2), on the unclamped log-ratio. No counters.
template <typename Ops, typename V>
PPO_HD TokenTerms<V, typename Ops::Mask> gpg_dro_terms(const TokenInputs<V>& x, const LossOptions& o) {
  using Mask = typename Ops::Mask;
  const V zero(0), half_beta(0.5 * o.dro_beta), beta(o.dro_beta);
  const V w = x.weight;
  if (o.loss_type == LossType::Gpg) {
    return {w * (Ops::neg(x.adv) * x.log_prob), zero, w * Ops::neg(x.adv), Mask(0), Mask(0), Mask(0), Mask(0)};
  }
  const V d = x.log_ratio;
  return {w * Ops::neg(x.log_prob * x.adv - half_beta * (d * d)), zero, w * Ops::neg(x.adv - beta * d), Mask(0),
          Mask(0), Mask(0), Mask(0)};
}

// dppo_tv / dppo_kl: -A * sg(min(r, C)) * lp on the tokens whose divergence from the old policy stays within
// the threshold on the side the advantage pushes (clip_high for A > 0, clip_low otherwise), 0 elsewhere.
// tv: p - p_old; kl: the binary KL p_old (old - lp) + (1 - p_old) log((1 - p_old + 1e-8) / (1 - p + 1e-8)),
// valid also where the move is away from that side (p <= p_old for A > 0). Counters: outside the threshold
// (clipped_high for A > 0, clipped_low otherwise, clip_active either), dual_clipped where r > C on a kept token.
template <typename Ops, typename V>
PPO_HD TokenTerms<V, typename Ops::Mask> dppo_terms(const TokenInputs<V>& x, const LossOptions& o) {
  using Mask = typename Ops::Mask;
  const V zero(0), one(1), tiny(1e-8), eps_low(o.clip_low), eps_high(o.clip_high);
  const V p = Ops::exp(x.log_prob), p_old = Ops::exp(x.old_log_prob);
  const Mask positive = x.adv > zero;
  Mask keep_positive, keep_negative;
  if (o.loss_type == LossType::DppoTv) {
    keep_positive = (p - p_old) <= eps_high;
    keep_negative = (p - p_old) >= Ops::neg(eps_low);
  } else {
    const V binary_kl = p_old * (x.old_log_prob - x.log_prob) +
                        (one - p_old) * Ops::log((one - p_old + tiny) / (one - p + tiny));
    keep_positive = (binary_kl <= eps_high) | (p <= p_old);
    keep_negative = (binary_kl <= eps_low) | (p >= p_old);
  }
  const Mask negative = Ops::mask_not(positive);
  const Mask keep = (positive & keep_positive) | (negative & keep_negative);
  const V truncated = o.has_ratio_cap ? Ops::minimum(x.ratio, V(o.ratio_cap)) : x.ratio;
  const V coefficient = x.weight * (Ops::neg(x.adv) * truncated * Ops::select(keep, one, zero));
  const Mask dropped = Ops::mask_not(keep);
  const Mask truncated_kept = o.has_ratio_cap ? keep & (x.ratio > V(o.ratio_cap)) : Mask(0);
  const Mask dropped_negative = dropped & negative, dropped_positive = dropped & positive;
  return {coefficient * x.log_prob, zero, coefficient, dropped_negative, dropped_positive, dropped, truncated_kept};
}

// geo_mean (GMPO): -A * R with R the row's ratio of seq_log_ratio_term (the gradient through it). Counters as
// verl's: a log-ratio outside [-eps_lo, eps_hi] with A > 0 (clipped_high, verl's pg_clipfrac) or A < 0
// (clipped_low, its pg_clipfrac_lower); clip_active where the sign-aware clip changed the term.
template <typename Ops, typename V>
PPO_HD TokenTerms<V, typename Ops::Mask> geo_mean_terms(const TokenInputs<V>& x, const LossOptions& o) {
  using Mask = typename Ops::Mask;
  const V zero(0), hi(o.clip_high), lo(-o.clip_low);
  const V neg_adv = x.weight * Ops::neg(x.adv);
  const Mask positive = x.adv > zero, negative = x.adv < zero;
  const Mask above = x.log_ratio > hi, below = x.log_ratio < lo;
  const Mask outside = above | below;
  const Mask outside_negative = outside & negative, outside_positive = outside & positive;
  const Mask active = (above & positive) | (below & negative);
  return {neg_adv * x.ratio, neg_adv, zero, outside_negative, outside_positive, active, Mask(0)};
}

// vespo's Gamma weight phi = exp(lambda + k log w - lambda w) of a row's log-weight log w (vespo_row_log_weight), with
// (k, lambda) = (k_pos, lambda_pos) for A >= 0 (`nonnegative`), else (k_neg, lambda_neg); a phi that is NaN or inf is
// 0 (TRL's nan_to_num). Computed once per row and sign, in acc_t.
template <typename acc_t>
PPO_HD acc_t vespo_row_weight(acc_t log_w, bool nonnegative, const LossOptions& o) {
  const acc_t k(nonnegative ? o.vespo_k_pos : o.vespo_k_neg);
  const acc_t lambda(nonnegative ? o.vespo_lambda_pos : o.vespo_lambda_neg);
  const acc_t phi = exp_(lambda + k * log_w - lambda * exp_(log_w));
  return phi < acc_t(INFINITY) ? phi : acc_t(0);
}

// vespo (TRL): -sg(phi) * A * lp with the row's Gamma weight for the sign of A (vespo_row_weight). No counters.
template <typename Ops, typename V>
PPO_HD TokenTerms<V, typename Ops::Mask> vespo_terms(const TokenInputs<V>& x, const LossOptions&) {
  using Mask = typename Ops::Mask;
  const V zero(0);
  const V phi = Ops::select(x.adv >= zero, x.row_weight_pos, x.row_weight_neg);
  const V coefficient = x.weight * (Ops::neg(phi) * x.adv);
  return {coefficient * x.log_prob, zero, coefficient, Mask(0), Mask(0), Mask(0), Mask(0)};
}

// value: the critic's clipped value loss, with the values v in place of lp, the old values in place of old and the
// returns R in place of A: 0.5 max((v - R)^2, (clamp(v, v_old - eps_lo, v_old + eps_hi) - R)^2), the gradient
// as eager torch.maximum (ties split) and torch.clamp (passing at its bounds) give it. Counters: v below / above
// the clip range, and clip_active where the clipped term is the larger (verl's vf_clipfrac).
template <typename Ops, typename V>
PPO_HD TokenTerms<V, typename Ops::Mask> value_terms(const TokenInputs<V>& x, const LossOptions& o) {
  using Mask = typename Ops::Mask;
  const V zero(0), half(0.5), one(1);
  const V v = x.log_prob, lo = x.old_log_prob - V(o.clip_low), hi = x.old_log_prob + V(o.clip_high);
  const V error = v - x.adv, clipped_error = Ops::clamp(v, lo, hi) - x.adv;
  const V unclipped = error * error, clipped = clipped_error * clipped_error;
  const V share_unclipped = Ops::select(unclipped < clipped, zero, Ops::select(unclipped == clipped, half, one));
  const V share_clipped = Ops::select(unclipped > clipped, zero, Ops::select(unclipped == clipped, half, one));
  const V clamp_passes = Ops::select((v >= lo) & (v <= hi), one, zero);
  const V dloss = x.weight * (share_unclipped * error + share_clipped * clamp_passes * clipped_error);
  const Mask below = v < lo, above = v > hi, active = clipped > unclipped;
  return {x.weight * (half * Ops::maximum(unclipped, clipped)), zero, dloss, below, above, active, Mask(0)};
}

template <typename V>
struct KlTerms {
  V value;       // the token's KL estimate
  V dlog_prob;   // its derivative w.r.t. lp at a fixed ratio
  V dratio;      // and w.r.t. the ratio (kl_bias_correction), 0 otherwise
};

// A token's KL to the reference policy (docs/SPEC.md "KL to a reference policy"), from its log-prob, the
// reference's and the loss's ratio: the estimator of d = lp - ref, its value clamped to [-kl_clamp, kl_clamp]
// (the gradient stopped outside, as torch.clamp), with "+" k2's gradient d instead (verl's straight-through
// kl_penalty, whose gradient ignores the clamp), and with kl_bias_correction times the ratio (TRL).
template <typename Ops, typename V>
PPO_HD KlTerms<V> ref_kl_terms(V log_prob, V ref_log_prob, V ratio, const LossOptions& o) {
  const V zero(0), one(1), half(0.5);
  const V d = log_prob - ref_log_prob;
  V value = d, derivative = one;
  switch (o.kl_estimator) {
    case KlEstimator::K1: break;
    case KlEstimator::Abs:  // torch.abs: gradient sgn(d), 0 at d = 0
      value = Ops::select(d < zero, Ops::neg(d), d);
      derivative = Ops::select(d > zero, one, Ops::select(d < zero, Ops::neg(one), zero));
      break;
    case KlEstimator::K2:
      value = half * (d * d);
      derivative = d;
      break;
    case KlEstimator::K3: {
      V x = d;  // verl clamps ref - lp to [-20, 20] before its exp: the KL is finite where lp = -inf
      V inside = one;
      if (o.kl_log_ratio_clamp < INFINITY) {
        const V bound(o.kl_log_ratio_clamp);
        inside = Ops::select((d >= Ops::neg(bound)) & (d <= bound), one, zero);
        x = Ops::clamp(d, Ops::neg(bound), bound);
      }
      // e^-x - 1 = ref / pi - 1 through expm1: k3 ~ x^2 / 2 and its derivative ~ x are small where the policy
      // is near the reference, and exp(-x) - 1 would lose them to cancellation in float32
      const V em1 = Ops::expm1(Ops::neg(x));
      value = em1 + x;
      derivative = inside * Ops::neg(em1);
      break;
    }
  }
  if (o.kl_clamp < INFINITY) {
    const V hi(o.kl_clamp), lo(-o.kl_clamp);
    derivative = Ops::select((value >= lo) & (value <= hi), derivative, zero);
    value = Ops::clamp(value, lo, hi);
  }
  if (o.kl_straight_through) derivative = d;
  if (o.kl_bias_correction) return {value * ratio, derivative * ratio, value};
  return {value, derivative, zero};
}

// Whether the gradient of the loss goes through the ratio: the family's, or the bias-corrected KL term's.
PPO_HD bool gradient_through_ratio(const LossOptions& o) {
  return ppo_ext::has_ratio_gradient(o.loss_type) || (o.has_ref_kl && o.kl_bias_correction && o.kl_coef != 0);
}

template <typename Ops, typename V>
PPO_HD TokenTerms<V, typename Ops::Mask> token_terms(const TokenInputs<V>& x, const LossOptions& o) {
  switch (o.loss_type) {
    case LossType::Cispo: return cispo_terms<Ops>(x, o);
    case LossType::Sapo: return sapo_terms<Ops>(x, o);
    case LossType::Gpg:
    case LossType::Dro: return gpg_dro_terms<Ops>(x, o);
    case LossType::DppoTv:
    case LossType::DppoKl: return dppo_terms<Ops>(x, o);
    case LossType::GeoMean: return geo_mean_terms<Ops>(x, o);
    case LossType::Vespo: return vespo_terms<Ops>(x, o);
    case LossType::Value: return value_terms<Ops>(x, o);
    case LossType::Vanilla: break;
  }
  return vanilla_terms<Ops>(x, o);
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

// Whether a row counts in kRolloutFilteredSeqs: a row-level correction, a valid token, and the row's unit outside
// the bounds (decided in acc_t, as its tokens' weights are).
template <typename acc_t>
PPO_HD bool rollout_row_filtered(const LossOptions& o, int64_t row_valid, acc_t row_unit_log_ratio) {
  return row_valid > 0 && is_row_level(o.rollout_is) &&
         rollout_weight<ScalarOps<acc_t>>(acc_t(0), row_unit_log_ratio, o).filtered;
}

PPO_HD void init_partials(Partials& p) {
  p.loss = p.ratio_sum = p.neg_log_ratio_sum = 0.0;
  p.ratio_min = INFINITY;
  p.ratio_max = -INFINITY;
  p.rollout_weight_sum = 0.0;
  p.rollout_weight_min = INFINITY;
  p.rollout_weight_max = -INFINITY;
  p.ref_kl_sum = p.ref_kl_agg = 0.0;
  for (int k = 0; k < kNumCounts; ++k) p.counts[k] = 0;
}

PPO_HD void combine_partials(Partials& into, const Partials& p) {
  into.loss += p.loss;
  into.ratio_sum += p.ratio_sum;
  into.neg_log_ratio_sum += p.neg_log_ratio_sum;
  into.ratio_min = nan_minimum(into.ratio_min, p.ratio_min);
  into.ratio_max = nan_maximum(into.ratio_max, p.ratio_max);
  into.rollout_weight_sum += p.rollout_weight_sum;
  into.rollout_weight_min = nan_minimum(into.rollout_weight_min, p.rollout_weight_min);
  into.rollout_weight_max = nan_maximum(into.rollout_weight_max, p.rollout_weight_max);
  into.ref_kl_sum += p.ref_kl_sum;
  into.ref_kl_agg += p.ref_kl_agg;
  for (int k = 0; k < kNumCounts; ++k) into.counts[k] += p.counts[k];
}

// Loss (the policy loss plus kl_coef times the KL loss), gradient scale (1/denominator, 0 for a zero denominator)
// and metrics from the batch sums. Without a rollout correction every weight is 1 (the kernels accumulate none).
template <typename acc_t>
PPO_HD void finalize(const Partials& s, double denominator, const LossOptions& o, acc_t* loss, acc_t* grad_scale,
                     float* metrics, int64_t* counts) {
  const bool has_denominator = denominator != 0.0;
  const double loss_sum = o.has_ref_kl && o.kl_coef != 0 ? s.loss + o.kl_coef * s.ref_kl_agg : s.loss;
  *loss = has_denominator ? static_cast<acc_t>(loss_sum / denominator) : acc_t(0);
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
  const bool weighted = o.rollout_is != RolloutIs::None && n > 0;
  metrics[kRolloutWeightMean] = weighted ? static_cast<float>(s.rollout_weight_sum * inv_n) : 1.0f;
  metrics[kRolloutWeightMin] = weighted ? static_cast<float>(s.rollout_weight_min) : 1.0f;
  metrics[kRolloutWeightMax] = weighted ? static_cast<float>(s.rollout_weight_max) : 1.0f;
  metrics[kRolloutFilteredFrac] = static_cast<float>(s.counts[kRolloutFilteredTokens] * inv_n);
  metrics[kKl] = static_cast<float>(s.ref_kl_sum * inv_n);
  metrics[kKlLoss] = has_denominator ? static_cast<float>(s.ref_kl_agg / denominator) : 0.0f;
  for (int k = 0; k < kNumCounts; ++k) counts[k] = s.counts[k];
}

}  // namespace math
}  // namespace ppo_ext
