// ppo_ext::hidden_log_probs and its backward (schemas: ops.cpp): the log-probs of the labels from the hidden states
// and the LM head, chunk_tokens rows at a time, so that the (tokens x vocabulary) logits never exist whole: each
// chunk's logits are written by an ATen GEMM into one reused (chunk, V) buffer and read by the token_log_probs
// kernel; backward recomputes them into the same buffer, turns them in place into their gradient
// (token_log_probs_backward_inplace) and multiplies it out (two GEMMs). Backend-agnostic: every call goes through
// the dispatcher, on the current stream of the inputs' device.
#include "hidden.h"

#include <ATen/ops/addmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sub.h>

#include <algorithm>
#include <vector>

#include "checks.h"

namespace ppo_ext {
namespace {

// Rows [begin, end) of hidden (rows t of sequence b are row b * T + t) as a (rows, H) matrix: a view where hidden's
// strides allow one (rows of one sequence; or sequences that follow each other in memory), else a copy of these
// rows alone (e.g. a chunk across two sequences of hidden[:, :-1] of a (B, T + 1, H) tensor).
at::Tensor hidden_rows(const at::Tensor& hidden, int64_t begin, int64_t end) {
  if (hidden.dim() == 2) return hidden.narrow(0, begin, end - begin);
  const int64_t T = hidden.size(1);
  const int64_t b0 = begin / T, b1 = (end + T - 1) / T;
  if (b1 - b0 == 1) return hidden.select(0, b0).narrow(0, begin - b0 * T, end - begin);
  if (hidden.stride(0) == T * hidden.stride(1)) {
    return hidden.narrow(0, b0, b1 - b0).view({-1, hidden.size(2)}).narrow(0, begin - b0 * T, end - begin);
  }
  std::vector<at::Tensor> pieces;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t t0 = std::max(begin - b * T, int64_t(0)), t1 = std::min(end - b * T, T);
    pieces.push_back(hidden.select(0, b).narrow(0, t0, t1 - t0));
  }
  return at::cat(pieces);
}

// The first `rows` rows of `cols` logits of the reused (flat) buffer, each row starting 16-byte aligned
// (logits_row_stride): a (rows, cols) view.
at::Tensor buffer_rows(const at::Tensor& buffer, int64_t rows, int64_t cols) {
  const int64_t stride = logits_row_stride(cols, buffer.element_size());
  return buffer.narrow(0, 0, rows * stride).view({rows, stride}).narrow(1, 0, cols);
}

// rows @ weight^T + bias (weight and bias: rows of the head, a block of the vocabulary) written into `out`, a
// (rows, weight rows) view of the reused buffer (buffer_rows).
at::Tensor write_logits(at::Tensor out, const at::Tensor& rows, const at::Tensor& weight, const OptionalTensor& bias) {
  if (bias.has_value()) {
    at::addmm_out(out, *bias, rows, weight.t());
  } else {
    at::mm_out(out, rows, weight.t());
  }
  return out;
}

// The logits of a chunk of rows (all of the vocabulary), written into the first rows of the flat `buffer`.
at::Tensor chunk_logits(const at::Tensor& buffer, const at::Tensor& rows, const at::Tensor& weight,
                        const OptionalTensor& bias) {
  return write_logits(buffer_rows(buffer, rows.size(0), weight.size(0)), rows, weight, bias);
}

at::Tensor flat_rows(const at::Tensor& t) { return t.reshape({-1}); }

}  // namespace

TokenLogProbsOutputs hidden_log_probs_chunked(const at::Tensor& hidden, const at::Tensor& weight,
                                              const at::Tensor& labels, const OptionalTensor& bias,
                                              double temperature, bool compute_entropy, int64_t chunk_tokens) {
  static const auto op = typed_op<TokenLogProbsSignature>("ppo_ext::token_log_probs");
  const HiddenLayout l = check_hidden_log_probs_args(hidden, weight, labels, bias, temperature, chunk_tokens);
  const auto acc = hidden.options().dtype(acc_type_for(hidden.scalar_type()));
  at::Tensor log_probs = at::empty({l.N}, acc), logsumexp = at::empty({l.N}, acc);
  at::Tensor entropy = at::empty({compute_entropy ? l.N : 0}, acc);
  const at::Tensor flat_labels = flat_rows(labels);
  const at::Tensor buffer = at::empty({l.chunk * logits_row_stride(l.V, hidden.element_size())}, hidden.options());
  for (int64_t begin = 0; begin < l.N; begin += l.chunk) {
    const int64_t n = std::min(l.chunk, l.N - begin);
    const at::Tensor logits = chunk_logits(buffer, hidden_rows(hidden, begin, begin + n), weight, bias);
    const auto [lp, lse, h] = op.call(logits, flat_labels.narrow(0, begin, n), temperature, compute_entropy, false);
    log_probs.narrow(0, begin, n).copy_(lp);
    logsumexp.narrow(0, begin, n).copy_(lse);
    if (compute_entropy) entropy.narrow(0, begin, n).copy_(h);
  }
  return {log_probs.view(labels.sizes()), logsumexp.view(labels.sizes()),
          compute_entropy ? entropy.view(labels.sizes()) : entropy};
}

HiddenLogProbsBackwardOutputs hidden_log_probs_backward_chunked(
    const at::Tensor& grad_log_probs, const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
    const at::Tensor& logsumexp, const OptionalTensor& bias, double temperature, int64_t chunk_tokens,
    const OptionalTensor& grad_entropy, const OptionalTensor& entropy, std::array<bool, 3> output_mask) {
  static const auto backward_op =
      typed_op<TokenLogProbsBackwardInplaceSignature>("ppo_ext::token_log_probs_backward_inplace");
  const HiddenLayout l = check_hidden_log_probs_args(hidden, weight, labels, bias, temperature, chunk_tokens);
  TORCH_CHECK_VALUE(grad_entropy.has_value() == entropy.has_value(),
                    "grad_entropy and entropy go together (the entropy's gradient needs the forward's entropy)");
  for (const auto& [t, name] : {std::pair{&grad_log_probs, "grad_log_probs"}, std::pair{&logsumexp, "logsumexp"}}) {
    TORCH_CHECK_VALUE(t->sizes() == labels.sizes(), name, " must have the shape of labels ", labels.sizes(), ", got ",
                      t->sizes());
  }
  const bool want_hidden = output_mask[0], want_weight = output_mask[1], want_bias = output_mask[2] && bias;
  const at::ScalarType acc = acc_type_for(hidden.scalar_type());
  const auto empty = [&](const at::Tensor& like) { return at::empty({0}, like.options()); };
  at::Tensor grad_hidden = want_hidden ? at::empty({l.N, l.H}, hidden.options()) : empty(hidden);
  at::Tensor grad_weight = want_weight ? at::empty({l.V, l.H}, weight.options()) : empty(weight);
  at::Tensor grad_bias = want_bias ? at::empty({l.V}, hidden.options().dtype(acc)) : empty(weight);
  // The per-row inputs, flat; the gradient of a block of rows (all columns) or of columns (all rows) is computed in
  // place in `buffer` by token_log_probs_backward_inplace.
  const at::Tensor flat_labels = flat_rows(labels), g = flat_rows(grad_log_probs), lse = flat_rows(logsumexp);
  const OptionalTensor g_entropy = grad_entropy ? OptionalTensor(flat_rows(*grad_entropy)) : std::nullopt;
  const OptionalTensor flat_entropy = entropy ? OptionalTensor(flat_rows(*entropy)) : std::nullopt;
  const auto rows_of = [](const OptionalTensor& t, int64_t begin, int64_t n) {
    return t ? OptionalTensor(t->narrow(0, begin, n)) : std::nullopt;
  };
  // 16-bit weights: grad_weight and grad_bias come from a second pass over blocks of the vocabulary's columns for all
  // rows at once, each block's gradient one GEMM (float32 accumulation inside, rounded once), instead of a sum of
  // per-chunk GEMMs rounded to 16 bits after each chunk, which biases training (TRL's chunked_logprob measured the
  // entropy drifting down) unless a float32 (V, H) accumulator is kept. float32 / float64 weights accumulate
  // exactly enough in the first pass. (On a GPU cuBLAS may reduce split-K partials in bf16 where
  // torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction is True, as for any bf16 nn.Linear.)
  const bool by_columns = (want_weight || want_bias) && weight.scalar_type() != acc && l.N > l.chunk;
  // The columns of a block: as many as fit the chunk's buffer, at least kMinColumns (or V) for the GEMMs' sake, and
  // a multiple of kMinColumns (4748 columns at N = 8192, V = 151936 made slower GEMMs than 4736); rows of a block's
  // (N, block) logits are 16-byte aligned whatever its width (buffer_rows: the last block's, or V's).
  constexpr int64_t kMinColumns = 64;
  const int64_t fit = l.chunk * l.V / std::max<int64_t>(l.N, 1);
  const int64_t block = fit >= l.V ? l.V : std::min(l.V, std::max(kMinColumns, fit / kMinColumns * kMinColumns));
  const auto row_stride = [&](int64_t cols) { return logits_row_stride(cols, hidden.element_size()); };
  at::Tensor buffer =
      at::empty({std::max(l.chunk * row_stride(l.V), by_columns ? l.N * row_stride(block) : 0)}, hidden.options());
  if (want_hidden || ((want_weight || want_bias) && !by_columns)) {
    if (want_weight) grad_weight.zero_();
    if (want_bias) grad_bias.zero_();
    for (int64_t begin = 0; begin < l.N; begin += l.chunk) {
      const int64_t n = std::min(l.chunk, l.N - begin);
      const at::Tensor rows = hidden_rows(hidden, begin, begin + n);
      const at::Tensor grad_logits = chunk_logits(buffer, rows, weight, bias);
      backward_op.call(g.narrow(0, begin, n), grad_logits, flat_labels.narrow(0, begin, n), lse.narrow(0, begin, n),
                       temperature, rows_of(g_entropy, begin, n), rows_of(flat_entropy, begin, n));
      if (want_hidden) {
        at::Tensor grad_rows = grad_hidden.narrow(0, begin, n);
        at::mm_out(grad_rows, grad_logits, weight);
      }
      if (by_columns) continue;
      if (want_weight) grad_weight.addmm_(grad_logits.t(), rows);
      if (want_bias) grad_bias.add_(grad_logits.sum(0, false, acc));
    }
  }
  if (by_columns) {
    const at::Tensor all_rows = hidden_rows(hidden, 0, l.N);  // (a copy only where hidden's rows are not one matrix)
    for (int64_t start = 0; start < l.V; start += block) {
      const int64_t n = std::min(block, l.V - start);
      const at::Tensor grad_logits =
          write_logits(buffer_rows(buffer, l.N, n), all_rows, weight.narrow(0, start, n),
                       bias ? OptionalTensor(bias->narrow(0, start, n)) : std::nullopt);
      backward_op.call(g, grad_logits, at::sub(flat_labels, start), lse, temperature, g_entropy, flat_entropy);
      if (want_weight) {
        at::Tensor grad_w = grad_weight.narrow(0, start, n);
        at::mm_out(grad_w, grad_logits.t(), all_rows);
      }
      if (want_bias) grad_bias.narrow(0, start, n).copy_(grad_logits.sum(0, false, acc));
    }
  }
  return {want_hidden ? grad_hidden.view(hidden.sizes()) : grad_hidden, grad_weight,
          want_bias ? grad_bias.to(weight.scalar_type()) : grad_bias};
}

}  // namespace ppo_ext
