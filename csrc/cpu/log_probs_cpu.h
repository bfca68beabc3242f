// Interface between the CPU ops of token_log_probs (log_probs_cpu.cpp) and their kernels, which are
// compiled once per instruction set (log_probs_cpu_kernel.h, included by kernels_{default,avx2,avx512}.cpp).
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "capability.h"

namespace ppo_ext::cpu {

// Rows of logits, viewed as (B, T, V) with the V dimension contiguous; a (N, V) tensor is B = N, T = 1.
// Row (i, t) starts at data + i * stride_b + t * stride_t (elements).
struct LogitRows {
  const void* data = nullptr;
  c10::ScalarType dtype = c10::kFloat;
  int64_t B = 0, T = 0, V = 0;
  int64_t stride_b = 0, stride_t = 0;
  const int64_t* labels = nullptr;  // labels[i * label_stride_b + t * label_stride_t]: in [0, V) forward; backward
                                    // outside it adds no onehot term (a block of the vocabulary)
  int64_t label_stride_b = 0, label_stride_t = 0;
  double inv_temperature = 1.0;
};

// Outputs are contiguous over the B * T rows, in the accumulation type (float32, float64 for float64
// logits); entropy == nullptr: not asked for.
struct LogProbsArgs {
  LogitRows rows;
  void* log_probs = nullptr;
  void* logsumexp = nullptr;
  void* entropy = nullptr;
};

// grad_logits = (g * (onehot(label) - softmax) + g_H * dH/dx) / temperature, written to `out` (logits' dtype,
// rows at out + i * out_stride_b + t * out_stride_t; the logits themselves for the in-place backward). Rows with
// g == 0 (and g_H == 0) are zeros, written without reading their logits.
struct LogProbsBackwardArgs {
  LogitRows rows;
  const void* grad_log_probs = nullptr;  // contiguous, accumulation type
  const void* logsumexp = nullptr;       // contiguous, accumulation type
  const void* grad_entropy = nullptr;    // g_H, contiguous, accumulation type; nullptr: no entropy term
  const void* entropy = nullptr;         // H (the forward's), with grad_entropy
  void* out = nullptr;
  int64_t out_stride_b = 0, out_stride_t = 0;
};

// One instantiation per instruction set (capability.h).
#define PPO_EXT_DECLARE_LOG_PROBS_KERNELS(capability)                    \
  namespace capability {                                                 \
  void token_log_probs_kernel(const LogProbsArgs& args);                 \
  void token_log_probs_backward_kernel(const LogProbsBackwardArgs& args); \
  }
PPO_EXT_FOR_EACH_CPU_CAPABILITY(PPO_EXT_DECLARE_LOG_PROBS_KERNELS)
#undef PPO_EXT_DECLARE_LOG_PROBS_KERNELS

}  // namespace ppo_ext::cpu
