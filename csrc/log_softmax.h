// The per-row math of log_softmax without materialising it, shared by the CPU and the CUDA kernels of
// ppo_ext::token_log_probs (as policy_loss.h is for the loss): an online max / sum-exp over a row of raw
// logits x at temperature T (inv_t = 1 / T), from which come the log-sum-exp, the log-prob of the taken
// token and the entropy of softmax(x / T), and the per-element gradient of the backward.
//
// Stats of a set of raw values x: their max M (raw units), and with offsets d = (x - M) * inv_t,
// S = sum exp(d), W = sum exp(d) * d. Then
//   logsumexp = M * inv_t + log S,   log_prob(label) = (x_label - M) * inv_t - log S,   entropy = log S - W / S.
// The max is taken, and the offsets formed, on the raw logits: x - M is <= 0 for every x <= M (and exactly 0
// at the max) however large the logits, so no exp overflows; scaling the max first (M * inv_t rounded)
// and each offset unrounded made the largest offset up to half an ulp of M / T, which overflows exp for
// logits of ~1.5e9 (float32) at T != 1. The backward's element gradient (logit_grad) takes the entropy's
// term too when the entropy has an upstream gradient (an entropy bonus): dH/dx = -p (log p + H) / T, in the
// same pass. W is taken relative to the max, so the entropy has no
// cancellation between two large numbers. Stats combine in any grouping (per lane, per tile, per
// thread, per warp), which is what the kernels do, in a fixed order (deterministic).
// -inf logits (masked vocabulary) contribute nothing, NaN propagates, as in eager log_softmax.
//
// Everything is templated on an "Ops" policy (policy_loss.h's ScalarOps, the CPU's Vectorized lanes,
// the GPU's fast exp) and __host__ __device__. Where an offset meets a multiply-add it is one explicit
// fused multiply-add, so that the results do not depend on what the compiler chose to contract (the
// log-probs are the same bits with and without the entropy).
#pragma once

#include <cfloat>
#include <cmath>

#include "policy_loss.h"

namespace ppo_ext::softmax {

template <typename V>
struct Stats {
  V max;  // M: the largest raw logit seen (-inf: none, or all -inf)
  V sum;  // S = sum exp((x - M) * inv_t)
  V xsum; // W = sum exp(d) * d, d = (x - M) * inv_t; only kept when the entropy is asked for
};

template <typename V>
PPO_HD Stats<V> empty_stats() {
  return {V(-INFINITY), V(0), V(0)};
}

// The shift subtracted before exp: M, or 0 where M = -inf (so that -inf - M is not NaN).
template <typename Ops, typename V>
PPO_HD V shift_of(const V& max) {
  return Ops::select(max == V(-INFINITY), V(0), max);
}

// x - shift floored at -FLT_MAX, so that exp(d) * d is 0 (not NaN) for x = -inf (below the floor exp(d)
// is 0 anyway, in float64 too). NaN stays NaN.
template <typename Ops, typename V>
PPO_HD V finite_offset(const V& d) {
  return Ops::maximum(d, V(-FLT_MAX));
}

// The offset d = (x - shift) * inv_t of a raw logit x <= the max (shift = shift_of(max)): <= 0, 0 at the max.
template <typename V>
PPO_HD V offset_of(const V& x, const V& shift, const V& inv_t) {
  return (x - shift) * inv_t;
}

// Adds a value x <= s.max to the stats, given as its offset d = offset_of(x, shift_of(s.max), inv_t).
template <bool kEntropy, typename Ops, typename V>
PPO_HD void accumulate(Stats<V>& s, const V& d) {
  const V e = Ops::exp(d);
  s.sum = s.sum + e;
  if (kEntropy) s.xsum = s.xsum + e * finite_offset<Ops>(d);
}

// The stats of a single value.
template <typename Ops, typename V>
PPO_HD Stats<V> single(const V& x) {
  return {x, Ops::select(x == V(-INFINITY), V(0), V(1)), V(0)};
}

// The stats of the union: both moved to the larger max (sums rescaled by exp((max - new max) * inv_t)) and
// added. The sum is one explicit fused multiply-add, so that it is the same bits whichever instantiation
// (with or without the entropy) the compiler contracted how: log-probs do not depend on compute_entropy.
template <bool kEntropy, typename Ops, typename V>
PPO_HD Stats<V> combine(const Stats<V>& a, const Stats<V>& b, const V& inv_t) {
  const V m = Ops::maximum(a.max, b.max);
  const V shift = shift_of<Ops>(m);
  const V da = offset_of(a.max, shift, inv_t), db = offset_of(b.max, shift, inv_t);
  const V sa = Ops::exp(da), sb = Ops::exp(db);  // 0 for max = -inf, 1 for max = m
  Stats<V> r{m, Ops::fmadd(a.sum, sa, b.sum * sb), V(0)};
  if (kEntropy) {
    r.xsum = sa * (a.xsum + finite_offset<Ops>(da) * a.sum) + sb * (b.xsum + finite_offset<Ops>(db) * b.sum);
  }
  return r;
}

// x * inv_t rounded once, never fused with what follows (an explicit fma with a zero addend): the backward's
// scaled logits and the saved log-sum-exp's scaled max are rounded alike, so that at the max their
// difference is exactly -log S however large the logits.
template <typename Ops, typename V>
PPO_HD V scaled(const V& x, const V& inv_t) {
  return Ops::fmadd(x, inv_t, V(0));
}

PPO_HD float log_(float x) { return logf(x); }
PPO_HD double log_(double x) { return log(x); }

template <typename T>
struct RowResult {
  T log_prob;   // log softmax(x)[label]
  T logsumexp;  // saved for the backward
  T entropy;    // -sum p log p (meaningful when the stats kept W)
};

// label_diff: x_label - s.max, the taken token's raw logit less the max; NaN for a label out of range.
template <typename T>
PPO_HD RowResult<T> finish(const Stats<T>& s, T label_diff, T inv_t) {
  const T log_sum = log_(s.sum);
  return {math::fma_(label_diff, inv_t, -log_sum), scaled<math::ScalarOps<T>>(s.max, inv_t) + log_sum,
          log_sum - s.xsum / s.sum};
}

// The upstream gradients of a row, divided by the temperature and negated (the backward's per-row constants):
// -g / T for the log-prob, and with kEntropy -g_H / T for the entropy and the row's entropy H itself.
template <typename V>
struct RowGrad {
  V neg_coefficient;          // -g / T
  V neg_entropy_coefficient;  // -g_H / T (kEntropy)
  V entropy;                  // H (kEntropy)
};

// An element's gradient without the label's one-hot term (the caller adds g / T at the label), x the scaled
// logit (softmax::scaled), log p = x - lse:
//   d log_prob / d x_v = (onehot - p_v) / T,   d H / d x_v = -p_v (log p_v + H) / T,
// so -p_v (g + g_H (log p_v + H)) / T. log p is floored at kLogProbFloor where the entropy enters: a -inf logit
// (p = 0) gives 0, not 0 * -inf. Without kEntropy the log-prob's term alone, as before the entropy had a gradient.
constexpr double kLogProbFloor = -1e4;  // exp() of it is 0 in float32 and float64; g_H times it stays finite
template <bool kEntropy, typename Ops, typename V>
PPO_HD V logit_grad(const V& x, const V& lse, const RowGrad<V>& c) {
  if constexpr (kEntropy) {
    const V log_p = Ops::maximum(x - lse, V(kLogProbFloor));
    return Ops::exp(log_p) * Ops::fmadd(c.neg_entropy_coefficient, log_p + c.entropy, c.neg_coefficient);
  } else {
    return c.neg_coefficient * Ops::exp(x - lse);
  }
}

}  // namespace ppo_ext::softmax
