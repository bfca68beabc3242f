// Argument checking shared by the CPU and CUDA implementations of the ops declared in ops.cpp (defined in
// checks.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <optional>

#include "policy_loss.h"
#include "ppo_ext/ppo_ext.h"

namespace ppo_ext {

// A normaliser argument, checked: a 0-dim real tensor on log_probs' device (read by the backend), or a
// number, or neither (the default of the aggregation mode applies).
struct NormaliserArg {
  const OptionalTensor& tensor;
  Normaliser number;  // number.given: a number was passed
};

// The arguments of ppo_ext::policy_loss, checked once (check_policy_loss_args): what each backend consumes.
// Tensors are the caller's, referenced for the duration of the call.
struct PolicyLossArgs {
  const at::Tensor& log_probs;      // (B, T)
  const OptionalTensor& old_log_probs;  // (B, T) or none (on-policy)
  const at::Tensor& advantages;     // (B, T), (B, 1) or (B,)
  const OptionalTensor& mask;       // (B, T) or none
  const OptionalTensor& token_weights;
  const OptionalTensor& rollout_log_probs;  // (B, T) or none
  const OptionalTensor& ref_log_probs;      // (B, T) or none
  NormaliserArg num_tokens, num_seqs, loss_scale_factor;
  LossOptions options;
  bool compute_grad;
  int64_t B, T;
  int64_t advantages_row_stride, advantages_col_stride;  // advantages viewed as (B, T): 0 broadcasts
};

// Checks every argument of ppo_ext::policy_loss (shapes, dtypes, devices, ranges, modes) with an error naming
// the argument. The parameters are those of PolicyLossSignature (include/ppo_ext/ppo_ext.h).
PolicyLossArgs check_policy_loss_args(const at::Tensor& log_probs, const OptionalTensor& old_log_probs,
                                      const at::Tensor& advantages, const OptionalTensor& mask,
                                      const OptionalTensor& token_weights, const OptionalTensor& num_tokens,
                                      const OptionalTensor& num_seqs, const OptionalTensor& loss_scale_factor,
                                      std::optional<double> num_tokens_value, std::optional<double> num_seqs_value,
                                      std::optional<double> loss_scale_factor_value, double clip_low,
                                      std::optional<double> clip_high, std::optional<double> dual_clip,
                                      std::optional<double> ratio_cap, std::optional<double> log_ratio_clamp,
                                      c10::string_view loss_type, double tau_pos, double tau_neg,
                                      std::optional<double> dro_beta, double vespo_k_pos, double vespo_lambda_pos,
                                      double vespo_k_neg, double vespo_lambda_neg,
                                      const OptionalTensor& rollout_log_probs,
                                      c10::string_view rollout_is, c10::string_view rollout_is_mode,
                                      std::optional<double> rollout_is_low, std::optional<double> rollout_is_high,
                                      c10::string_view rollout_is_mask_weight,
                                      const OptionalTensor& ref_log_probs, double kl_coef,
                                      c10::string_view kl_estimator, std::optional<double> kl_clamp,
                                      bool kl_bias_correction,
                                      c10::string_view importance_sampling, c10::string_view loss_agg_mode,
                                      bool compute_grad);

// What a backend registers for ppo_ext::policy_loss: the op's arguments, checked, handed to `Impl`
//   m.impl("policy_loss", checked_policy_loss<&policy_loss_cpu>);
template <typename Signature>
struct PolicyLossEntry;
template <typename... Args>
struct PolicyLossEntry<PolicyLossOutputs(Args...)> {
  template <PolicyLossOutputs (*Impl)(const PolicyLossArgs&)>
  static PolicyLossOutputs call(Args... args) {
    return Impl(check_policy_loss_args(args...));
  }
};
template <PolicyLossOutputs (*Impl)(const PolicyLossArgs&)>
constexpr PolicyLossSignature* checked_policy_loss = &PolicyLossEntry<PolicyLossSignature>::template call<Impl>;

// The inputs, shape and options of a backend's kernel arguments (the CPU's and the CUDA PolicyLossKernelArgs)
// from the checked arguments; `view(tensor, row_stride, col_stride)` makes the backend's (B, T) view of one input.
template <typename KernelArgs, typename MakeView>
void set_policy_loss_inputs(KernelArgs& k, const PolicyLossArgs& a, MakeView view) {
  using View = decltype(view(a.log_probs, 0, 0));
  const auto optional = [&](const OptionalTensor& t) { return t.has_value() ? view(*t, t->stride(0), t->stride(1)) : View{}; };
  k.log_probs = view(a.log_probs, a.log_probs.stride(0), a.log_probs.stride(1));
  k.old_log_probs = optional(a.old_log_probs);
  k.advantages = view(a.advantages, a.advantages_row_stride, a.advantages_col_stride);
  k.mask = optional(a.mask);
  k.token_weights = optional(a.token_weights);
  k.rollout_log_probs = optional(a.rollout_log_probs);
  k.ref_log_probs = optional(a.ref_log_probs);
  k.B = a.B;
  k.T = a.T;
  k.options = a.options;
}

void check_policy_loss_backward_args(const at::Tensor& grad_loss, const at::Tensor& token_grad,
                                     const at::Tensor& grad_scale, at::ScalarType dtype);

// A normaliser's value (a number, or a tensor the backend read) must be finite and >= 0.
void check_normaliser_value(double value, const char* name);

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
// naming the argument. The CPU backend checks the labels' range too (CUDA: a NaN log-prob, no synchronisation).
LogitsLayout check_token_log_probs_args(const at::Tensor& logits, const at::Tensor& labels, double temperature);

// The per-row inputs of the token_log_probs backward ops, checked: of the labels' shape, on the logits' device,
// contiguous and in the accumulation type (float32, float64 for float64 logits; grad_log_probs converted, e.g.
// the expanded gradient of a sum()). grad_entropy / entropy undefined: no entropy term.
struct TokenLogProbsBackwardInputs {
  LogitsLayout layout;
  at::Tensor grad_log_probs, logsumexp, grad_entropy, entropy;
};

// The arguments of the backward ops: those of token_log_probs, grad_log_probs and the saved logsumexp, and
// grad_entropy with the saved entropy (both or neither).
TokenLogProbsBackwardInputs check_token_log_probs_backward_args(const at::Tensor& grad_log_probs,
                                                                const at::Tensor& logits, const at::Tensor& labels,
                                                                const at::Tensor& logsumexp, double temperature,
                                                                const OptionalTensor& grad_entropy,
                                                                const OptionalTensor& entropy);

// The in-place backward writes every row of the logits: they must not overlap (e.g. an expand()ed tensor).
void check_writable_logits(const at::Tensor& logits);

// The outputs of ppo_ext::token_log_probs, uninitialised, contiguous, of the labels' shape (entropy (0,) when
// not asked for).
TokenLogProbsOutputs empty_token_log_probs_outputs(const at::Tensor& logits, const at::Tensor& labels,
                                                   bool compute_entropy);

// ppo_ext::hidden_log_probs: hidden (B, T, H) or (N, H), weight (V, H), bias (V,) or none, of one float dtype
// and device; labels int64 of hidden's shape without H. N = B * T rows, taken `chunk` at a time.
struct HiddenLayout {
  int64_t N, H, V, chunk;
};

// Checks the arguments of ppo_ext::hidden_log_probs with an error naming the argument; chunk_tokens 0 is replaced
// by the default (default_chunk_tokens).
HiddenLayout check_hidden_log_probs_args(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                                         const OptionalTensor& bias, double temperature, int64_t chunk_tokens);

// The rows a chunk of hidden_log_probs holds by default: a (chunk, V) buffer of about kHiddenChunkBytes, within
// [kHiddenMinChunk, kHiddenMaxChunk] rows: enough rows for the GEMMs to run at speed (on 2 Xeon cores with AMX,
// N = 8192, H = 1024, V = 32000 bf16: fwd+bwd 2.4 s at 128 rows, 1.45 s at 384 and at 1024), few enough that the
// buffer stays within 5% of the logits it replaces from N = 8192 tokens on (384 x 32000 bf16: 24 MB of 512 MB).
constexpr int64_t kHiddenChunkBytes = int64_t(64) << 20, kHiddenMinChunk = 256, kHiddenMaxChunk = 384;
int64_t default_chunk_tokens(int64_t V, int64_t element_size);

// The row stride, in elements, of a buffer of logits rows `cols` long: cols rounded up to a multiple of 16 bytes, so
// that every row starts 16-byte aligned (the kernels' 16-byte loads and stores, the GEMMs' vector paths) whatever
// the vocabulary: at V = 50257 (GPT-2's), rows V apart leave 7 rows in 8 of a 16-bit buffer misaligned.
int64_t logits_row_stride(int64_t cols, int64_t element_size);

// float32 arithmetic, float64 for float64 log-probs.
inline at::ScalarType acc_type_for(at::ScalarType log_probs_dtype) {
  return log_probs_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace ppo_ext
