// The argument checks and output allocations of the ppo_ext ops (declared in checks.h), shared by the CPU and
// CUDA backends and by the CUDA simulator of tests/cuda_sim. The schemas are in ops.cpp.
#include "checks.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <string_view>

namespace ppo_ext {
namespace {

// The option names, in the order of their enums (policy_loss.h); ppo_ext/names.py is the Python list.
constexpr std::string_view kLossTypeNames[] = {"vanilla", "cispo", "sapo", "gpg", "dro", "dppo_tv", "dppo_kl",
                                               "geo_mean", "vespo", "value"};
constexpr std::string_view kImportanceSamplingNames[] = {"token", "seq", "seq-token"};
constexpr std::string_view kRolloutIsNames[] = {"none", "token", "seq", "seq-mean"};
constexpr std::string_view kRolloutIsModeNames[] = {"truncate", "mask"};
constexpr std::string_view kRolloutIsMaskWeightNames[] = {"unit", "token"};
// kl_estimator: verl's kl_penalty names (each also with a "+" suffix), and the estimator each names.
constexpr std::string_view kKlEstimatorNames[] = {"kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3"};
constexpr KlEstimator kKlEstimatorOfName[] = {KlEstimator::K1, KlEstimator::K1, KlEstimator::Abs, KlEstimator::K2,
                                              KlEstimator::K2, KlEstimator::K3, KlEstimator::K3};
constexpr std::string_view kLossAggModeNames[] = {"token-mean", "token-sum", "seq-mean-token-mean",
                                                  "seq-mean-token-sum", "seq-mean-token-sum-norm"};

// The enum value named `s`, or an error: `<argument> must be one of "a", "b", got "s"<note>`.
template <typename Enum, size_t N>
Enum parse_name(const std::string_view (&names)[N], c10::string_view s, const char* argument, const char* note = "") {
  const std::string_view name(s.data(), s.size());
  for (size_t k = 0; k < N; ++k) {
    if (names[k] == name) return static_cast<Enum>(k);
  }
  std::string expected;
  for (size_t k = 0; k < N; ++k) expected += (k ? ", \"" : "\"") + std::string(names[k]) + "\"";
  TORCH_CHECK_VALUE(false, argument, " must be one of ", expected, ", got \"", name, "\"", note);
}

// The floating dtypes the kernels read (float8 and complex are refused by name).
bool is_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

bool is_mask_dtype(at::ScalarType t) {
  return t == at::kBool || t == at::kByte || t == at::kChar || t == at::kShort || t == at::kInt || t == at::kLong ||
         is_float(t);
}

void check_device(const at::Tensor& t, const char* name, const at::Tensor& log_probs) {
  TORCH_CHECK_VALUE(t.device() == log_probs.device(), name, " must be on the device of log_probs (",
                    log_probs.device(), "), got ", t.device());
}

void check_token_tensor(const at::Tensor& t, const char* name, const at::Tensor& log_probs) {
  check_device(t, name, log_probs);
  TORCH_CHECK_VALUE(t.sizes() == log_probs.sizes(), name, " must have the shape of log_probs ", log_probs.sizes(),
                    ", got ", t.sizes());
}

void check_normaliser(const std::optional<at::Tensor>& tensor, std::optional<double> value, const char* name,
                      const at::Tensor& log_probs) {
  TORCH_CHECK_VALUE(!(tensor.has_value() && value.has_value()), name, " was given both as a tensor and as a number");
  if (tensor.has_value()) {
    check_device(*tensor, name, log_probs);
    TORCH_CHECK_VALUE(tensor->dim() == 0, name, " must be a 0-dim tensor or a number, got a tensor of shape ",
                      tensor->sizes());
    TORCH_CHECK_TYPE(is_mask_dtype(tensor->scalar_type()) && tensor->scalar_type() != at::kBool, name,
                     " must be a real number (an integer or float32/float64/float16/bfloat16 tensor), got dtype ",
                     tensor->scalar_type());
  }
  if (value.has_value()) check_normaliser_value(*value, name);
}

}  // namespace

void check_normaliser_value(double value, const char* name) {
  TORCH_CHECK_VALUE(std::isfinite(value) && value >= 0, name, " must be a finite number >= 0, got ", value);
}

PolicyLossOutputs empty_policy_loss_outputs(const at::Tensor& log_probs, bool compute_grad) {
  const auto acc = log_probs.options().dtype(acc_type_for(log_probs.scalar_type()));
  at::Tensor token_grad = compute_grad ? at::empty(log_probs.sizes(), acc) : at::empty({0}, acc);
  return {at::empty({}, acc), at::empty({kNumMetrics}, log_probs.options().dtype(at::kFloat)),
          at::empty({kNumCounts}, log_probs.options().dtype(at::kLong)), std::move(token_grad), at::empty({}, acc)};
}

PolicyLossArgs check_policy_loss_args(const at::Tensor& log_probs, const OptionalTensor& old_log_probs,
                                      const at::Tensor& advantages, const OptionalTensor& mask,
                                      const OptionalTensor& token_weights, const OptionalTensor& num_tokens,
                                      const OptionalTensor& num_seqs, const OptionalTensor& loss_scale_factor,
                                      std::optional<double> num_tokens_value, std::optional<double> num_seqs_value,
                                      std::optional<double> loss_scale_factor_value, double clip_low,
                                      std::optional<double> clip_high_or_low, std::optional<double> dual_clip,
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
                                      bool compute_grad) {
  const double clip_high = clip_high_or_low.value_or(clip_low);
  TORCH_CHECK_VALUE(log_probs.dim() == 2, "log_probs must have shape (B, T), got ", log_probs.sizes());
  const auto lp_dtype = log_probs.scalar_type();
  TORCH_CHECK_TYPE(lp_dtype == at::kFloat || lp_dtype == at::kBFloat16 || lp_dtype == at::kHalf ||
                       lp_dtype == at::kDouble,
                   "log_probs must be float32, bfloat16, float16 or float64, got ", lp_dtype);
  if (old_log_probs.has_value()) {
    check_token_tensor(*old_log_probs, "old_log_probs", log_probs);
    TORCH_CHECK_TYPE(is_float(old_log_probs->scalar_type()),
                     "old_log_probs must be float32, float64, float16 or bfloat16, got ", old_log_probs->scalar_type());
  }
  check_device(advantages, "advantages", log_probs);
  const int64_t B = log_probs.size(0), T = log_probs.size(1);
  const bool adv_shape_ok = (advantages.dim() == 1 && advantages.size(0) == B) ||
                            (advantages.dim() == 2 && advantages.size(0) == B &&
                             (advantages.size(1) == T || advantages.size(1) == 1));
  TORCH_CHECK_VALUE(adv_shape_ok, "advantages must have shape (B, T), (B, 1) or (B,) with (B, T) = ",
                    log_probs.sizes(), ", got ", advantages.sizes());
  TORCH_CHECK_TYPE(is_float(advantages.scalar_type()),
                   "advantages must be float32, float64, float16 or bfloat16, got ", advantages.scalar_type());
  if (mask.has_value()) {
    check_token_tensor(*mask, "mask", log_probs);
    const auto t = mask->scalar_type();
    TORCH_CHECK_TYPE(is_mask_dtype(t),
                     "mask must be bool, uint8, int8, int16, int32, int64, float32, float64, float16 or bfloat16, got ",
                     t);
  }
  if (token_weights.has_value()) {
    check_token_tensor(*token_weights, "token_weights", log_probs);
    TORCH_CHECK_TYPE(is_float(token_weights->scalar_type()),
                     "token_weights must be float32, float64, float16 or bfloat16, got ", token_weights->scalar_type());
  }
  if (rollout_log_probs.has_value()) {
    check_token_tensor(*rollout_log_probs, "rollout_log_probs", log_probs);
    TORCH_CHECK_TYPE(is_float(rollout_log_probs->scalar_type()),
                     "rollout_log_probs must be float32, float64, float16 or bfloat16, got ",
                     rollout_log_probs->scalar_type());
  }
  check_normaliser(num_tokens, num_tokens_value, "num_tokens", log_probs);
  check_normaliser(num_seqs, num_seqs_value, "num_seqs", log_probs);
  check_normaliser(loss_scale_factor, loss_scale_factor_value, "loss_scale_factor", log_probs);

  TORCH_CHECK_VALUE(std::isfinite(clip_low) && clip_low >= 0, "clip_low must be a finite number >= 0, got ",
                    clip_low);
  TORCH_CHECK_VALUE(std::isfinite(clip_high) && clip_high >= 0, "clip_high must be a finite number >= 0, got ",
                    clip_high);
  if (dual_clip.has_value()) {
    TORCH_CHECK_VALUE(*dual_clip > 1, "dual_clip must be > 1 (or None), got ", *dual_clip);
  }
  if (ratio_cap.has_value()) {
    TORCH_CHECK_VALUE(std::isfinite(*ratio_cap) && *ratio_cap > 0,
                      "ratio_cap must be a finite number > 0 (or None), got ", *ratio_cap);
  }
  if (log_ratio_clamp.has_value()) {
    TORCH_CHECK_VALUE(*log_ratio_clamp > 0, "log_ratio_clamp must be > 0 (or None), got ", *log_ratio_clamp);
  }
  LossOptions o;
  o.loss_type = parse_name<LossType>(kLossTypeNames, loss_type, "loss_type");
  const std::string_view family = kLossTypeNames[static_cast<int>(o.loss_type)];
  const bool ratio_family = o.loss_type == LossType::Vanilla || o.loss_type == LossType::Cispo ||
                            o.loss_type == LossType::Sapo;
  const bool truncating_family = o.loss_type == LossType::Vanilla || o.loss_type == LossType::DppoTv ||
                                 o.loss_type == LossType::DppoKl;
  TORCH_CHECK_VALUE(!dual_clip.has_value() || o.loss_type == LossType::Vanilla,
                    "dual_clip applies to loss_type \"vanilla\" only, got loss_type \"", family, "\"");
  TORCH_CHECK_VALUE(!ratio_cap.has_value() || truncating_family,
                    "ratio_cap applies to loss_type \"vanilla\", \"dppo_tv\" and \"dppo_kl\" only, got loss_type \"",
                    family, "\"");
  TORCH_CHECK_VALUE(!log_ratio_clamp.has_value() || o.loss_type != LossType::Value,
                    "log_ratio_clamp does not apply to loss_type \"value\" (it has no ratio)");
  TORCH_CHECK_VALUE(!log_ratio_clamp.has_value() || o.loss_type != LossType::Vespo,
                    "log_ratio_clamp does not apply to loss_type \"vespo\" (its row log-weight clamps each log-ratio to "
                    "[-20, 20] itself)");
  TORCH_CHECK_VALUE(std::isfinite(tau_pos) && tau_pos > 0, "tau_pos must be a finite number > 0, got ", tau_pos);
  TORCH_CHECK_VALUE(std::isfinite(tau_neg) && tau_neg > 0, "tau_neg must be a finite number > 0, got ", tau_neg);
  if (o.loss_type == LossType::Dro) {
    TORCH_CHECK_VALUE(dro_beta.has_value() && std::isfinite(*dro_beta) && *dro_beta > 0,
                      "dro_beta must be a finite number > 0 with loss_type \"dro\", got ",
                      dro_beta.has_value() ? std::to_string(*dro_beta) : std::string("None"));
  } else {
    TORCH_CHECK_VALUE(!dro_beta.has_value(), "dro_beta applies to loss_type \"dro\" only, got loss_type \"", family,
                      "\"");
  }
  for (const auto& [value, name] : {std::pair{vespo_k_pos, "vespo_k_pos"}, std::pair{vespo_lambda_pos, "vespo_lambda_pos"},
                                    std::pair{vespo_k_neg, "vespo_k_neg"}, std::pair{vespo_lambda_neg, "vespo_lambda_neg"}}) {
    TORCH_CHECK_VALUE(std::isfinite(value), name, " must be a finite number, got ", value);
  }
  o.importance_sampling = parse_name<ImportanceSampling>(kImportanceSamplingNames, importance_sampling,
                                                         "importance_sampling");
  o.loss_agg_mode = parse_name<LossAggMode>(kLossAggModeNames, loss_agg_mode, "loss_agg_mode");
  const std::string_view level(importance_sampling.data(), importance_sampling.size());
  if (o.loss_type == LossType::GeoMean) {
    TORCH_CHECK_VALUE(o.importance_sampling != ImportanceSampling::Token,
                      "loss_type \"geo_mean\" is a sequence-level loss: importance_sampling must be \"seq\" or "
                      "\"seq-token\", got \"", level, "\"");
  } else {
    TORCH_CHECK_VALUE(o.importance_sampling == ImportanceSampling::Token || ratio_family, "loss_type \"", family,
                      "\" is defined at the token level: importance_sampling must be \"token\", got \"", level,
                      "\"");
  }
  o.rollout_is = parse_name<RolloutIs>(kRolloutIsNames, rollout_is, "rollout_is");
  o.rollout_is_mode = parse_name<RolloutIsMode>(kRolloutIsModeNames, rollout_is_mode, "rollout_is_mode");
  o.rollout_is_mask_weight =
      parse_name<RolloutIsMaskWeight>(kRolloutIsMaskWeightNames, rollout_is_mask_weight, "rollout_is_mask_weight");
  const bool correcting = o.rollout_is != RolloutIs::None;
  TORCH_CHECK_VALUE(o.loss_type != LossType::Vespo || !is_row_level(o.rollout_is),
                    "loss_type \"vespo\" takes a token-level rollout correction (rollout_is \"token\"), whose log-weights "
                    "join its row log-weight; got rollout_is \"", std::string_view(rollout_is.data(), rollout_is.size()),
                    "\"");
  TORCH_CHECK_VALUE(correcting == rollout_log_probs.has_value(),
                    correcting ? "rollout_is needs rollout_log_probs (the inference engine's log-probs)"
                               : "rollout_log_probs was given with rollout_is=\"none\": say which correction");
  for (const auto& [bound, name] : {std::pair{rollout_is_low, "rollout_is_low"}, std::pair{rollout_is_high, "rollout_is_high"}}) {
    TORCH_CHECK_VALUE(!bound.has_value() || (std::isfinite(*bound) && *bound >= 0), name,
                      " must be a finite number >= 0 (or None), got ", bound.value_or(0.0));
    TORCH_CHECK_VALUE(!bound.has_value() || correcting, name, " was given with rollout_is=\"none\"");
  }
  TORCH_CHECK_VALUE(!correcting || rollout_is_low.has_value() || rollout_is_high.has_value(),
                    "rollout_is needs a bound: rollout_is_low, rollout_is_high or both");
  TORCH_CHECK_VALUE(!(rollout_is_low.has_value() && rollout_is_high.has_value()) || *rollout_is_low <= *rollout_is_high,
                    "rollout_is_low must be <= rollout_is_high, got ", rollout_is_low.value_or(0.0), " > ",
                    rollout_is_high.value_or(0.0));
  o.has_ref_kl = ref_log_probs.has_value();
  if (o.has_ref_kl) {
    check_token_tensor(*ref_log_probs, "ref_log_probs", log_probs);
    TORCH_CHECK_TYPE(is_float(ref_log_probs->scalar_type()),
                     "ref_log_probs must be float32, float64, float16 or bfloat16, got ", ref_log_probs->scalar_type());
    TORCH_CHECK_VALUE(o.loss_type != LossType::Value,
                      "ref_log_probs does not apply to loss_type \"value\" (the critic has no reference policy)");
  }
  TORCH_CHECK_VALUE(std::isfinite(kl_coef), "kl_coef must be a finite number, got ", kl_coef);
  TORCH_CHECK_VALUE(kl_coef == 0 || o.has_ref_kl, "kl_coef needs ref_log_probs (the reference policy's log-probs)");
  std::string_view estimator(kl_estimator.data(), kl_estimator.size());
  o.kl_straight_through = !estimator.empty() && estimator.back() == '+';
  if (o.kl_straight_through) estimator.remove_suffix(1);
  o.kl_estimator = kKlEstimatorOfName[parse_name<size_t>(
      kKlEstimatorNames, c10::string_view(estimator.data(), estimator.size()), "kl_estimator",
      " (each may end in \"+\": its value with k2's gradient)")];
  TORCH_CHECK_VALUE(o.has_ref_kl || !(kl_clamp.has_value() || kl_bias_correction),
                    "kl_clamp and kl_bias_correction need ref_log_probs (the reference policy's log-probs)");
  TORCH_CHECK_VALUE(!kl_clamp.has_value() || *kl_clamp > 0, "kl_clamp must be > 0 (or None: the estimator's own), got ",
                    kl_clamp.value_or(0.0));
  // None: the estimator's own clamps (verl's k3: lp - ref to [-20, 20], the value to [-10, 10]); a number: the value's only.
  const bool verl_k3 = o.kl_estimator == KlEstimator::K3 && !kl_clamp.has_value();
  o.kl_clamp = kl_clamp.value_or(verl_k3 ? 10.0 : INFINITY);
  o.kl_log_ratio_clamp = verl_k3 ? 20.0 : INFINITY;
  o.kl_coef = kl_coef;
  o.kl_bias_correction = kl_bias_correction;
  o.rollout_is_low = rollout_is_low.value_or(-INFINITY);
  o.rollout_is_high = rollout_is_high.value_or(INFINITY);
  o.clip_low = clip_low;
  o.clip_high = clip_high;
  o.tau_pos = tau_pos;
  o.tau_neg = tau_neg;
  o.dro_beta = dro_beta.value_or(0.0);
  o.vespo_k_pos = vespo_k_pos;
  o.vespo_k_neg = vespo_k_neg;
  o.vespo_lambda_pos = vespo_lambda_pos;
  o.vespo_lambda_neg = vespo_lambda_neg;
  o.ratio_low = 1.0 - clip_low;
  o.ratio_high = 1.0 + clip_high;
  o.has_dual_clip = dual_clip.has_value();
  o.dual_clip = dual_clip.value_or(0.0);
  o.has_ratio_cap = ratio_cap.has_value();
  o.ratio_cap = ratio_cap.value_or(0.0);
  o.has_log_ratio_clamp = log_ratio_clamp.has_value();
  o.log_ratio_clamp = log_ratio_clamp.value_or(0.0);
  // (B,) and (B, 1) advantages broadcast along T.
  const int64_t adv_col_stride = advantages.dim() == 2 && advantages.size(1) != 1 ? advantages.stride(1) : 0;
  const auto number = [](std::optional<double> v) { return Normaliser{v.has_value(), v.value_or(0.0)}; };
  return PolicyLossArgs{log_probs,
                        old_log_probs,
                        advantages,
                        mask,
                        token_weights,
                        rollout_log_probs,
                        ref_log_probs,
                        {num_tokens, number(num_tokens_value)},
                        {num_seqs, number(num_seqs_value)},
                        {loss_scale_factor, number(loss_scale_factor_value)},
                        o,
                        compute_grad,
                        B,
                        T,
                        advantages.stride(0),
                        adv_col_stride};
}

void check_policy_loss_backward_args(const at::Tensor& grad_loss, const at::Tensor& token_grad,
                                     const at::Tensor& grad_scale, at::ScalarType dtype) {
  TORCH_CHECK_TYPE(is_float(dtype), "dtype must be float32, float64, float16 or bfloat16 (that of log_probs), got ",
                   dtype);
  TORCH_CHECK_TYPE(is_float(grad_loss.scalar_type()), "grad_loss must be float32, float64, float16 or bfloat16, got ",
                   grad_loss.scalar_type());
  TORCH_CHECK_VALUE(grad_loss.dim() == 0, "grad_loss must be a 0-dim tensor, got shape ", grad_loss.sizes());
  TORCH_CHECK_VALUE(token_grad.dim() == 2,
                    "token_grad must be the (B, T) gradient saved by policy_loss(compute_grad=True), got shape ",
                    token_grad.sizes());
  TORCH_CHECK_VALUE(token_grad.is_contiguous(), "token_grad must be contiguous");
  TORCH_CHECK_VALUE(grad_scale.dim() == 0, "grad_scale must be a 0-dim tensor, got shape ", grad_scale.sizes());
  TORCH_CHECK_TYPE(token_grad.scalar_type() == at::kFloat || token_grad.scalar_type() == at::kDouble,
                   "token_grad must be float32 or float64, got ", token_grad.scalar_type());
  TORCH_CHECK_TYPE(grad_scale.scalar_type() == token_grad.scalar_type(), "grad_scale must have the dtype of token_grad");
  TORCH_CHECK_VALUE(grad_loss.device() == token_grad.device() && grad_scale.device() == token_grad.device(),
                    "grad_loss, token_grad and grad_scale must be on one device");
}

LogitsLayout check_token_log_probs_args(const at::Tensor& logits, const at::Tensor& labels, double temperature) {
  TORCH_CHECK_VALUE(logits.dim() == 2 || logits.dim() == 3, "logits must have shape (B, T, V) or (N, V), got ",
                    logits.sizes());
  TORCH_CHECK_TYPE(is_float(logits.scalar_type()), "logits must be float32, bfloat16, float16 or float64, got ",
                   logits.scalar_type());
  const int64_t V = logits.size(-1);
  TORCH_CHECK_VALUE(logits.stride(-1) == 1 || V <= 1,
                    "logits must be contiguous along the vocabulary (last) dimension, got strides ",
                    logits.strides(), " (rows may have any stride, e.g. a slice of (B, T + 1, V))");
  TORCH_CHECK_VALUE(labels.device() == logits.device(), "labels must be on the device of logits (", logits.device(),
                    "), got ", labels.device());
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, "labels must be int64 token ids, got ", labels.scalar_type());
  TORCH_CHECK_VALUE(labels.sizes() == logits.sizes().slice(0, logits.dim() - 1),
                    "labels must have the shape of logits without its last dimension, ",
                    logits.sizes().slice(0, logits.dim() - 1), ", got ", labels.sizes());
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, "temperature must be a finite number > 0, got ",
                    temperature);
  LogitsLayout l{};
  l.V = V;
  if (logits.dim() == 3) {
    l.B = logits.size(0), l.T = logits.size(1);
    l.stride_b = logits.stride(0), l.stride_t = logits.stride(1);
    l.label_stride_b = labels.stride(0), l.label_stride_t = labels.stride(1);
  } else {
    l.B = logits.size(0), l.T = 1;
    l.stride_b = logits.stride(0), l.stride_t = 0;
    l.label_stride_b = labels.stride(0), l.label_stride_t = 0;
  }
  return l;
}

TokenLogProbsBackwardInputs check_token_log_probs_backward_args(const at::Tensor& grad_log_probs,
                                                                const at::Tensor& logits, const at::Tensor& labels,
                                                                const at::Tensor& logsumexp, double temperature,
                                                                const OptionalTensor& grad_entropy,
                                                                const OptionalTensor& entropy) {
  const LogitsLayout layout = check_token_log_probs_args(logits, labels, temperature);
  const auto acc = acc_type_for(logits.scalar_type());
  TORCH_CHECK_VALUE(grad_entropy.has_value() == entropy.has_value(),
                    "grad_entropy and entropy go together (the entropy's gradient needs the forward's entropy)");
  const at::Tensor none;
  for (const auto& [t, name] : {std::pair{&grad_log_probs, "grad_log_probs"}, std::pair{&logsumexp, "logsumexp"},
                                std::pair{grad_entropy ? &*grad_entropy : &none, "grad_entropy"},
                                std::pair{entropy ? &*entropy : &none, "entropy"}}) {
    if (!t->defined()) continue;
    TORCH_CHECK_VALUE(t->device() == logits.device(), name, " must be on the device of logits (", logits.device(),
                      "), got ", t->device());
    TORCH_CHECK_VALUE(t->sizes() == labels.sizes(), name, " must have the shape of labels ", labels.sizes(), ", got ",
                      t->sizes());
    TORCH_CHECK_TYPE(is_float(t->scalar_type()), name, " must be float32, float64, float16 or bfloat16, got ",
                     t->scalar_type());
  }
  for (const auto& [t, name] : {std::pair{&logsumexp, "logsumexp"}, std::pair{entropy ? &*entropy : &none, "entropy"}}) {
    TORCH_CHECK_TYPE(!t->defined() || t->scalar_type() == acc, name, " must be the ", acc,
                     " tensor saved by token_log_probs, got ", t->scalar_type());
  }
  const auto as_acc = [&](const at::Tensor& t) { return t.to(acc).contiguous(); };
  return {layout, as_acc(grad_log_probs), logsumexp.contiguous(), grad_entropy ? as_acc(*grad_entropy) : none,
          entropy ? entropy->contiguous() : none};
}

void check_writable_logits(const at::Tensor& logits) {
  TORCH_CHECK_VALUE(at::has_internal_overlap(logits) != at::MemOverlap::Yes,
                    "logits must not have overlapping rows (e.g. an expanded tensor) to take their gradient in place");
}

int64_t default_chunk_tokens(int64_t V, int64_t element_size) {
  const int64_t rows = kHiddenChunkBytes / std::max<int64_t>(1, V * element_size);
  return std::clamp(rows, kHiddenMinChunk, kHiddenMaxChunk);
}

int64_t logits_row_stride(int64_t cols, int64_t element_size) {
  const int64_t per_16_bytes = std::max<int64_t>(1, 16 / std::max<int64_t>(1, element_size));
  return (cols + per_16_bytes - 1) / per_16_bytes * per_16_bytes;
}

HiddenLayout check_hidden_log_probs_args(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                                         const OptionalTensor& bias, double temperature, int64_t chunk_tokens) {
  TORCH_CHECK_VALUE(hidden.dim() == 2 || hidden.dim() == 3, "hidden must have shape (B, T, H) or (N, H), got ",
                    hidden.sizes());
  TORCH_CHECK_TYPE(is_float(hidden.scalar_type()), "hidden must be float32, bfloat16, float16 or float64, got ",
                   hidden.scalar_type());
  const int64_t H = hidden.size(-1);
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == H, "weight must have shape (V, H) with H = ", H,
                    " (the last dimension of hidden; nn.Linear(H, V).weight), got ", weight.sizes());
  TORCH_CHECK_VALUE(weight.size(0) >= 1, "weight must have at least one row (the vocabulary), got ", weight.sizes());
  TORCH_CHECK_TYPE(weight.scalar_type() == hidden.scalar_type(), "weight must have the dtype of hidden (",
                   hidden.scalar_type(), "), got ", weight.scalar_type());
  TORCH_CHECK_VALUE(weight.device() == hidden.device(), "weight must be on the device of hidden (", hidden.device(),
                    "), got ", weight.device());
  const int64_t V = weight.size(0);
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == V, "bias must have shape (V,) with V = ", V,
                      " (the rows of weight), got ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == hidden.scalar_type(), "bias must have the dtype of hidden (",
                     hidden.scalar_type(), "), got ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->device() == hidden.device(), "bias must be on the device of hidden (", hidden.device(),
                      "), got ", bias->device());
  }
  TORCH_CHECK_VALUE(labels.device() == hidden.device(), "labels must be on the device of hidden (", hidden.device(),
                    "), got ", labels.device());
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, "labels must be int64 token ids, got ", labels.scalar_type());
  TORCH_CHECK_VALUE(labels.sizes() == hidden.sizes().slice(0, hidden.dim() - 1),
                    "labels must have the shape of hidden without its last dimension, ",
                    hidden.sizes().slice(0, hidden.dim() - 1), ", got ", labels.sizes());
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, "temperature must be a finite number > 0, got ",
                    temperature);
  TORCH_CHECK_VALUE(chunk_tokens >= 0, "chunk_tokens must be >= 1 (or 0/None: the default), got ", chunk_tokens);
  const int64_t N = labels.numel();
  const int64_t chunk = chunk_tokens > 0 ? chunk_tokens : default_chunk_tokens(V, hidden.element_size());
  return {N, H, V, std::max<int64_t>(1, std::min(chunk, N))};
}

TokenLogProbsOutputs empty_token_log_probs_outputs(const at::Tensor& logits, const at::Tensor& labels,
                                                   bool compute_entropy) {
  const auto acc = logits.options().dtype(acc_type_for(logits.scalar_type()));
  at::Tensor entropy = compute_entropy ? at::empty(labels.sizes(), acc) : at::empty({0}, acc);
  return {at::empty(labels.sizes(), acc), at::empty(labels.sizes(), acc), std::move(entropy)};
}

}  // namespace ppo_ext
