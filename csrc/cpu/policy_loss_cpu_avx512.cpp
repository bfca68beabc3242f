// The CPU kernels (policy_loss, token_log_probs) with AVX-512 (F, BW, VL, DQ: ATen's AVX512 capability, 16 float lanes). See
// policy_loss_cpu_avx2.cpp for why the target pragma and the feature macros.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#pragma GCC target("avx,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,avx512f,avx512bw,avx512vl,avx512dq")
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#define CPU_CAPABILITY_AVX512
#endif
#define CPU_CAPABILITY AVX512
#include "policy_loss_cpu_kernel.h"
#include "log_probs_cpu_kernel.h"
