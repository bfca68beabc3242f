// The instruction set the CPU kernels run with, picked at run time (each kernel is compiled once per
// instruction set, by kernels_{default,avx2,avx512}.cpp, into the namespace of its CPU_CAPABILITY).
#pragma once

namespace ppo_ext::cpu {

// The widest instruction set the CPU has, unless PPO_EXT_CPU_CAPABILITY (default, avx2) asks for less.
enum class Capability { Default, Avx2, Avx512 };
Capability capability();

// The CPU_CAPABILITY namespaces, for declaring a kernel in each: PPO_EXT_FOR_EACH_CPU_CAPABILITY(DECLARE).
#define PPO_EXT_FOR_EACH_CPU_CAPABILITY(X) X(DEFAULT) X(AVX2) X(AVX512)

// Calls `kernel` as compiled for the CPU's instruction set, read once: PPO_EXT_CPU_DISPATCH(policy_loss_kernel, args).
#define PPO_EXT_CPU_DISPATCH(kernel, ...)                                     \
  [&] {                                                                       \
    namespace isa = ::ppo_ext::cpu;                                           \
    switch (isa::capability()) {                                              \
      case isa::Capability::Avx512: return isa::AVX512::kernel(__VA_ARGS__);  \
      case isa::Capability::Avx2: return isa::AVX2::kernel(__VA_ARGS__);      \
      default: return isa::DEFAULT::kernel(__VA_ARGS__);                      \
    }                                                                         \
  }()

}  // namespace ppo_ext::cpu
