// A LibTorch program using ppo_ext's C++ API (include/ppo_ext/ppo_ext.h): the loss with the schema's
// defaults and with options, its gradient through autograd, and log-probs from logits, each checked against
// the same quantity written with ATen ops. Built and run by scripts/cmake_check.sh (CMake option
// PPO_EXT_BUILD_EXAMPLES); exit status 0 when every check holds.
#include <ATen/ATen.h>
#include <ppo_ext/ppo_ext.h>

#include <cstdio>

namespace {

int failures = 0;

void expect_close(const char* what, const at::Tensor& actual, const at::Tensor& expected) {
  const bool ok = at::allclose(actual, expected, 1e-10, 1e-12);
  std::printf("%s %s (max difference %.3g)\n", ok ? "ok  " : "FAIL", what,
              (actual - expected).abs().max().item<double>());
  failures += ok ? 0 : 1;
}

}  // namespace

int main() {
  at::manual_seed(0);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor log_probs = at::randn({4, 9}, f64).requires_grad_(true);
  const at::Tensor old_log_probs = log_probs.detach() + 0.3 * at::randn({4, 9}, f64);
  const at::Tensor advantages = at::randn({4}, f64);
  const at::Tensor mask = at::rand({4, 9}, f64) > 0.3;

  // Every option at its default: token-level ratio, clip 0.2 both sides, token-mean over all tokens.
  const auto [loss, metrics, counts, token_grad, grad_scale] =
      ppo_ext::policy_loss(log_probs, old_log_probs, advantages);
  loss.backward();
  const at::Tensor lp = log_probs.detach().clone().requires_grad_(true);
  const at::Tensor a = advantages.unsqueeze(1);
  const at::Tensor ratio = (lp - old_log_probs).exp();
  const at::Tensor expected = at::maximum(-a * ratio, -a * ratio.clamp(0.8, 1.2)).mean();
  expected.backward();
  expect_close("loss, defaults", loss, expected);
  expect_close("gradient, defaults", log_probs.grad(), lp.grad());
  expect_close("counts[valid_tokens]", counts[0], at::scalar_tensor(36, counts.options()));

  // A mask, asymmetric clip, dual clip, sequence-mean aggregation.
  ppo_ext::PolicyLossOptions options;
  options.mask = mask;
  options.clip_low = 0.1;
  options.clip_high = 0.3;
  options.dual_clip = 3.0;
  options.loss_agg_mode = "seq-mean-token-mean";
  const at::Tensor loss_with_options = std::get<0>(ppo_ext::policy_loss(log_probs, old_log_probs, advantages, options));
  const at::Tensor clipped = at::maximum(-a * ratio, -a * ratio.clamp(0.9, 1.3));
  const at::Tensor per_token = at::where(a < 0, at::minimum(clipped, -a * 3.0), clipped).detach();
  const at::Tensor m = mask.to(at::kDouble);
  const at::Tensor valid_rows = m.sum(1) > 0;
  const at::Tensor row_means = ((per_token * m).sum(1) / m.sum(1).clamp_min(1)).masked_select(valid_rows);
  expect_close("loss, options", loss_with_options, row_means.mean());

  // Log-probs of labels under logits / temperature.
  const at::Tensor logits = at::randn({2, 5, 11}, f64);
  const at::Tensor labels = at::randint(11, {2, 5}, at::TensorOptions().dtype(at::kLong));
  const at::Tensor token_lp = std::get<0>(ppo_ext::token_log_probs(logits, labels, 0.7));
  expect_close("token_log_probs", token_lp, (logits / 0.7).log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1));

  std::printf("== C++ API: %s\n", failures == 0 ? "every check holds" : "FAILED");
  return failures == 0 ? 0 : 1;
}
