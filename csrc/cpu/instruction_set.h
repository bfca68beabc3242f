// The instruction set a kernels_<isa>.cpp is compiled for, included first by each: PPO_EXT_CPU_AVX2 or
// PPO_EXT_CPU_AVX512 defined before (neither: DEFAULT, any x86-64 / ARM CPU) sets CPU_CAPABILITY, the
// namespace the kernels are compiled into, as ATen compiles its own CPU kernels. capability.cpp picks one
// at run time (where the CPU reports the instructions), so the build does not depend on the build machine.
// The target pragma enables the instructions for that file alone; the feature macros are set by hand
// because a pragma does not set them, and ATen's and SLEEF's headers choose their vector code by them.
#pragma once

#if (defined(PPO_EXT_CPU_AVX2) || defined(PPO_EXT_CPU_AVX512)) && defined(__x86_64__) && \
    (defined(__GNUC__) || defined(__clang__))
#if defined(PPO_EXT_CPU_AVX512)
#pragma GCC target("avx,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,avx512f,avx512bw,avx512vl,avx512dq")
#else
#pragma GCC target("avx,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#endif
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
#if defined(PPO_EXT_CPU_AVX512)
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
#else
#define CPU_CAPABILITY_AVX2
#endif
#endif

#if defined(PPO_EXT_CPU_AVX512)
#define CPU_CAPABILITY AVX512
#elif defined(PPO_EXT_CPU_AVX2)
#define CPU_CAPABILITY AVX2
#else
#define CPU_CAPABILITY DEFAULT
#endif
