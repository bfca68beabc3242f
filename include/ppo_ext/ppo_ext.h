// The C++ API of ppo_ext, for LibTorch programs: functions that call the ppo_ext ops through the
// dispatcher (as torchvision's ops do), so they run the CPU or CUDA kernels and the autograd formula
// that libppo_ext_ops registers. Link libppo_ext_ops (CMake target ppo_ext_ops; the linker must keep it,
// which the target asks for with --no-as-needed) or load it with torch::ops::load_library first.
// What the ops compute: docs/SPEC.md. Their schemas, with the defaults used here: csrc/ops.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>

namespace ppo_ext {

using OptionalTensor = std::optional<at::Tensor>;

// loss (0-dim), metrics (float32, ppo_ext.METRIC_NAMES order), counts (int64, ppo_ext.COUNT_NAMES order),
// token_grad and grad_scale (saved for the backward).
using PolicyLossOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
// log_probs, logsumexp, entropy.
using TokenLogProbsOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// The C++ signatures of the ops, argument for argument as the schemas of csrc/ops.cpp.
using PolicyLossSignature = PolicyLossOutputs(
    const at::Tensor& log_probs, const OptionalTensor& old_log_probs, const at::Tensor& advantages,
    const OptionalTensor& mask, const OptionalTensor& token_weights, const OptionalTensor& num_tokens,
    const OptionalTensor& num_seqs, const OptionalTensor& loss_scale_factor, std::optional<double> num_tokens_value,
    std::optional<double> num_seqs_value, std::optional<double> loss_scale_factor_value, double clip_low,
    std::optional<double> clip_high, std::optional<double> dual_clip, std::optional<double> ratio_cap,
    std::optional<double> log_ratio_clamp, c10::string_view loss_type, double tau_pos, double tau_neg,
    std::optional<double> dro_beta, double vespo_k_pos, double vespo_lambda_pos, double vespo_k_neg,
    double vespo_lambda_neg, const OptionalTensor& rollout_log_probs, c10::string_view rollout_is,
    c10::string_view rollout_is_mode, std::optional<double> rollout_is_low, std::optional<double> rollout_is_high,
    c10::string_view rollout_is_mask_weight, const OptionalTensor& ref_log_probs, double kl_coef,
    c10::string_view kl_estimator, std::optional<double> kl_clamp, bool kl_bias_correction,
    c10::string_view importance_sampling, c10::string_view loss_agg_mode, bool compute_grad);
using PolicyLossBackwardSignature = at::Tensor(const at::Tensor& grad_loss, const at::Tensor& token_grad,
                                               const at::Tensor& grad_scale, at::ScalarType dtype);
using PolicyLossBackwardInplaceSignature = void(const at::Tensor& grad_loss, const at::Tensor& token_grad,
                                                const at::Tensor& grad_scale);
using TokenLogProbsSignature = TokenLogProbsOutputs(const at::Tensor& logits, const at::Tensor& labels,
                                                    double temperature, bool compute_entropy,
                                                    bool inplace_backward);
using TokenLogProbsBackwardSignature = at::Tensor(const at::Tensor& grad_log_probs, const at::Tensor& logits,
                                                  const at::Tensor& labels, const at::Tensor& logsumexp,
                                                  double temperature, const OptionalTensor& grad_entropy,
                                                  const OptionalTensor& entropy);
using TokenLogProbsBackwardInplaceSignature = void(const at::Tensor& grad_log_probs, const at::Tensor& logits,
                                                   const at::Tensor& labels, const at::Tensor& logsumexp,
                                                   double temperature, const OptionalTensor& grad_entropy,
                                                   const OptionalTensor& entropy);

// grad_hidden, grad_weight, grad_bias ((0,) where output_mask says not to compute it).
using HiddenLogProbsBackwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using HiddenLogProbsSignature = TokenLogProbsOutputs(const at::Tensor& hidden, const at::Tensor& weight,
                                                     const at::Tensor& labels, const OptionalTensor& bias,
                                                     double temperature, bool compute_entropy, int64_t chunk_tokens);
using HiddenLogProbsBackwardSignature = HiddenLogProbsBackwardOutputs(
    const at::Tensor& grad_log_probs, const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
    const at::Tensor& logsumexp, const OptionalTensor& bias, double temperature, int64_t chunk_tokens,
    const OptionalTensor& grad_entropy, const OptionalTensor& entropy, std::array<bool, 3> output_mask);

// The dispatcher's handle of the op `name` ("ppo_ext::policy_loss"), typed by its signature; a caller keeps
// it in a static (the lookup is a hash-table search).
template <typename Signature>
c10::TypedOperatorHandle<Signature> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").template typed<Signature>();
}

// The options of policy_loss after its three leading arguments, with the schema's defaults. A normaliser
// is a 0-dim tensor (read on the device, no synchronisation) or a number, not both.
struct PolicyLossOptions {
  OptionalTensor mask, token_weights;
  OptionalTensor num_tokens, num_seqs, loss_scale_factor;
  std::optional<double> num_tokens_value, num_seqs_value, loss_scale_factor_value;
  double clip_low = 0.2;
  std::optional<double> clip_high;  // default: clip_low
  std::optional<double> dual_clip, log_ratio_clamp;
  std::optional<double> ratio_cap;  // the unclipped term's ratio capped: min(r, ratio_cap) (TRL's delta)
  std::string loss_type = "vanilla";  // the family: ppo_ext.LOSS_TYPES
  double tau_pos = 1.0, tau_neg = 1.05;  // sapo's gate temperatures
  std::optional<double> dro_beta;        // dro's penalty (required by "dro")
  // vespo's Gamma weight exp(lambda + k log w - lambda w) of the row's log-weight: (k, lambda) for A >= 0 and A < 0.
  double vespo_k_pos = 2.0, vespo_lambda_pos = 3.0, vespo_k_neg = 3.0, vespo_lambda_neg = 2.0;
  // The rollout correction from the inference engine's log-probs: "none", "token", "seq", "seq-mean"; "truncate"
  // or "mask" to [rollout_is_low, rollout_is_high]; kept tokens weighted by their "unit"'s ratio or their "token"'s.
  OptionalTensor rollout_log_probs;
  std::string rollout_is = "none", rollout_is_mode = "truncate", rollout_is_mask_weight = "unit";
  std::optional<double> rollout_is_low, rollout_is_high;
  // The KL to the reference policy: ref_log_probs, kl_coef times its aggregated estimate added to the loss; the
  // estimator ("low_var_kl"/"k3", "kl"/"k1", "abs", "mse"/"k2", with "+" k2's gradient), its value clamped to
  // [-kl_clamp, kl_clamp] (none: 10 for k3, else not clamped), times the ratio with kl_bias_correction.
  OptionalTensor ref_log_probs;
  double kl_coef = 0.0;
  std::string kl_estimator = "low_var_kl";
  std::optional<double> kl_clamp;
  bool kl_bias_correction = false;
  std::string importance_sampling = "token";  // "token", "seq", "seq-token"
  std::string loss_agg_mode = "token-mean";
  bool compute_grad = true;  // false: no gradient is saved (an inference-only call)
};

// The loss of ppo_ext.policy_loss, differentiable w.r.t. log_probs (autograd), with its metrics and counts.
inline PolicyLossOutputs policy_loss(const at::Tensor& log_probs, const OptionalTensor& old_log_probs,
                                     const at::Tensor& advantages, const PolicyLossOptions& o = {}) {
  static const auto op = typed_op<PolicyLossSignature>("ppo_ext::policy_loss");
  return op.call(
      log_probs, old_log_probs, advantages, o.mask, o.token_weights, o.num_tokens, o.num_seqs, o.loss_scale_factor,
      o.num_tokens_value, o.num_seqs_value, o.loss_scale_factor_value, o.clip_low, o.clip_high, o.dual_clip,
      o.ratio_cap, o.log_ratio_clamp, o.loss_type, o.tau_pos, o.tau_neg, o.dro_beta, o.vespo_k_pos,
      o.vespo_lambda_pos, o.vespo_k_neg, o.vespo_lambda_neg, o.rollout_log_probs,
      o.rollout_is, o.rollout_is_mode, o.rollout_is_low, o.rollout_is_high, o.rollout_is_mask_weight,
      o.ref_log_probs, o.kl_coef, o.kl_estimator, o.kl_clamp, o.kl_bias_correction, o.importance_sampling, o.loss_agg_mode, o.compute_grad);
}

// log_softmax(logits / temperature) at the labels (differentiable w.r.t. the logits), their log-sum-exp and,
// when compute_entropy, the entropy of each row (differentiable too: an entropy bonus' gradient joins the same
// backward pass).
inline TokenLogProbsOutputs token_log_probs(const at::Tensor& logits, const at::Tensor& labels,
                                            double temperature = 1.0, bool compute_entropy = false,
                                            bool inplace_backward = false) {
  static const auto op = typed_op<TokenLogProbsSignature>("ppo_ext::token_log_probs");
  return op.call(logits, labels, temperature, compute_entropy, inplace_backward);
}

// The same from the hidden states: logits = hidden @ weight^T (+ bias), chunk by chunk (chunk_tokens rows; 0: the
// default from V), never all of them at once; differentiable w.r.t. hidden, weight and bias.
inline TokenLogProbsOutputs hidden_log_probs(const at::Tensor& hidden, const at::Tensor& weight,
                                             const at::Tensor& labels, const OptionalTensor& bias = std::nullopt,
                                             double temperature = 1.0, bool compute_entropy = false,
                                             int64_t chunk_tokens = 0) {
  static const auto op = typed_op<HiddenLogProbsSignature>("ppo_ext::hidden_log_probs");
  return op.call(hidden, weight, labels, bias, temperature, compute_entropy, chunk_tokens);
}

}  // namespace ppo_ext
