// The CPU implementation of the ppo_ext ops (TORCH_LIBRARY_IMPL(ppo_ext, CPU)).
#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../checks.h"
#include "capability.h"
#include "policy_loss_cpu.h"

namespace ppo_ext::cpu {

namespace {

// A tensor normaliser is read here, on the CPU (no synchronisation), and checked as numbers are.
Normaliser read_normaliser(const NormaliserArg& n, const char* name) {
  if (!n.tensor.has_value()) return n.number;
  const double value = n.tensor->item<double>();
  check_normaliser_value(value, name);
  return {true, value};
}

PolicyLossOutputs policy_loss_cpu(const PolicyLossArgs& a) {
  at::Tensor loss, metrics, counts, token_grad, grad_scale;  // not structured bindings: the lambda below uses them
  std::tie(loss, metrics, counts, token_grad, grad_scale) = empty_policy_loss_outputs(a.log_probs, a.compute_grad);
  PolicyLossKernelArgs args;
  set_policy_loss_inputs(args, a, [](const at::Tensor& t, int64_t row_stride, int64_t col_stride) {
    return StridedInput{t.const_data_ptr(), t.scalar_type(), row_stride, col_stride};
  });
  args.token_grad = a.compute_grad ? token_grad.mutable_data_ptr() : nullptr;
  const Normaliser tokens = read_normaliser(a.num_tokens, "num_tokens");
  const Normaliser seqs = read_normaliser(a.num_seqs, "num_seqs");
  const Normaliser scale = read_normaliser(a.loss_scale_factor, "loss_scale_factor");
  const Partials sums = PPO_EXT_CPU_DISPATCH(policy_loss_kernel, args);

  const double denominator = math::loss_denominator(a.options.loss_agg_mode, tokens, seqs, scale,
                                                    sums.counts[kValidTokens], sums.counts[kValidSeqs], a.T);
  AT_DISPATCH_V2(acc_type_for(a.log_probs.scalar_type()), "ppo_ext_cpu_finalize", AT_WRAP([&] {
    math::finalize<scalar_t>(sums, denominator, a.options, loss.mutable_data_ptr<scalar_t>(),
                             grad_scale.mutable_data_ptr<scalar_t>(), metrics.mutable_data_ptr<float>(),
                             counts.mutable_data_ptr<int64_t>());
  }), at::kFloat, at::kDouble);
  return {loss, metrics, counts, token_grad, grad_scale};
}

// out = grad_loss * grad_scale * token_grad in out's dtype; out may be token_grad itself.
void scale_token_grad(const at::Tensor& grad_loss, const at::Tensor& token_grad, const at::Tensor& grad_scale,
                      const at::Tensor& out) {
  const double scale = grad_loss.item<double>() * grad_scale.item<double>();
  AT_DISPATCH_V2(token_grad.scalar_type(), "ppo_ext_cpu_backward", AT_WRAP([&] {
    using acc_t = scalar_t;
    const acc_t* src = token_grad.const_data_ptr<acc_t>();
    const acc_t s = static_cast<acc_t>(scale);
    AT_DISPATCH_V2(out.scalar_type(), "ppo_ext_cpu_backward_out", AT_WRAP([&] {
      scalar_t* dst = out.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, token_grad.numel(), 32768, [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) dst[k] = static_cast<scalar_t>(src[k] * s);
      });
    }), at::kFloat, at::kDouble, at::kHalf, at::kBFloat16);
  }), at::kFloat, at::kDouble);
}

at::Tensor policy_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& token_grad,
                                    const at::Tensor& grad_scale, at::ScalarType dtype) {
  check_policy_loss_backward_args(grad_loss, token_grad, grad_scale, dtype);
  at::Tensor grad_log_probs = at::empty(token_grad.sizes(), token_grad.options().dtype(dtype));
  scale_token_grad(grad_loss, token_grad, grad_scale, grad_log_probs);
  return grad_log_probs;
}

void policy_loss_backward_inplace_cpu(const at::Tensor& grad_loss, const at::Tensor& token_grad,
                                      const at::Tensor& grad_scale) {
  check_policy_loss_backward_args(grad_loss, token_grad, grad_scale, token_grad.scalar_type());
  scale_token_grad(grad_loss, token_grad, grad_scale, token_grad);
}

}  // namespace

TORCH_LIBRARY_IMPL(ppo_ext, CPU, m) {
  m.impl("policy_loss", checked_policy_loss<&policy_loss_cpu>);
  m.impl("policy_loss_backward", &policy_loss_backward_cpu);
  m.impl("policy_loss_backward_inplace", &policy_loss_backward_inplace_cpu);
}

}  // namespace ppo_ext::cpu
