// Interface between the CPU op (policy_loss_cpu.cpp) and the CPU kernels, which are compiled once per
// instruction set (policy_loss_cpu_kernel.h).
#pragma once

#include <c10/core/ScalarType.h>

#include "../policy_loss.h"
#include "capability.h"

namespace ppo_ext::cpu {

// A (B, T) view of an input: element strides; col_stride 0 broadcasts a per-row value along T.
// data == nullptr means the input was not given.
struct StridedInput {
  const void* data = nullptr;
  c10::ScalarType dtype = c10::kFloat;
  int64_t row_stride = 0;
  int64_t col_stride = 0;
};

struct PolicyLossKernelArgs {
  StridedInput log_probs, old_log_probs, advantages, mask, token_weights, rollout_log_probs, ref_log_probs;
  int64_t B = 0, T = 0;
  LossOptions options{};
  void* token_grad = nullptr;  // (B, T) contiguous, float32 (float64 for float64 log_probs); null: no gradient
};

// One instantiation per instruction set (capability.h).
#define PPO_EXT_DECLARE_POLICY_LOSS_KERNEL(capability)            \
  namespace capability {                                          \
  Partials policy_loss_kernel(const PolicyLossKernelArgs& args);  \
  }
PPO_EXT_FOR_EACH_CPU_CAPABILITY(PPO_EXT_DECLARE_POLICY_LOSS_KERNEL)
#undef PPO_EXT_DECLARE_POLICY_LOSS_KERNEL

}  // namespace ppo_ext::cpu
