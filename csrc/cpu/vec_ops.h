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

// The log-softmax of 16-bit logits (bfloat16, float16): a cheaper exp than SLEEF's 1-ulp one, its error a
// thousandth of the logits' own rounding. With AVX-512, 12 instructions: exp(x) = 2^n exp(r), n = round(x / ln 2),
// r = x - n ln 2 in [-ln 2 / 2, ln 2 / 2] (ln 2 in two parts, n ln 2 exact to |n| = 256), exp(r) by a degree-5
// polynomial (a relative-error minimax fit, 9.2e-8; coefficients rounded to float32), 2^n applied by vscalefps,
// which rounds once and keeps subnormal results; x is clamped to [-110, 128] (exp(-110) is 0 in float32 and
// exp(128) inf), by min/max that keep NaN (their second operand). Measured over every float32 x: within 1.63e-7 of
// exp relative to it where the result is normal (ATen's exp_u20: 4e-7), subnormal results within 1.5 times their
// spacing 2^-149, inf above 88.73, NaN kept.
// Elsewhere ATen's polynomial exp_u20 (4e-7, results below 1.2e-38 flushed to 0), with NaN kept by a blend
// (exp_u20 gives inf for NaN).
struct FastExpVecOps : VecOps<float> {
#if defined(CPU_CAPABILITY_AVX512)
  static V exp(const V& x) {
    const __m512 clamped = _mm512_min_ps(_mm512_set1_ps(128.f), _mm512_max_ps(_mm512_set1_ps(-110.f), x));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(clamped, _mm512_set1_ps(1.44269502f)),  // log2(e)
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), clamped);  // ln 2's first 16 bits
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);                 // and the rest
    __m512 p = _mm512_set1_ps(0.00829027221f);
    for (const float c : {0.0418981612f, 0.166676387f, 0.499991477f, 0.999999702f, 1.f}) {
      p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    return _mm512_scalef_ps(p, n);
  }
#else
  static V exp(const V& x) { return V::blendv(x.exp_u20(), x, x.isnan()); }
#endif
};

}  // namespace CPU_CAPABILITY
}  // namespace ppo_ext::cpu
