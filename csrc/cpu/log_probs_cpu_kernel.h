// The CPU kernels of ppo_ext::token_log_probs and its backward. Included by the one source file per
// instruction set (kernels_{default,avx2,avx512}.cpp, see instruction_set.h); log_probs_cpu.cpp picks one
// at run time (capability.h).
//
// Threads take whole rows (at::parallel_for over B*T rows), and a row is computed by one thread in a
// fixed order, so results do not depend on the number of threads. A row is streamed through L1 in tiles
// of kTile vocabulary entries: the tile is converted to float32 (bf16/fp16 logits; float32 and float64
// are read in place), its per-lane max taken, its per-lane Stats summed with one exp per element, and
// combined into the row's per-lane Stats (the online max/sum-exp of log_softmax.h). The lanes are combined
// in lane order at the end of the row. Memory traffic: the logits are read once forward; read once and the
// gradient written once backward (in place, into the logits, when asked).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../log_softmax.h"
#include "log_probs_cpu.h"
#include "vec_ops.h"

namespace ppo_ext::cpu {
namespace CPU_CAPABILITY {
namespace log_probs {

constexpr int64_t kTile = 2048;        // vocabulary entries per tile: 8 KiB of float32, in L1
constexpr int64_t kGrainElems = 1 << 16;  // logits per at::parallel_for grain (whole rows)
// A tile's first loop (conversion, max) asks for the entries one tile ahead: they arrive while this tile's exps
// run, where the memory would otherwise sit idle (bf16 rows of 151,936 out of cache: forward 0.25 -> 0.18 ns a
// logit, backward 0.20 -> 0.18). Past the row's end it asks for bytes it will not use (a prefetch never faults;
// the address is formed as an integer, not as a pointer beyond the array).
constexpr int64_t kPrefetchAhead = kTile;

template <typename T>
void prefetch_ahead(const T* p) {
  __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(p) + kPrefetchAhead * sizeof(T)));
}

// n entries of a row as acc_t: in place for float32 / float64, else converted into buf. With `max`, also their
// per-lane max (in the same loop as the conversion), in kMaxChains independent chains: a NaN-propagating maximum
// has ~6 cycles of latency, and in one chain it was a third of the forward's time (bf16 rows in cache, 2 threads:
// 0.17 -> 0.14 ns a logit).
constexpr int kMaxChains = 4;
template <typename acc_t, typename scalar_t, typename Vec = at::vec::Vectorized<acc_t>>
const acc_t* as_acc(const scalar_t* src, int64_t n, acc_t* buf, Vec* max = nullptr) {
  constexpr bool kInPlace = std::is_same_v<scalar_t, acc_t>;
  constexpr int64_t kVec = Vec::size();
  if constexpr (kInPlace) {
    if (max == nullptr) return src;
  }
  const auto load = [&](int64_t j) {  // entries [j, j + kVec) as acc_t, converted into buf
    prefetch_ahead(src + j);
    Vec v;
    if constexpr (kInPlace) {
      v = Vec::loadu(src + j);
    } else {
      at::vec::load_to_float<scalar_t>(src + j, v);
      v.store(buf + j);
    }
    return v;
  };
  Vec m[kMaxChains];
  for (Vec& c : m) c = Vec(-INFINITY);
  int64_t j = 0;
  if (max != nullptr) {
    for (; j + kMaxChains * kVec <= n; j += kMaxChains * kVec) {
      for (int c = 0; c < kMaxChains; ++c) m[c] = at::vec::maximum(m[c], load(j + c * kVec));
    }
  }
  for (; j + kVec <= n; j += kVec) {
    const Vec v = load(j);
    if (max != nullptr) m[0] = at::vec::maximum(m[0], v);
  }
  if constexpr (!kInPlace) {
    for (; j < n; ++j) buf[j] = static_cast<acc_t>(src[j]);
  }
  if (max != nullptr) {
    for (int c = 1; c < kMaxChains; ++c) m[0] = at::vec::maximum(m[0], m[c]);
    *max = m[0];
  }
  if constexpr (kInPlace) {
    return src;
  } else {
    return buf;
  }
}

template <typename scalar_t, typename acc_t>
class LogProbsKernel {
  // SLEEF's 1-ulp exp, as eager's log_softmax, for float32 / float64 logits; a faster one for 16-bit logits
  using Ops = std::conditional_t<std::is_same_v<scalar_t, acc_t>, VecOps<acc_t>, FastExpVecOps>;
  using Vec = typename Ops::V;
  using ScalarOps = math::ScalarOps<acc_t>;
  static constexpr int64_t kVec = Vec::size();
  static_assert(kTile % kVec == 0, "a tile must hold whole vectors");

 public:
  explicit LogProbsKernel(const LogitRows& rows) : r_(rows), inv_t_(static_cast<acc_t>(rows.inv_temperature)) {}

  const scalar_t* row(int64_t k) const {
    const int64_t i = k / r_.T, t = k % r_.T;
    return static_cast<const scalar_t*>(r_.data) + i * r_.stride_b + t * r_.stride_t;
  }

  int64_t label(int64_t k) const {
    const int64_t i = k / r_.T, t = k % r_.T;
    return r_.labels[i * r_.label_stride_b + t * r_.label_stride_t];
  }

  // The label's raw logit, NaN for a label out of range (checked before the kernel on the CPU).
  acc_t label_logit(const scalar_t* x, int64_t label) const {
    return label >= 0 && label < r_.V ? static_cast<acc_t>(x[label]) : static_cast<acc_t>(NAN);
  }

  // The Stats of one row of logits (scaled by 1 / temperature).
  template <bool kEntropy>
  softmax::Stats<acc_t> row_stats(const scalar_t* x, acc_t* buf) const {
    const int64_t V = r_.V;
    const int64_t v_vec = V / kVec * kVec;  // the tail after the last whole vector is done by scalars
    const Vec inv_t(inv_t_);
    softmax::Stats<Vec> lanes = softmax::empty_stats<Vec>();
    for (int64_t v0 = 0; v0 < v_vec; v0 += kTile) {
      const int64_t n = std::min(kTile, v_vec - v0);
      Vec m;
      const acc_t* tile = as_acc<acc_t>(x + v0, n, buf, &m);
      softmax::Stats<Vec> tile_stats{m, Vec(0), Vec(0)};
      const Vec shift = softmax::shift_of<Ops>(m);
      for (int64_t j = 0; j < n; j += kVec) {
        softmax::accumulate<kEntropy, Ops>(tile_stats, softmax::offset_of(Vec::loadu(tile + j), shift, inv_t));
      }
      // Sums of a tile, then of tiles: float32 rounding grows with kTile / kVec + V / kTile terms, not V / kVec.
      lanes = softmax::combine<kEntropy, Ops>(lanes, tile_stats, inv_t);
    }
    alignas(64) acc_t max[kVec], sum[kVec], xsum[kVec];
    lanes.max.store(max);
    lanes.sum.store(sum);
    lanes.xsum.store(xsum);
    softmax::Stats<acc_t> s = softmax::empty_stats<acc_t>();
    for (int64_t k = 0; k < kVec; ++k) s = softmax::combine<kEntropy, ScalarOps>(s, {max[k], sum[k], xsum[k]}, inv_t_);
    for (int64_t v = v_vec; v < V; ++v) {
      s = softmax::combine<kEntropy, ScalarOps>(s, softmax::single<ScalarOps>(static_cast<acc_t>(x[v])), inv_t_);
    }
    return s;
  }

  template <bool kEntropy>
  void forward(const LogProbsArgs& a) const {
    acc_t* log_probs = static_cast<acc_t*>(a.log_probs);
    acc_t* lse = static_cast<acc_t*>(a.logsumexp);
    acc_t* entropy = static_cast<acc_t*>(a.entropy);
    const int64_t rows = r_.B * r_.T;
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(r_.V, 1)),
                     [&](int64_t k0, int64_t k1) {
      alignas(64) acc_t buf[kTile];
      for (int64_t k = k0; k < k1; ++k) {
        const scalar_t* x = row(k);
        const auto s = row_stats<kEntropy>(x, buf);
        const auto out = softmax::finish<acc_t>(s, label_logit(x, label(k)) - s.max, inv_t_);
        log_probs[k] = out.log_prob;
        lse[k] = out.logsumexp;
        if (kEntropy) entropy[k] = out.entropy;
      }
    });
  }

  template <bool kEntropy>
  void backward(const LogProbsBackwardArgs& a) const {
    const acc_t* grad = static_cast<const acc_t*>(a.grad_log_probs);
    const acc_t* lse = static_cast<const acc_t*>(a.logsumexp);
    const acc_t* grad_entropy = static_cast<const acc_t*>(a.grad_entropy);
    const acc_t* entropy = static_cast<const acc_t*>(a.entropy);
    const int64_t rows = r_.B * r_.T, V = r_.V;
    const int64_t v_vec = V / kVec * kVec;
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(V, 1)),
                     [&](int64_t k0, int64_t k1) {
      alignas(64) acc_t buf[kTile];
      alignas(64) acc_t gbuf[kTile];
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t i = k / r_.T, t = k % r_.T;
        scalar_t* out = static_cast<scalar_t*>(a.out) + i * a.out_stride_b + t * a.out_stride_t;
        const acc_t g = grad[k];
        const acc_t g_entropy = kEntropy ? grad_entropy[k] : acc_t(0);
        if (g == acc_t(0) && g_entropy == acc_t(0)) {  // a masked or clipped token: zeros, without reading its logits
          std::memset(static_cast<void*>(out), 0, V * sizeof(scalar_t));  // 0 is all-zero bits in every dtype
          continue;
        }
        const scalar_t* x = row(k);  // == out for the in-place backward: each entry is read before it is written
        const acc_t row_lse = lse[k];
        const int64_t lbl = label(k);
        const acc_t coefficient = g * inv_t_;
        const softmax::RowGrad<acc_t> c{-coefficient, -(g_entropy * inv_t_), kEntropy ? entropy[k] : acc_t(0)};
        // The label's entry, computed before the loop overwrites it (in place).
        const bool has_label = lbl >= 0 && lbl < V;
        const acc_t label_grad =
            has_label ? coefficient + softmax::logit_grad<kEntropy, ScalarOps>(
                                          softmax::scaled<ScalarOps>(label_logit(x, lbl), inv_t_), row_lse, c)
                      : acc_t(0);
        const Vec lse_v(row_lse), inv_t(inv_t_);
        const softmax::RowGrad<Vec> cv{Vec(c.neg_coefficient), Vec(c.neg_entropy_coefficient), Vec(c.entropy)};
        for (int64_t v0 = 0; v0 < v_vec; v0 += kTile) {
          const int64_t n = std::min(kTile, v_vec - v0);
          const acc_t* tile = as_acc<acc_t>(x + v0, n, buf);
          acc_t* g_out = std::is_same_v<scalar_t, acc_t> ? reinterpret_cast<acc_t*>(out + v0) : gbuf;
          for (int64_t j = 0; j < n; j += kVec) {
            softmax::logit_grad<kEntropy, Ops>(softmax::scaled<Ops>(Vec::loadu(tile + j), inv_t), lse_v, cv)
                .store(g_out + j);
          }
          if constexpr (!std::is_same_v<scalar_t, acc_t>) at::vec::convert(gbuf, out + v0, n);
        }
        for (int64_t v = v_vec; v < V; ++v) {
          const acc_t scaled = softmax::scaled<ScalarOps>(static_cast<acc_t>(x[v]), inv_t_);
          out[v] = static_cast<scalar_t>(softmax::logit_grad<kEntropy, ScalarOps>(scaled, row_lse, c));
        }
        if (has_label) out[lbl] = static_cast<scalar_t>(label_grad);
      }
    });
  }

 private:
  const LogitRows& r_;
  const acc_t inv_t_;
};

template <typename F>
void dispatch_logits(c10::ScalarType dtype, F&& f) {
  switch (dtype) {
    case c10::kFloat: return f(float{}, float{});
    case c10::kDouble: return f(double{}, double{});
    case c10::kBFloat16: return f(c10::BFloat16{}, float{});
    case c10::kHalf: return f(c10::Half{}, float{});
    default: TORCH_CHECK_TYPE(false, "ppo_ext CPU: logits of dtype ", dtype, " are not supported");
  }
}

}  // namespace log_probs

void token_log_probs_kernel(const LogProbsArgs& args) {
  log_probs::dispatch_logits(args.rows.dtype, [&](auto scalar, auto acc) {
    const log_probs::LogProbsKernel<decltype(scalar), decltype(acc)> kernel(args.rows);
    if (args.entropy != nullptr) kernel.template forward<true>(args);
    else kernel.template forward<false>(args);
  });
}

void token_log_probs_backward_kernel(const LogProbsBackwardArgs& args) {
  log_probs::dispatch_logits(args.rows.dtype, [&](auto scalar, auto acc) {
    const log_probs::LogProbsKernel<decltype(scalar), decltype(acc)> kernel(args.rows);
    if (args.grad_entropy != nullptr) kernel.template backward<true>(args);
    else kernel.template backward<false>(args);
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace ppo_ext::cpu
