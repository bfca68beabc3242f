// The autograd formula of ppo_ext::policy_loss (TORCH_LIBRARY_IMPL(ppo_ext, Autograd)), for every
// device: the forward saves the per-token gradient it computed and the scale 1/denominator, the
// backward is the ppo_ext::policy_loss_backward op, or policy_loss_backward_inplace where nothing else can read
// the saved gradient (PolicyLossFunction::backward). Registered in C++ rather than with
// torch.library.register_autograd, whose Python wrapper costs ~60 us a call; torch.compile traces
// through it all the same (the ops have fake kernels, see ppo_ext/_ops.py).
#include <torch/autograd.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include "checks.h"

namespace ppo_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Only log_probs is differentiable: the other tensors are constants of the loss (docs/SPEC.md), detached so
// that a loss whose log_probs do not require grad is not attached to their graph either.
at::Tensor constant(const at::Tensor& t) { return t.detach(); }
OptionalTensor constant(const OptionalTensor& t) { return t.has_value() ? OptionalTensor(t->detach()) : t; }
template <typename T>
T constant(T value) {
  return value;
}

// The dispatcher handle of ppo_ext::policy_loss_backward_inplace, looked up once (used by the autograd backward and
// by its ADInplaceOrView kernel, InplaceBackwardKernel).
const auto& policy_loss_backward_inplace_op() {
  static const auto op = typed_op<PolicyLossBackwardInplaceSignature>("ppo_ext::policy_loss_backward_inplace");
  return op;
}

// The autograd formula of a policy_loss whose first argument is log_probs: spelled over the op's signature
// (PolicyLossSignature), so that it forwards every argument without naming them.
template <typename Signature>
class PolicyLossFunction;
template <typename... Rest>
class PolicyLossFunction<PolicyLossOutputs(const at::Tensor&, Rest...)>
    : public torch::autograd::Function<PolicyLossFunction<PolicyLossOutputs(const at::Tensor&, Rest...)>> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& log_probs, Rest... rest) {
    static const auto op = typed_op<PolicyLossSignature>("ppo_ext::policy_loss");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, metrics, counts, token_grad, grad_scale] = op.call(log_probs, rest...);
    // The caller's token_grad is a tensor of its own over the saved one's storage (and version counter), so that
    // the backward can tell whether the caller still holds it (may_take). The saved one is in saved_data, not
    // save_for_backward, for the same reason: a saved-tensor hook (offloading, checkpointing) does not see it
    // (4 or 8 bytes a token); the backward checks its version instead.
    const at::Tensor caller_token_grad = token_grad.tensor_data();
    // Only the loss is differentiable; no zero gradients are materialised for the other outputs
    // (token_grad is (B, T)).
    ctx->mark_non_differentiable({metrics, counts, caller_token_grad, grad_scale});
    ctx->set_materialize_grads(false);
    ctx->saved_data["token_grad"] = token_grad;
    ctx->saved_data["token_grad_version"] = static_cast<int64_t>(token_grad._version());
    ctx->save_for_backward({grad_scale});
    ctx->saved_data["dtype"] = log_probs.scalar_type();
    return {loss, metrics, counts, caller_token_grad, grad_scale};
  }

  // Whether the backward may scale the saved per-token gradient in place and hand it over as log_probs' gradient:
  // where nothing else can read it, autograd's own rule for stealing a gradient buffer (AccumulateGrad): the graph
  // is not kept for another backward (retain_graph), no other tensor holds its storage (the caller dropped the op's
  // token_grad output, as ppo_ext.policy_loss does), it has log_probs' dtype, and neither it nor the upstream
  // gradient is a wrapper (batched gradients: is_grads_batched, vmap; functionalization; tensor subclasses), whose
  // result is not a plain (B, T) tensor. That saves a new (B, T) tensor, whose fresh pages cost a CPU more than
  // the multiply (1M tokens: fwd+bwd 1.1-1.3x faster).
  static bool may_take(AutogradContext* ctx, const at::Tensor& grad_loss, const at::Tensor& token_grad) {
    static const c10::DispatchKeySet wrappers{c10::DispatchKey::Batched, c10::DispatchKey::FuncTorchBatched,
                                              c10::DispatchKey::FuncTorchGradWrapper, c10::DispatchKey::Functionalize,
                                              c10::DispatchKey::Python};
    return token_grad.scalar_type() == ctx->saved_data["dtype"].toScalarType() &&
           !torch::autograd::get_current_graph_task_keep_graph() && token_grad.storage().use_count() == 1 &&
           !(grad_loss.key_set() | token_grad.key_set()).has_any(wrappers);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grad_inputs(1 + sizeof...(Rest));
    const at::Tensor& grad_loss = grad_outputs[0];
    if (!grad_loss.defined()) return grad_inputs;
    // (first: a second backward through a graph that was not retained raises autograd's own error here)
    const at::Tensor grad_scale = ctx->get_saved_variables()[0];
    // create_graph=True would ask for a gradient that is differentiable again; it is not (the saved
    // gradient is a constant), so say so now rather than return a silently constant gradient.
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "ppo_ext.policy_loss is differentiable once: backward with create_graph=True (double backward) "
                "is not supported");
    const auto saved = ctx->saved_data.find("token_grad");
    TORCH_CHECK(saved != ctx->saved_data.end(),
                "Trying to backward through ppo_ext.policy_loss a second time: an earlier backward without "
                "retain_graph=True handed its saved gradient over; specify retain_graph=True the first time");
    const at::Tensor token_grad = saved->second.toTensor();
    TORCH_CHECK(token_grad.dim() == 2,
                "ppo_ext::policy_loss was called with compute_grad=False, so it saved no gradient to go backward "
                "through; call it with compute_grad=True (ppo_ext.policy_loss does so when log_probs requires grad)");
    const int64_t version = ctx->saved_data["token_grad_version"].toInt();
    TORCH_CHECK(static_cast<int64_t>(token_grad._version()) == version,
                "one of the variables needed for gradient computation has been modified by an inplace operation: "
                "the token_grad output of ppo_ext::policy_loss is at version ", token_grad._version(),
                "; expected version ", version, " instead");
    if (may_take(ctx, grad_loss, token_grad)) {
      policy_loss_backward_inplace_op().call(grad_loss, token_grad, grad_scale);
      ctx->saved_data.erase("token_grad");
      grad_inputs[0] = token_grad;
      return grad_inputs;
    }
    static const auto backward_op = typed_op<PolicyLossBackwardSignature>("ppo_ext::policy_loss_backward");
    grad_inputs[0] = backward_op.call(grad_loss, token_grad, grad_scale, ctx->saved_data["dtype"].toScalarType());
    return grad_inputs;
  }

  // The Autograd kernel of ppo_ext::policy_loss.
  static PolicyLossOutputs call(const at::Tensor& log_probs, Rest... rest) {
    const variable_list out = PolicyLossFunction::apply(log_probs, constant(rest)...);
    return {out[0], out[1], out[2], out[3], out[4]};
  }
};

// ppo_ext::token_log_probs: log_probs and, when computed, the entropy are differentiable (logsumexp is saved for
// the backward). The forward saves the logits themselves (no copy), the per-row log-sum-exp and the entropy; the
// backward is ppo_ext::token_log_probs_backward, or, with inplace_backward, the token_log_probs_backward_inplace
// op, which overwrites the saved logits with their gradient and returns them as the gradient (anything else that
// saved the logits then fails autograd's version check). An entropy with no upstream gradient adds nothing to the
// backward (its term is not computed).
// The dispatcher handle of ppo_ext::token_log_probs_backward_inplace, looked up once (used by the
// autograd backward and by its ADInplaceOrView kernel, InplaceBackwardKernel).
const auto& token_log_probs_backward_inplace_op() {
  static const auto op = typed_op<TokenLogProbsBackwardInplaceSignature>("ppo_ext::token_log_probs_backward_inplace");
  return op;
}

class TokenLogProbsFunction : public torch::autograd::Function<TokenLogProbsFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& labels,
                               double temperature, bool compute_entropy, bool inplace_backward) {
    static const auto op = typed_op<TokenLogProbsSignature>("ppo_ext::token_log_probs");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [log_probs, logsumexp, entropy] = op.call(logits, labels, temperature, compute_entropy, inplace_backward);
    if (compute_entropy) {
      ctx->mark_non_differentiable({logsumexp});
    } else {
      ctx->mark_non_differentiable({logsumexp, entropy});
    }
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({logits, labels, logsumexp, entropy});
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["inplace_backward"] = inplace_backward;
    return {log_probs, logsumexp, entropy};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grad_inputs(5);
    const at::Tensor& grad_log_probs = grad_outputs[0];
    const at::Tensor& grad_entropy = grad_outputs[2];
    if (!grad_log_probs.defined() && !grad_entropy.defined()) return grad_inputs;
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "ppo_ext.token_log_probs is differentiable once: backward with create_graph=True (double backward) "
                "is not supported");
    const variable_list saved = ctx->get_saved_variables();
    const double temperature = ctx->saved_data["temperature"].toDouble();
    // (an entropy-only loss: the log-probs' upstream gradient is 0)
    const at::Tensor g = grad_log_probs.defined() ? grad_log_probs : at::zeros_like(saved[2]);
    const OptionalTensor g_entropy = grad_entropy.defined() ? OptionalTensor(grad_entropy) : std::nullopt;
    const OptionalTensor entropy = grad_entropy.defined() ? OptionalTensor(saved[3]) : std::nullopt;
    if (ctx->saved_data["inplace_backward"].toBool()) {
      token_log_probs_backward_inplace_op().call(g, saved[0], saved[1], saved[2], temperature, g_entropy, entropy);
      grad_inputs[0] = saved[0].detach();  // the same buffer, now holding the gradient
      return grad_inputs;
    }
    static const auto backward_op = typed_op<TokenLogProbsBackwardSignature>("ppo_ext::token_log_probs_backward");
    grad_inputs[0] = backward_op.call(g, saved[0], saved[1], saved[2], temperature, g_entropy, entropy);
    return grad_inputs;
  }
};

TokenLogProbsOutputs token_log_probs_autograd(const at::Tensor& logits, const at::Tensor& labels, double temperature,
                                              bool compute_entropy, bool inplace_backward) {
  const variable_list out =
      TokenLogProbsFunction::apply(logits, labels.detach(), temperature, compute_entropy, inplace_backward);
  return {out[0], out[1], out[2]};
}

// ppo_ext::hidden_log_probs: log_probs and, when computed, the entropy are differentiable w.r.t. hidden, weight and
// bias. The forward saves hidden, weight and bias themselves (no copy; autograd's version check guards them), the
// labels, the per-row log-sum-exp and the entropy: a few bytes a token. The backward is
// ppo_ext::hidden_log_probs_backward, which computes only the gradients asked for.
class HiddenLogProbsFunction : public torch::autograd::Function<HiddenLogProbsFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& hidden, const at::Tensor& weight,
                               const at::Tensor& labels, const OptionalTensor& bias, double temperature,
                               bool compute_entropy, int64_t chunk_tokens) {
    static const auto op = typed_op<HiddenLogProbsSignature>("ppo_ext::hidden_log_probs");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [log_probs, logsumexp, entropy] =
        op.call(hidden, weight, labels, bias, temperature, compute_entropy, chunk_tokens);
    if (compute_entropy) {
      ctx->mark_non_differentiable({logsumexp});
    } else {
      ctx->mark_non_differentiable({logsumexp, entropy});
    }
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({hidden, weight, labels, logsumexp, entropy, bias.value_or(at::Tensor())});
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["chunk_tokens"] = chunk_tokens;
    return {log_probs, logsumexp, entropy};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grad_inputs(7);
    const at::Tensor& grad_log_probs = grad_outputs[0];
    const at::Tensor& grad_entropy = grad_outputs[2];
    if (!grad_log_probs.defined() && !grad_entropy.defined()) return grad_inputs;
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "ppo_ext.log_probs_from_hidden is differentiable once: backward with create_graph=True (double "
                "backward) is not supported");
    static const auto backward_op = typed_op<HiddenLogProbsBackwardSignature>("ppo_ext::hidden_log_probs_backward");
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &hidden = saved[0], &weight = saved[1], &logsumexp = saved[3], &bias = saved[5];
    const at::Tensor g = grad_log_probs.defined() ? grad_log_probs : at::zeros_like(logsumexp);
    const OptionalTensor g_entropy = grad_entropy.defined() ? OptionalTensor(grad_entropy) : std::nullopt;
    const OptionalTensor entropy = grad_entropy.defined() ? OptionalTensor(saved[4]) : std::nullopt;
    const std::array<bool, 3> output_mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                          bias.defined() && ctx->needs_input_grad(3)};
    auto [grad_hidden, grad_weight, grad_bias] =
        backward_op.call(g, hidden, weight, saved[2], logsumexp, bias.defined() ? OptionalTensor(bias) : std::nullopt,
                         ctx->saved_data["temperature"].toDouble(), ctx->saved_data["chunk_tokens"].toInt(),
                         g_entropy, entropy, output_mask);
    if (output_mask[0]) grad_inputs[0] = grad_hidden;
    if (output_mask[1]) grad_inputs[1] = grad_weight;
    if (output_mask[2]) grad_inputs[3] = grad_bias;
    return grad_inputs;
  }
};

TokenLogProbsOutputs hidden_log_probs_autograd(const at::Tensor& hidden, const at::Tensor& weight,
                                               const at::Tensor& labels, const OptionalTensor& bias,
                                               double temperature, bool compute_entropy, int64_t chunk_tokens) {
  const variable_list out =
      HiddenLogProbsFunction::apply(hidden, weight, labels.detach(), bias, temperature, compute_entropy, chunk_tokens);
  return {out[0], out[1], out[2]};
}

// The ADInplaceOrView kernel of an in-place backward op, which writes over its second argument (the logits, the
// saved token_grad): the op below this key, then that argument's version counter bumped, as PyTorch's own in-place
// ops do, so that autograd notices any other use of the overwritten values. Spelled over the op's signature.
template <typename Signature, const c10::TypedOperatorHandle<Signature>& (*Op)()>
struct InplaceBackwardKernel;
template <typename First, typename... Rest,
          const c10::TypedOperatorHandle<void(First, const at::Tensor&, Rest...)>& (*Op)()>
struct InplaceBackwardKernel<void(First, const at::Tensor&, Rest...), Op> {
  static void call(First first, const at::Tensor& overwritten, Rest... rest) {
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      Op().call(first, overwritten, rest...);
    }
    torch::autograd::impl::bump_version(overwritten);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(ppo_ext, Autograd, m) {
  m.impl("policy_loss", &PolicyLossFunction<PolicyLossSignature>::call);
  m.impl("token_log_probs", &token_log_probs_autograd);
  m.impl("hidden_log_probs", &hidden_log_probs_autograd);
}

TORCH_LIBRARY_IMPL(ppo_ext, ADInplaceOrView, m) {
  m.impl("token_log_probs_backward_inplace",
         &InplaceBackwardKernel<TokenLogProbsBackwardInplaceSignature, &token_log_probs_backward_inplace_op>::call);
  m.impl("policy_loss_backward_inplace",
         &InplaceBackwardKernel<PolicyLossBackwardInplaceSignature, &policy_loss_backward_inplace_op>::call);
}

}  // namespace ppo_ext
