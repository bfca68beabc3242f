// The Ops policy of the shared math (policy_loss.h, log_softmax.h) on at::vec::Vectorized lanes, for the
// CPU kernels. Included by the kernel headers, which are compiled once per instruction set with
// CPU_CAPABILITY defined (kernels_{default,avx2,avx512}.cpp).
#pragma once

#include <ATen/cpu/vec/vec.h>

namespace ppo_ext::cpu {
namespace CPU_CAPABILITY {

template <typename acc_t>
struct VecOps {
  using V = at::vec::Vectorized<acc_t>;
  using Mask = V;
  static V select(const V& c, const V& a, const V& b) { return V::blendv(b, a, c); }
  static V maximum(const V& a, const V& b) { return at::vec::maximum(a, b); }
  static V minimum(const V& a, const V& b) { return at::vec::minimum(a, b); }
  // NaN in x propagates (bounds are never NaN): two instructions where maximum/minimum take more.
  static V clamp(const V& x, const V& lo, const V& hi) { return at::vec::clamp(x, lo, hi); }
  static V exp(const V& x) { return x.exp(); }
  static V expm1(const V& x) { return x.expm1(); }
  static V neg(const V& x) { return x.neg(); }
  static V log(const V& x) { return x.log(); }
  static V mask_not(const V& m) { return ~m; }  // a mask lane is all ones or all zeros
  static V fmadd(const V& a, const V& b, const V& c) { return at::vec::fmadd(a, b, c); }
};

// The log-softmax of 16-bit logits (bfloat16, float16): ATen's polynomial exp (exp_u20: within 7 ulp of float32's
// exp, 4e-7 relative, measured; results below 1.2e-38 flushed to 0), a thousandth of the logits' own rounding, and
// cheaper than SLEEF's 1-ulp exp. exp_u20 gives inf for NaN: NaN is kept here.
struct FastExpVecOps : VecOps<float> {
  static V exp(const V& x) { return V::blendv(x.exp_u20(), x, x.isnan()); }
};

}  // namespace CPU_CAPABILITY
}  // namespace ppo_ext::cpu
