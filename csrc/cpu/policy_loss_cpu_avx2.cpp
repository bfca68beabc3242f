// The CPU kernels (policy_loss, token_log_probs) with AVX2 + FMA (ATen's AVX2 capability: 8 float lanes, SLEEF's vector exp).
// policy_loss_cpu.cpp calls them only where the CPU reports AVX2 and FMA at run time, so the build
// does not depend on the build machine. The target pragma enables the instructions for this file
// alone; the feature macros are set by hand because a pragma does not set them, and ATen's and
// SLEEF's headers choose their AVX2 code by them.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#pragma GCC target("avx,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
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
#define CPU_CAPABILITY_AVX2
#endif
#define CPU_CAPABILITY AVX2
#include "policy_loss_cpu_kernel.h"
#include "log_probs_cpu_kernel.h"
