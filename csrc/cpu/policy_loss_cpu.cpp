// The CPU implementation of the ppo_ext ops (TORCH_LIBRARY_IMPL(ppo_ext, CPU)).
#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdlib>
#include <string_view>

#include "../checks.h"
#include "policy_loss_cpu.h"

namespace ppo_ext::cpu {

Capability capability() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  const char* forced_env = std::getenv("PPO_EXT_CPU_CAPABILITY");
  const std::string_view forced = forced_env ? forced_env : "";
  if (forced == "default") return Capability::Default;
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (avx512 && forced != "avx2") return Capability::Avx512;
  return avx2 ? Capability::Avx2 : Capability::Default;
#else
  return Capability::Default;
#endif
}

namespace {

StridedInput strided(const at::Tensor& t) {
  return {t.const_data_ptr(), t.scalar_type(), t.stride(0), t.stride(1)};
}

StridedInput strided(const std::optional<at::Tensor>& t) { return t.has_value() ? strided(*t) : StridedInput{}; }

Partials run_policy_loss_kernel(const KernelArgs& args) {
  switch (capability()) {
    case Capability::Avx512: return AVX512::policy_loss_kernel(args);
    case Capability::Avx2: return AVX2::policy_loss_kernel(args);
    default: return DEFAULT::policy_loss_kernel(args);
  }
}

Normaliser read_normaliser(const std::optional<at::Tensor>& tensor, std::optional<double> value, const char* name) {
  if (tensor.has_value()) return {true, checked_cpu_normaliser(*tensor, name)};
  return {value.has_value(), value.value_or(0.0)};
}

PolicyLossOutputs policy_loss_cpu(
    const at::Tensor& log_probs, const std::optional<at::Tensor>& old_log_probs, const at::Tensor& advantages,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& token_weights,
    const std::optional<at::Tensor>& num_tokens, const std::optional<at::Tensor>& num_seqs,
    const std::optional<at::Tensor>& loss_scale_factor, std::optional<double> num_tokens_value,
    std::optional<double> num_seqs_value, std::optional<double> loss_scale_factor_value, double clip_low,
    double clip_high, std::optional<double> dual_clip, std::optional<double> log_ratio_clamp,
    c10::string_view importance_sampling, c10::string_view loss_agg_mode, bool compute_grad) {
  const LossOptions options = check_policy_loss_args(
      log_probs, old_log_probs, advantages, mask, token_weights, num_tokens, num_seqs, loss_scale_factor,
      num_tokens_value, num_seqs_value, loss_scale_factor_value, clip_low, clip_high, dual_clip, log_ratio_clamp,
      std::string_view(importance_sampling.data(), importance_sampling.size()),
      std::string_view(loss_agg_mode.data(), loss_agg_mode.size()));
  const int64_t B = log_probs.size(0), T = log_probs.size(1);
  const auto acc_dtype = acc_type_for(log_probs.scalar_type());
  at::Tensor loss, metrics, counts, token_grad, grad_scale;
  std::tie(loss, metrics, counts, token_grad, grad_scale) = empty_policy_loss_outputs(log_probs, compute_grad);

  KernelArgs args;
  args.log_probs = strided(log_probs);
  args.old_log_probs = strided(old_log_probs);
  args.advantages = {advantages.const_data_ptr(), advantages.scalar_type(), advantage_strides(advantages).first,
                     advantage_strides(advantages).second};
  args.mask = strided(mask);
  args.token_weights = strided(token_weights);
  args.B = B;
  args.T = T;
  args.options = options;
  args.token_grad = compute_grad ? token_grad.mutable_data_ptr() : nullptr;
  const Normaliser tokens = read_normaliser(num_tokens, num_tokens_value, "num_tokens");
  const Normaliser seqs = read_normaliser(num_seqs, num_seqs_value, "num_seqs");
  const Normaliser scale = read_normaliser(loss_scale_factor, loss_scale_factor_value, "loss_scale_factor");
  const Partials sums = run_policy_loss_kernel(args);

  const double denominator = math::loss_denominator(options.loss_agg_mode, tokens, seqs, scale,
                                                    sums.counts[kValidTokens], sums.counts[kValidSeqs], T);
  AT_DISPATCH_V2(acc_dtype, "ppo_ext_cpu_finalize", AT_WRAP([&] {
    math::finalize<scalar_t>(sums, denominator, loss.mutable_data_ptr<scalar_t>(),
                             grad_scale.mutable_data_ptr<scalar_t>(), metrics.mutable_data_ptr<float>(),
                             counts.mutable_data_ptr<int64_t>());
  }), at::kFloat, at::kDouble);
  return {loss, metrics, counts, token_grad, grad_scale};
}

at::Tensor policy_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& token_grad,
                                    const at::Tensor& grad_scale, at::ScalarType dtype) {
  check_policy_loss_backward_args(grad_loss, token_grad, grad_scale, dtype);
  at::Tensor grad_log_probs = at::empty(token_grad.sizes(), token_grad.options().dtype(dtype));
  const double scale = grad_loss.item<double>() * grad_scale.item<double>();
  AT_DISPATCH_V2(token_grad.scalar_type(), "ppo_ext_cpu_backward", AT_WRAP([&] {
    using acc_t = scalar_t;
    const acc_t* src = token_grad.const_data_ptr<acc_t>();
    const acc_t s = static_cast<acc_t>(scale);
    AT_DISPATCH_V2(dtype, "ppo_ext_cpu_backward_out", AT_WRAP([&] {
      scalar_t* dst = grad_log_probs.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, token_grad.numel(), 32768, [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) dst[k] = static_cast<scalar_t>(src[k] * s);
      });
    }), at::kFloat, at::kDouble, at::kHalf, at::kBFloat16);
  }), at::kFloat, at::kDouble);
  return grad_log_probs;
}

}  // namespace

TORCH_LIBRARY_IMPL(ppo_ext, CPU, m) {
  m.impl("policy_loss", &policy_loss_cpu);
  m.impl("policy_loss_backward", &policy_loss_backward_cpu);
}

}  // namespace ppo_ext::cpu
