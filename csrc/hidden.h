// ppo_ext::hidden_log_probs and its backward (hidden.cpp): the LM head's GEMMs through ATen (cuBLAS, oneDNN/MKL)
// chunk by chunk, each chunk's log-softmax by the token_log_probs ops, so the same code serves every backend that
// has those ops (registered for the CPU in cpu/log_probs_cpu.cpp, for CUDA in cuda/log_probs_cuda.cu).
#pragma once

#include "ppo_ext/ppo_ext.h"

namespace ppo_ext {

TokenLogProbsOutputs hidden_log_probs_chunked(const at::Tensor& hidden, const at::Tensor& weight,
                                              const at::Tensor& labels, const OptionalTensor& bias,
                                              double temperature, bool compute_entropy, int64_t chunk_tokens);

HiddenLogProbsBackwardOutputs hidden_log_probs_backward_chunked(
    const at::Tensor& grad_log_probs, const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
    const at::Tensor& logsumexp, const OptionalTensor& bias, double temperature, int64_t chunk_tokens,
    const OptionalTensor& grad_entropy, const OptionalTensor& entropy, std::array<bool, 3> output_mask);

}  // namespace ppo_ext
