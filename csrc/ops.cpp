// The schemas of every ppo_ext op, in one place; their C++ signatures are in include/ppo_ext/ppo_ext.h, their
// arguments are checked in checks.cpp.
#include <torch/library.h>

#include "checks.h"

namespace ppo_ext {

TORCH_LIBRARY(ppo_ext, m) {
  // Forward: loss, metrics (float32, METRIC_NAMES order), counts (int64, COUNT_NAMES order), the
  // per-token gradient of the un-normalised loss sum when compute_grad (else an empty tensor), and
  // the scale 1/denominator that the backward applies to it. clip_high=None is clip_low; a normaliser
  // is a 0-dim tensor or a number (*_value), not both; ratio_cap caps the unclipped term's ratio; loss_type is
  // the family (ppo_ext.LOSS_TYPES), tau_pos/tau_neg are sapo's, dro_beta dro's, vespo_* vespo's; rollout_* the rollout correction computed in the kernel
  // from rollout_log_probs; ref_log_probs and kl_* the KL to the reference policy (kl_clamp=None: the estimator's
  // own, 10 for k3, else none). The defaults are
  // ppo_ext.policy_loss's.
  m.def(
      "policy_loss(Tensor log_probs, Tensor? old_log_probs, Tensor advantages, Tensor? mask=None, "
      "Tensor? token_weights=None, Tensor? num_tokens=None, Tensor? num_seqs=None, "
      "Tensor? loss_scale_factor=None, float? num_tokens_value=None, float? num_seqs_value=None, "
      "float? loss_scale_factor_value=None, float clip_low=0.2, float? clip_high=None, float? dual_clip=None, "
      "float? ratio_cap=None, float? log_ratio_clamp=None, str loss_type=\"vanilla\", float tau_pos=1.0, "
      "float tau_neg=1.05, float? dro_beta=None, float vespo_k_pos=2.0, float vespo_lambda_pos=3.0, "
      "float vespo_k_neg=3.0, float vespo_lambda_neg=2.0, Tensor? rollout_log_probs=None, str rollout_is=\"none\", "
      "str rollout_is_mode=\"truncate\", float? rollout_is_low=None, float? rollout_is_high=None, "
      "str rollout_is_mask_weight=\"unit\", Tensor? ref_log_probs=None, float kl_coef=0.0, "
      "str kl_estimator=\"low_var_kl\", float? kl_clamp=None, bool kl_bias_correction=False, "
      "str importance_sampling=\"token\", "
      "str loss_agg_mode=\"token-mean\", bool compute_grad=True) "
      "-> (Tensor loss, Tensor metrics, Tensor counts, Tensor token_grad, Tensor grad_scale)");
  // Backward: grad_log_probs = grad_loss * grad_scale * token_grad, in `dtype` (that of log_probs).
  m.def("policy_loss_backward(Tensor grad_loss, Tensor token_grad, Tensor grad_scale, ScalarType dtype) -> Tensor");
  // The same gradient written over token_grad, in its dtype (the autograd formula's, where nothing else reads it).
  m.def("policy_loss_backward_inplace(Tensor grad_loss, Tensor(a!) token_grad, Tensor grad_scale) -> ()");

  // From logits (B, T, V) or (N, V) (V contiguous) and int64 labels of their shape without V: per row of
  // x = logits / temperature, log_probs = log_softmax(x)[label], logsumexp = logsumexp(x) (saved for the
  // backward) and, when compute_entropy, the entropy -sum softmax(x) log_softmax(x) (else a (0,) tensor);
  // all float32 (float64 for float64 logits), contiguous. Online max / sum-exp: no log-softmax is
  // materialised. log_probs and (when computed) the entropy are differentiable; inplace_backward makes the autograd formula write the
  // gradient into the logits' buffer (token_log_probs_backward_inplace): the logits are then gone.
  m.def(
      "token_log_probs(Tensor logits, Tensor labels, float temperature=1.0, bool compute_entropy=False, "
      "bool inplace_backward=False) -> (Tensor log_probs, Tensor logsumexp, Tensor entropy)");
  // grad_logits = (grad_log_probs * (onehot(label) - p) - grad_entropy * p * (log p + entropy)) / temperature,
  // p = exp(x - logsumexp), in logits' dtype and shape (contiguous); grad_entropy and the forward's entropy
  // (both or neither: the entropy's term is then not computed); rows whose upstream gradients are 0 are zeros,
  // written without reading their logits. A label outside [0, V) adds no onehot term: the logits may be a block of
  // the vocabulary's columns, with the labels shifted by the block's start and the full rows' logsumexp (the
  // forward checks the labels' range).
  m.def(
      "token_log_probs_backward(Tensor grad_log_probs, Tensor logits, Tensor labels, Tensor logsumexp, "
      "float temperature, Tensor? grad_entropy=None, Tensor? entropy=None) -> Tensor");
  // The same gradient, written over the logits (which are read once, row by row, before being overwritten).
  m.def(
      "token_log_probs_backward_inplace(Tensor grad_log_probs, Tensor(a!) logits, Tensor labels, "
      "Tensor logsumexp, float temperature, Tensor? grad_entropy=None, Tensor? entropy=None) -> ()");

  // From hidden states (B, T, H) or (N, H), any strides, and the LM head's weight (V, H) (as nn.Linear holds it),
  // bias (V,) or none, all of one float dtype: token_log_probs of logits = hidden @ weight^T + bias, computed
  // chunk_tokens rows at a time (0: the default from V, see hidden.cpp) into one reused (chunk, V) buffer, so that
  // the logits never exist whole. The same outputs as token_log_probs; log_probs and entropy are differentiable
  // w.r.t. hidden, weight and bias.
  m.def(
      "hidden_log_probs(Tensor hidden, Tensor weight, Tensor labels, Tensor? bias=None, float temperature=1.0, "
      "bool compute_entropy=False, int chunk_tokens=0) -> (Tensor log_probs, Tensor logsumexp, Tensor entropy)");
  // Its backward: each chunk's logits recomputed, turned in place into their gradient (token_log_probs_backward's
  // formula), then grad_hidden = grad_logits @ weight, grad_weight += grad_logits^T @ hidden, grad_bias +=
  // sum(grad_logits), chunk after chunk in order (deterministic). output_mask: which of the three to compute (a
  // (0,) tensor for the others); grad_hidden contiguous of hidden's shape, grad_weight of weight's.
  m.def(
      "hidden_log_probs_backward(Tensor grad_log_probs, Tensor hidden, Tensor weight, Tensor labels, "
      "Tensor logsumexp, Tensor? bias, float temperature, int chunk_tokens, Tensor? grad_entropy=None, "
      "Tensor? entropy=None, bool[3] output_mask=[True, True, True]) "
      "-> (Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");
  // The rows a chunk of the ops above holds by default (chunk_tokens=0) for a vocabulary of `vocab` entries of
  // `element_size` bytes (checks.h: a buffer of about 64 MiB within 256 to 384 rows).
  m.def("hidden_default_chunk_tokens(int vocab, int element_size) -> int", &default_chunk_tokens);
  // The row stride of their buffer's (rows, cols) logits: cols rounded up to 16 bytes (checks.h).
  m.def("hidden_logits_row_stride(int cols, int element_size) -> int", &logits_row_stride);
}

}  // namespace ppo_ext
