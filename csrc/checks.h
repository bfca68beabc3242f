// Argument checking shared by the CPU and CUDA implementations of the ops declared in ops.cpp (defined in
// checks.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <optional>
#include <string_view>
#include <tuple>

#include "policy_loss.h"

namespace ppo_ext {

// Checks every argument of ppo_ext::policy_loss (shapes, dtypes, devices, ranges, modes) with an
// error naming the argument, and returns the parsed scalar options.
LossOptions check_policy_loss_args(const at::Tensor& log_probs, const std::optional<at::Tensor>& old_log_probs,
                                   const at::Tensor& advantages, const std::optional<at::Tensor>& mask,
                                   const std::optional<at::Tensor>& token_weights,
                                   const std::optional<at::Tensor>& num_tokens,
                                   const std::optional<at::Tensor>& num_seqs,
                                   const std::optional<at::Tensor>& loss_scale_factor,
                                   std::optional<double> num_tokens_value, std::optional<double> num_seqs_value,
                                   std::optional<double> loss_scale_factor_value, double clip_low, double clip_high,
                                   std::optional<double> dual_clip, std::optional<double> log_ratio_clamp,
                                   std::string_view importance_sampling, std::string_view loss_agg_mode);

void check_policy_loss_backward_args(const at::Tensor& grad_loss, const at::Tensor& token_grad,
                                     const at::Tensor& grad_scale, at::ScalarType dtype);

// Reads a normaliser tensor on the CPU (no synchronisation there) and checks it as numbers are checked.
double checked_cpu_normaliser(const at::Tensor& tensor, const char* name);

// loss, metrics, counts, token_grad, grad_scale: the outputs of ppo_ext::policy_loss (schema in ops.cpp).
using PolicyLossOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The outputs, uninitialised, on log_probs' device: token_grad is (B, T) when compute_grad, else (0,).
PolicyLossOutputs empty_policy_loss_outputs(const at::Tensor& log_probs, bool compute_grad);

// ppo_ext::token_log_probs: logits (B, T, V) or (N, V) with the V dimension contiguous (rows of any
// stride), labels int64 of the logits' shape without V. The layout in elements; a (N, V) tensor is
// B = N, T = 1.
struct LogitsLayout {
  int64_t B, T, V;
  int64_t stride_b, stride_t;
  int64_t label_stride_b, label_stride_t;
};

// Checks the arguments of ppo_ext::token_log_probs (shapes, dtypes, devices, temperature) with an error
// naming the argument. Labels are checked for range separately (check_labels_in_range_cpu on the CPU).
LogitsLayout check_token_log_probs_args(const at::Tensor& logits, const at::Tensor& labels, double temperature);

// The same, and grad_log_probs / logsumexp of the labels' shape (float32, float64 for float64 logits).
LogitsLayout check_token_log_probs_backward_args(const at::Tensor& grad_log_probs, const at::Tensor& logits,
                                                 const at::Tensor& labels, const at::Tensor& logsumexp,
                                                 double temperature);

// Raises a ValueError naming labels and the first position out of [0, V) (CPU tensors: no synchronisation).
void check_labels_in_range_cpu(const at::Tensor& labels, const LogitsLayout& layout);

// The in-place backward writes every row of the logits: they must not overlap (e.g. an expand()ed tensor).
void check_writable_logits(const at::Tensor& logits);

// log_probs, logsumexp, entropy: the outputs of ppo_ext::token_log_probs, uninitialised, contiguous, of the
// labels' shape (entropy (0,) when not asked for).
using TokenLogProbsOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
TokenLogProbsOutputs empty_token_log_probs_outputs(const at::Tensor& logits, const at::Tensor& labels,
                                                   bool compute_entropy);

// float32 arithmetic, float64 for float64 log-probs.
inline at::ScalarType acc_type_for(at::ScalarType log_probs_dtype) {
  return log_probs_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// Strides of an advantages tensor viewed as (B, T): (B,) and (B, 1) broadcast along T.
inline std::pair<int64_t, int64_t> advantage_strides(const at::Tensor& advantages) {
  if (advantages.dim() == 1) return {advantages.stride(0), 0};
  return {advantages.stride(0), advantages.size(1) == 1 ? 0 : advantages.stride(1)};
}

}  // namespace ppo_ext
