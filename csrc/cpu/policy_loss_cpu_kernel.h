// The CPU kernel of ppo_ext::policy_loss. Included by the one source file per instruction set
// (kernels_{default,avx2,avx512}.cpp, see instruction_set.h); policy_loss_cpu.cpp picks one at run time
// (capability.h).
//
// Work split: the rows are cut into chunks of about kChunkTokens tokens that depend only on (B, T);
// threads take whole chunks, each chunk sums into its own Partials, and the chunks are combined in
// order at the end. So the result is bitwise the same for any number of threads.
// Within a row, tokens are processed in tiles of kTile: each input is converted (any dtype, any
// stride) into a float buffer in L1, then the shared math of policy_loss.h runs on Vectorized lanes.
#pragma once

#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <vector>

#include "../policy_loss.h"
#include "policy_loss_cpu.h"
#include "vec_ops.h"

namespace ppo_ext::cpu {
namespace CPU_CAPABILITY {

constexpr int64_t kTile = 512;
constexpr int64_t kChunkTokens = 4096;

template <typename V>
double sum_lanes(const V& v) {
  alignas(64) typename V::value_type lanes[V::size()];
  v.store(lanes);
  double s = 0;
  for (int64_t k = 0; k < V::size(); ++k) s += lanes[k];
  return s;
}

// into = the torch.minimum (kMax: torch.maximum) of into and v's lanes, in lane order: NaN propagates.
template <bool kMax, typename V>
void fold_lanes(const V& v, double& into) {
  alignas(64) typename V::value_type lanes[V::size()];
  v.store(lanes);
  for (int64_t k = 0; k < V::size(); ++k) {
    into = kMax ? math::nan_maximum<double>(into, lanes[k]) : math::nan_minimum<double>(into, lanes[k]);
  }
}

template <typename V>
int64_t count_lanes(const V& v) {
  return static_cast<int64_t>(sum_lanes(v));  // per-lane counts are whole numbers below 2^19 (LaneStats): exact
}

template <typename acc_t>
class PolicyLossKernel {
  using Ops = VecOps<acc_t>;
  using V = typename Ops::V;
  static constexpr int64_t kVec = V::size();
  static_assert(kTile % kVec == 0, "a tile must hold whole vectors");

  // Per-thread buffers for the inputs of one tile, converted to acc_t. Absent weights keep their
  // constant 1 from the start, and so do the ratios of a family without one; an absent mask reads all_valid.
  struct Tile {
    explicit Tile(const PolicyLossKernelArgs& a) {
      std::fill(all_valid, all_valid + kTile, acc_t(1));
      if (a.token_weights.data == nullptr) std::fill(weights, weights + kTile, acc_t(1));
      if (!has_ratio(a.options.loss_type)) std::fill(ratios, ratios + kTile, acc_t(1));
    }
    alignas(64) acc_t all_valid[kTile];
    alignas(64) acc_t log_probs[kTile];
    alignas(64) acc_t old_log_probs[kTile];
    alignas(64) acc_t advantages[kTile];
    alignas(64) acc_t mask[kTile];
    alignas(64) acc_t weights[kTile];
    alignas(64) acc_t rollout_log_probs[kTile];
    alignas(64) acc_t ref_log_probs[kTile];
    alignas(64) acc_t ratios[kTile];  // exp of the clamped token log-ratios
  };

  // The exact per-lane statistics of a row's tokens: extremes, and counts. Accumulated over up to kFlushTiles tiles
  // and then reduced (flush), rather than after every tile as the rounded sums are. kFlushTiles tiles hold 2^19
  // tokens a lane, so a count stays far below 2^24, where float lanes would stop counting exactly.
  static constexpr int64_t kFlushTiles = (int64_t{1} << 19) * kVec / kTile;
  struct LaneStats {
    V ratio_min{INFINITY}, ratio_max{-INFINITY}, rollout_min{INFINITY}, rollout_max{-INFINITY};
    V n_valid{0}, n_low{0}, n_high{0}, n_active{0}, n_dual{0}, n_filtered{0};

    void flush(Partials& p, int64_t& row_valid, bool rollout_on) {
      fold_lanes<false>(ratio_min, p.ratio_min);
      fold_lanes<true>(ratio_max, p.ratio_max);
      if (rollout_on) {
        fold_lanes<false>(rollout_min, p.rollout_weight_min);
        fold_lanes<true>(rollout_max, p.rollout_weight_max);
        p.counts[kRolloutFilteredTokens] += count_lanes(n_filtered);
      }
      row_valid += count_lanes(n_valid);
      p.counts[kClippedLow] += count_lanes(n_low);
      p.counts[kClippedHigh] += count_lanes(n_high);
      p.counts[kClippedActive] += count_lanes(n_active);
      p.counts[kDualClipped] += count_lanes(n_dual);
      *this = LaneStats{};
    }
  };

  // The inputs' bytes of the next tile, asked for while this tile computes: its loads would otherwise wait on memory
  // one after another (rows out of cache). One prefetch per input and vector, at the same element offset; past a
  // row's end they ask for bytes the next tile will not read (a prefetch never faults; the address is formed as an
  // integer, not as a pointer beyond the array).
  class NextTile {
   public:
    explicit NextTile(const PolicyLossKernelArgs& a) {
      for (const StridedInput* in : {&a.log_probs, &a.old_log_probs, &a.advantages, &a.mask, &a.token_weights,
                                     &a.rollout_log_probs, &a.ref_log_probs}) {
        if (in->data == nullptr || in->col_stride == 0) continue;  // absent, or one value a row
        const int64_t size = static_cast<int64_t>(c10::elementSize(in->dtype));
        streams_[count_++] = {reinterpret_cast<uintptr_t>(in->data), in->row_stride * size, in->col_stride * size};
      }
    }
    // Where the tile after (i, t0) starts: (i, t0 + kTile), or the next row's start.
    void at(int64_t i, int64_t t0, int64_t T) {
      const bool same_row = t0 + kTile < T;
      for (int k = 0; k < count_; ++k) {
        const Stream& s = streams_[k];
        next_[k] = s.base + static_cast<uintptr_t>((same_row ? i : i + 1) * s.row_bytes +
                                                   (same_row ? t0 + kTile : 0) * s.col_bytes);
      }
    }
    // Its elements [j, j + kVec).
    void prefetch(int64_t j) const {
      for (int k = 0; k < count_; ++k) {
        __builtin_prefetch(reinterpret_cast<const void*>(next_[k] + static_cast<uintptr_t>(j * streams_[k].col_bytes)));
      }
    }

   private:
    struct Stream {
      uintptr_t base;
      int64_t row_bytes, col_bytes;
    };
    Stream streams_[7];
    uintptr_t next_[7];
    int count_ = 0;
  };

  // The tile's pointers: n values of row i from t0 on, as acc_t, readable in whole vectors.
  struct TileView {
    const acc_t *log_probs, *old_log_probs, *advantages, *mask, *weights, *rollout_log_probs, *ref_log_probs;
  };

 public:
  explicit PolicyLossKernel(const PolicyLossKernelArgs& args) : a_(args), o_(args.options) {}

  Partials run() const {
    const int64_t rows_per_chunk = std::max<int64_t>(1, kChunkTokens / std::max<int64_t>(a_.T, 1));
    const int64_t num_chunks = (a_.B + rows_per_chunk - 1) / rows_per_chunk;
    std::vector<Partials> chunks(num_chunks);
    at::parallel_for(0, num_chunks, 1, [&](int64_t c0, int64_t c1) {
      Tile tile(a_);
      for (int64_t c = c0; c < c1; ++c) {
        math::init_partials(chunks[c]);
        const int64_t row_end = std::min(a_.B, (c + 1) * rows_per_chunk);
        for (int64_t i = c * rows_per_chunk; i < row_end; ++i) {
          // (the KL a compile-time branch: the loop without it is the one it was before the KL existed)
          if (a_.options.has_ref_kl) row<true>(tile, i, chunks[c]);
          else row<false>(tile, i, chunks[c]);
        }
      }
    });
    Partials total;
    math::init_partials(total);
    for (const auto& p : chunks) math::combine_partials(total, p);
    return total;
  }

 private:
  // n values from p (element stride s) into buf as acc_t, or as 1/0 for non-zero/zero (kNonZero: a mask,
  // tested in its own dtype, where a float64 1e-300 would be 0 as a float32). __restrict__: a 1-byte
  // input may alias anything, and without it the compiler would not vectorise the copy.
  template <bool kNonZero, typename scalar_t>
  static void convert(const scalar_t* __restrict__ p, int64_t s, int64_t n, acc_t* __restrict__ buf) {
    const auto value = [](scalar_t x) {
      if constexpr (kNonZero) return x != scalar_t(0) ? acc_t(1) : acc_t(0);
      else return static_cast<acc_t>(x);
    };
    if (s == 1) {
      for (int64_t j = 0; j < n; ++j) buf[j] = value(p[j]);
    } else if (s == 0) {
      std::fill(buf, buf + n, value(p[0]));
    } else {
      for (int64_t j = 0; j < n; ++j) buf[j] = value(p[j * s]);
    }
  }

  // n values of input `in` in row i from t0 on: in place where the input is contiguous acc_t and n is
  // whole vectors, else converted (any dtype, any stride) into buf and zero-padded to whole vectors.
  // An absent input returns buf, which holds its constant.
  template <bool kNonZero = false>
  static const acc_t* view(const StridedInput& in, int64_t i, int64_t t0, int64_t n, acc_t* buf) {
    if (in.data == nullptr) return buf;
    if (in.dtype == c10::CppTypeToScalarType<acc_t>::value && in.col_stride == 1 && n % kVec == 0) {
      return static_cast<const acc_t*>(in.data) + i * in.row_stride + t0;
    }
    // bool is read as its bytes (0/1): the same values, and a loop the compiler vectorises.
    const at::ScalarType dtype = in.dtype == at::kBool ? at::kByte : in.dtype;
    AT_DISPATCH_V2(
        dtype, "ppo_ext_cpu_load", AT_WRAP([&] {
          convert<kNonZero>(static_cast<const scalar_t*>(in.data) + i * in.row_stride + t0 * in.col_stride,
                            in.col_stride, n, buf);
        }),
        AT_EXPAND(AT_ALL_TYPES), at::kHalf, at::kBFloat16);
    std::fill(buf + n, buf + (n + kVec - 1) / kVec * kVec, acc_t(0));
    return buf;
  }

  // The mask: an absent one means all valid, but the padding after a partial tile stays invalid.
  const acc_t* mask_view(Tile& t, int64_t i, int64_t t0, int64_t n) const {
    if (a_.mask.data != nullptr) return view</*kNonZero=*/true>(a_.mask, i, t0, n, t.mask);
    if (n % kVec == 0) return t.all_valid;
    std::fill(t.mask, t.mask + n, acc_t(1));
    std::fill(t.mask + n, t.mask + (n + kVec - 1) / kVec * kVec, acc_t(0));
    return t.mask;
  }

  TileView log_ratio_view(Tile& t, int64_t i, int64_t t0, int64_t n) const {
    TileView v{};
    v.log_probs = view(a_.log_probs, i, t0, n, t.log_probs);
    // On-policy (no old_log_probs): old = log_probs, so d = 0 (NaN where log_probs is inf, as eager).
    v.old_log_probs = a_.old_log_probs.data == nullptr ? v.log_probs : view(a_.old_log_probs, i, t0, n, t.old_log_probs);
    v.mask = mask_view(t, i, t0, n);
    return v;
  }

  // The mask and, with_log_ratio, the log-probs (and for geo_mean the advantages) that the row's log-ratio terms
  // of a tile are computed from.
  TileView seq_view(Tile& t, int64_t i, int64_t t0, int64_t n, bool with_log_ratio) const {
    if (!with_log_ratio) return TileView{nullptr, nullptr, nullptr, mask_view(t, i, t0, n), nullptr, nullptr, nullptr};
    TileView v = log_ratio_view(t, i, t0, n);
    if (o_.loss_type == LossType::GeoMean) v.advantages = view(a_.advantages, i, t0, n, t.advantages);
    return v;
  }

  // Token j's term of the sequence-level log-ratio (math::seq_log_ratio_term) from a seq_view.
  math::LogRatioTerm<V> seq_term(const TileView& v, int64_t j) const {
    const V adv = v.advantages != nullptr ? V::loadu(v.advantages + j) : V(0);
    return math::seq_log_ratio_term<Ops>(V::loadu(v.log_probs + j) - V::loadu(v.old_log_probs + j), adv, o_);
  }

  // Valid tokens of row i and, for a row statistic of the log-ratios (has_row_log_ratio), the masked sum of its
  // log-ratio terms and, where has_row_rollout_sum, of its rollout terms (math::rollout_row_term).
  void row_prepass(Tile& t, int64_t i, bool sum_log_ratio, bool sum_rollout, int64_t& valid, double& log_ratio_sum,
                   double& rollout_sum) const {
    valid = 0;
    log_ratio_sum = rollout_sum = 0;
    const V zero(0), one(1);
    NextTile next(a_);
    for (int64_t t0 = 0; t0 < a_.T; t0 += kTile) {
      const int64_t n = std::min(kTile, a_.T - t0);
      next.at(i, t0, a_.T);
      TileView v = seq_view(t, i, t0, n, sum_log_ratio || sum_rollout);
      if (sum_rollout) v.rollout_log_probs = view(a_.rollout_log_probs, i, t0, n, t.rollout_log_probs);
      V count(0), sum(0), rollout(0);
      for (int64_t j = 0; j < n; j += kVec) {
        next.prefetch(j);
        const V is_valid = V::loadu(v.mask + j) != zero;
        count += is_valid & one;
        if (sum_log_ratio) sum += Ops::select(is_valid, seq_term(v, j).value, zero);
        if (sum_rollout) {
          const V rollout_log_ratio = V::loadu(v.old_log_probs + j) - V::loadu(v.rollout_log_probs + j);
          rollout += Ops::select(is_valid, math::rollout_row_term<Ops>(rollout_log_ratio, o_), zero);
        }
      }
      valid += count_lanes(count);
      log_ratio_sum += sum_lanes(sum);
      rollout_sum += sum_lanes(rollout);
    }
  }

  template <bool kRefKl>
  void row(Tile& t, int64_t i, Partials& p) const {
    const bool seq_level = o_.importance_sampling != ImportanceSampling::Token;
    const bool seq_grad = o_.importance_sampling == ImportanceSampling::Seq && a_.token_grad != nullptr;
    const bool ratio_grad = math::gradient_through_ratio(o_);
    const bool kl_in_grad = kRefKl && o_.kl_coef != 0;
    const V kl_coef(static_cast<acc_t>(o_.kl_coef));
    const bool rollout_on = o_.rollout_is != RolloutIs::None;
    const bool rollout_seq = is_row_level(o_.rollout_is);
    const bool row_log_ratio = has_row_log_ratio(o_.loss_type, o_.importance_sampling);
    const bool row_rollout_sum = math::has_row_rollout_sum(o_);
    const bool weighting = rollout_weights_loss(o_.loss_type);
    const bool needs_prepass = row_log_ratio || row_rollout_sum || o_.loss_agg_mode == LossAggMode::SeqMeanTokenMean;
    int64_t valid = a_.T;
    double log_ratio_sum = 0, rollout_sum = 0;
    if (needs_prepass && (a_.mask.data != nullptr || row_log_ratio || row_rollout_sum)) {
      row_prepass(t, i, row_log_ratio, row_rollout_sum, valid, log_ratio_sum, rollout_sum);
    }
    // The rollout correction's unit log-ratio of this row (sequence levels).
    const acc_t row_rollout_value = static_cast<acc_t>(math::row_rollout_log_ratio(o_.rollout_is, rollout_sum, valid));
    const V row_rollout(row_rollout_value);
    // vespo's Gamma weights of the row's log-weight (its rollout terms included), for A >= 0 and A < 0.
    V row_weight_pos(0), row_weight_neg(0);
    if (o_.loss_type == LossType::Vespo) {
      const acc_t log_w = static_cast<acc_t>(math::vespo_row_log_weight(log_ratio_sum + rollout_sum));
      row_weight_pos = V(math::vespo_row_weight(log_w, true, o_));
      row_weight_neg = V(math::vespo_row_weight(log_w, false, o_));
    }

    // The sequence-level ratio of this row (unused at token level).
    using ScalarOps = math::ScalarOps<acc_t>;
    const auto row_ratio = math::ratio_of<ScalarOps>(math::clamp_log_ratio<ScalarOps>(
        static_cast<acc_t>(math::row_mean_log_ratio(log_ratio_sum, valid)), o_));
    const V agg_weight(static_cast<acc_t>(math::row_agg_weight(o_.loss_agg_mode, valid)));
    acc_t* grad_row = a_.token_grad ? static_cast<acc_t*>(a_.token_grad) + i * a_.T : nullptr;
    const V zero(0), one(1);

    int64_t row_valid = 0, tiles = 0;
    double row_dloss_sum = 0;  // sum of m * agg_weight * dl/dr, for the "seq" gradient
    LaneStats s;
    NextTile next(a_);
    for (int64_t t0 = 0; t0 < a_.T; t0 += kTile) {
      const int64_t n = std::min(kTile, a_.T - t0);
      next.at(i, t0, a_.T);
      TileView v = log_ratio_view(t, i, t0, n);
      v.advantages = view(a_.advantages, i, t0, n, t.advantages);
      v.weights = view(a_.token_weights, i, t0, n, t.weights);
      if (rollout_on) v.rollout_log_probs = view(a_.rollout_log_probs, i, t0, n, t.rollout_log_probs);
      if (kRefKl) v.ref_log_probs = view(a_.ref_log_probs, i, t0, n, t.ref_log_probs);
      // The token ratios' exps first, in a loop of their own: SLEEF's exp is a call, which in the loop below
      // would spill and reload its accumulators (every vector register is caller-saved). (The exps of sapo, dppo,
      // the rollout weight and the KL are still called there.)
      if (!seq_level && has_ratio(o_.loss_type)) {
        for (int64_t j = 0; j < n; j += kVec) {
          const V d = V::loadu(v.log_probs + j) - V::loadu(v.old_log_probs + j);
          Ops::exp(math::clamp_log_ratio<Ops>(d, o_).value).store(t.ratios + j);
        }
      }
      V loss(0), ratio_sum(0), kl_sum(0), dloss_sum(0);
      V ref_kl_sum(0), ref_kl_agg(0), rollout_sum(0);
      for (int64_t j = 0; j < n; j += kVec) {
        next.prefetch(j);
        const V is_valid = V::loadu(v.mask + j) != zero;
        const V valid_one = is_valid & one;  // a mask lane is all ones or all zeros
        const V lp = V::loadu(v.log_probs + j), old = V::loadu(v.old_log_probs + j);
        const V raw_log_ratio = lp - old;
        const auto log_ratio = math::clamp_log_ratio<Ops>(raw_log_ratio, o_);
        const math::Ratio<V> r =
            seq_level ? math::Ratio<V>{V(row_ratio.ratio), V(row_ratio.dratio)}
                      : math::ratio_with_exp<Ops>(log_ratio, V::loadu(t.ratios + j));
        const V adv = V::loadu(v.advantages + j);
        V weight = V::loadu(v.weights + j);
        if (rollout_on) {  // the correction's weight, a constant of the loss, times the given weight
          const V rollout_log_ratio = old - V::loadu(v.rollout_log_probs + j);
          const auto rw = math::rollout_weight<Ops>(rollout_log_ratio, rollout_seq ? row_rollout : rollout_log_ratio, o_);
          if (weighting) weight = weight * rw.weight;
          rollout_sum += Ops::select(is_valid, rw.weight, zero);
          s.rollout_min = Ops::select(is_valid, Ops::minimum(s.rollout_min, rw.weight), s.rollout_min);
          s.rollout_max = Ops::select(is_valid, Ops::maximum(s.rollout_max, rw.weight), s.rollout_max);
          s.n_filtered += rw.filtered & valid_one;
        }
        const math::TokenInputs<V> x{r.ratio, lp, old, raw_log_ratio, adv, weight, row_weight_pos, row_weight_neg};
        const auto terms = math::token_terms<Ops>(x, o_);
        // d ratio / d lp: through this token's log-ratio term (seq-token's local gradient; 1 but for geo_mean)
        const V dratio = r.dratio * math::seq_log_ratio_term<Ops>(raw_log_ratio, adv, o_).derivative;
        V dloss_dratio = terms.dloss_dratio, dloss_dlog_prob = terms.dloss_dlog_prob;
        if constexpr (kRefKl) {  // the KL to the reference: its own sums (not weighted), kl_coef times its gradient
          const auto kl = math::ref_kl_terms<Ops>(lp, V::loadu(v.ref_log_probs + j), r.ratio, o_);
          ref_kl_sum += Ops::select(is_valid, kl.value, zero);
          ref_kl_agg += Ops::select(is_valid, agg_weight * kl.value, zero);
          if (kl_in_grad) {
            dloss_dratio = dloss_dratio + kl_coef * kl.dratio;
            dloss_dlog_prob = dloss_dlog_prob + kl_coef * kl.dlog_prob;
          }
        }
        const V weighted_dloss = agg_weight * dloss_dratio;
        const V direct_grad = agg_weight * dloss_dlog_prob;
        loss += Ops::select(is_valid, agg_weight * terms.loss, zero);
        ratio_sum += Ops::select(is_valid, r.ratio, zero);
        kl_sum -= Ops::select(is_valid, log_ratio.value, zero);
        s.ratio_min = Ops::select(is_valid, Ops::minimum(s.ratio_min, r.ratio), s.ratio_min);
        s.ratio_max = Ops::select(is_valid, Ops::maximum(s.ratio_max, r.ratio), s.ratio_max);
        s.n_valid += valid_one;
        s.n_low += terms.clipped_low & valid_one;
        s.n_high += terms.clipped_high & valid_one;
        s.n_active += terms.clip_active & valid_one;
        s.n_dual += terms.dual_clipped & valid_one;
        if (seq_grad) {
          // The direct term now; pass 3 adds the gradient through the row's ratio.
          dloss_sum += Ops::select(is_valid, weighted_dloss, zero);
          Ops::select(is_valid, direct_grad, zero).store(grad_row + t0 + j, static_cast<int>(std::min(kVec, n - j)));
        } else if (grad_row != nullptr) {
          const V g = Ops::select(is_valid, ratio_grad ? weighted_dloss * dratio + direct_grad : direct_grad, zero);
          g.store(grad_row + t0 + j, static_cast<int>(std::min(kVec, n - j)));
        }
      }
      p.loss += sum_lanes(loss);
      p.ratio_sum += sum_lanes(ratio_sum);
      p.neg_log_ratio_sum += sum_lanes(kl_sum);
      if (kRefKl) {
        p.ref_kl_sum += sum_lanes(ref_kl_sum);
        p.ref_kl_agg += sum_lanes(ref_kl_agg);
      }
      if (rollout_on) p.rollout_weight_sum += sum_lanes(rollout_sum);
      row_dloss_sum += sum_lanes(dloss_sum);
      if (++tiles % kFlushTiles == 0 || t0 + n == a_.T) s.flush(p, row_valid, rollout_on);
    }
    p.counts[kValidTokens] += row_valid;
    p.counts[kValidSeqs] += row_valid > 0 ? 1 : 0;
    p.counts[kRolloutFilteredSeqs] += math::rollout_row_filtered(o_, row_valid, row_rollout_value);

    // "seq": every valid token u of the row gets dL/dlp[u] = (sum_t m agg_weight dl/dr) * dr/ddbar / n (times the
    // derivative of its log-ratio term, for geo_mean), added to its direct term.
    if (seq_grad) {
      const V coefficient(valid > 0 && ratio_grad ? static_cast<acc_t>(row_dloss_sum * row_ratio.dratio / valid)
                                                  : acc_t(0));
      const bool term_derivative = o_.loss_type == LossType::GeoMean;
      for (int64_t t0 = 0; t0 < a_.T; t0 += kTile) {
        const int64_t n = std::min(kTile, a_.T - t0);
        const TileView v = seq_view(t, i, t0, n, term_derivative);
        acc_t* g_tile = grad_row + t0;
        for (int64_t j = 0; j < n; j += kVec) {
          const int count = static_cast<int>(std::min(kVec, n - j));
          const V c = term_derivative ? coefficient * seq_term(v, j).derivative : coefficient;
          const V g = Ops::select(V::loadu(v.mask + j) != zero, V::loadu(g_tile + j, count) + c, zero);
          g.store(g_tile + j, count);
        }
      }
    }
  }

  const PolicyLossKernelArgs& a_;
  const LossOptions& o_;
};

Partials policy_loss_kernel(const PolicyLossKernelArgs& args) {
  if (args.log_probs.dtype == at::kDouble) return PolicyLossKernel<double>(args).run();
  return PolicyLossKernel<float>(args).run();
}

}  // namespace CPU_CAPABILITY
}  // namespace ppo_ext::cpu
