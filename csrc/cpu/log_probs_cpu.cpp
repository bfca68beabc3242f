// The CPU implementation of ppo_ext::token_log_probs and its backward ops (TORCH_LIBRARY_IMPL(ppo_ext, CPU)), and
// the registration of the backend-agnostic hidden_log_probs ops (hidden.cpp) for the CPU.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "../checks.h"
#include "../hidden.h"
#include "log_probs_cpu.h"

namespace ppo_ext::cpu {
namespace {

// Raises a ValueError naming labels and the first position out of [0, V) (on the CPU: no synchronisation;
// on CUDA an out-of-range label gives a NaN log-prob, see log_probs_kernels.cuh).
void check_labels_in_range(const at::Tensor& labels, const LogitsLayout& l) {
  const int64_t* p = labels.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < l.B; ++i) {
    for (int64_t t = 0; t < l.T; ++t) {
      const int64_t label = p[i * l.label_stride_b + t * l.label_stride_t];
      if (label >= 0 && label < l.V) continue;
      if (labels.dim() == 2) {
        TORCH_CHECK_VALUE(false, "labels must be token ids in [0, V) with V = ", l.V,
                          " (the last dimension of logits), got labels[", i, ", ", t, "] = ", label);
      }
      TORCH_CHECK_VALUE(false, "labels must be token ids in [0, V) with V = ", l.V,
                        " (the last dimension of logits), got labels[", i, "] = ", label);
    }
  }
}

LogitRows logit_rows(const at::Tensor& logits, const at::Tensor& labels, const LogitsLayout& l, double temperature) {
  LogitRows r;
  r.data = logits.const_data_ptr();
  r.dtype = logits.scalar_type();
  r.B = l.B, r.T = l.T, r.V = l.V;
  r.stride_b = l.stride_b, r.stride_t = l.stride_t;
  r.labels = labels.const_data_ptr<int64_t>();
  r.label_stride_b = l.label_stride_b, r.label_stride_t = l.label_stride_t;
  r.inv_temperature = 1.0 / temperature;
  return r;
}

TokenLogProbsOutputs token_log_probs_cpu(const at::Tensor& logits, const at::Tensor& labels, double temperature,
                                         bool compute_entropy, bool /*inplace_backward: for the autograd formula*/) {
  const LogitsLayout layout = check_token_log_probs_args(logits, labels, temperature);
  check_labels_in_range(labels, layout);
  auto [log_probs, logsumexp, entropy] = empty_token_log_probs_outputs(logits, labels, compute_entropy);
  LogProbsArgs args;
  args.rows = logit_rows(logits, labels, layout, temperature);
  args.log_probs = log_probs.mutable_data_ptr();
  args.logsumexp = logsumexp.mutable_data_ptr();
  args.entropy = compute_entropy ? entropy.mutable_data_ptr() : nullptr;
  PPO_EXT_CPU_DISPATCH(token_log_probs_kernel, args);
  return {log_probs, logsumexp, entropy};
}

// Writes the gradient into `out` (logits' dtype, rows at out_stride_b / out_stride_t).
void run_backward(const TokenLogProbsBackwardInputs& in, const at::Tensor& logits, const at::Tensor& labels,
                  double temperature, void* out, int64_t out_stride_b, int64_t out_stride_t) {
  // (labels outside [0, V) are allowed here: a block of the vocabulary's columns, see ops.cpp)
  LogProbsBackwardArgs args;
  args.rows = logit_rows(logits, labels, in.layout, temperature);
  args.grad_log_probs = in.grad_log_probs.const_data_ptr();
  args.logsumexp = in.logsumexp.const_data_ptr();
  if (in.grad_entropy.defined()) {
    args.grad_entropy = in.grad_entropy.const_data_ptr();
    args.entropy = in.entropy.const_data_ptr();
  }
  args.out = out;
  args.out_stride_b = out_stride_b;
  args.out_stride_t = out_stride_t;
  PPO_EXT_CPU_DISPATCH(token_log_probs_backward_kernel, args);
}

// A fresh logits-sized gradient is first touched by the kernel, page by page: with 4 KiB pages the page
// faults alone took longer than the kernel (~30 ms for 128 MiB on a 2-core VM, against ~3 ms for the
// kernel in place). Where Linux lets a process ask for transparent huge pages (THP "madvise" or "always"),
// ask for them on the buffer's 2 MiB-aligned interior (then ~5 ms), as PyTorch's THP_MEM_ALLOC_ENABLE does
// for every allocation. The first few calls may stall while the kernel compacts memory for them;
// PPO_EXT_NO_HUGE_PAGES=1 turns this off.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool disabled = [] {
    const char* env = std::getenv("PPO_EXT_NO_HUGE_PAGES");
    return env != nullptr && env[0] != '\0' && env[0] != '0';
  }();
  if (disabled) return;
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  const uintptr_t end = begin + static_cast<uintptr_t>(t.nbytes());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = end & ~(kHuge - 1);
  if (last >= first + 4 * kHuge) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

at::Tensor token_log_probs_backward_cpu(const at::Tensor& grad_log_probs, const at::Tensor& logits,
                                        const at::Tensor& labels, const at::Tensor& logsumexp, double temperature,
                                        const OptionalTensor& grad_entropy, const OptionalTensor& entropy) {
  const auto in =
      check_token_log_probs_backward_args(grad_log_probs, logits, labels, logsumexp, temperature, grad_entropy, entropy);
  at::Tensor grad_logits = at::empty(logits.sizes(), logits.options());  // contiguous
  advise_huge_pages(grad_logits);
  run_backward(in, logits, labels, temperature, grad_logits.mutable_data_ptr(), in.layout.T * in.layout.V,
               logits.dim() == 3 ? in.layout.V : 0);
  return grad_logits;
}

void token_log_probs_backward_inplace_cpu(const at::Tensor& grad_log_probs, const at::Tensor& logits,
                                          const at::Tensor& labels, const at::Tensor& logsumexp, double temperature,
                                          const OptionalTensor& grad_entropy, const OptionalTensor& entropy) {
  const auto in =
      check_token_log_probs_backward_args(grad_log_probs, logits, labels, logsumexp, temperature, grad_entropy, entropy);
  check_writable_logits(logits);
  run_backward(in, logits, labels, temperature, logits.mutable_data_ptr(), in.layout.stride_b, in.layout.stride_t);
}

}  // namespace

TORCH_LIBRARY_IMPL(ppo_ext, CPU, m) {
  m.impl("token_log_probs", &token_log_probs_cpu);
  m.impl("token_log_probs_backward", &token_log_probs_backward_cpu);
  m.impl("token_log_probs_backward_inplace", &token_log_probs_backward_inplace_cpu);
  m.impl("hidden_log_probs", &hidden_log_probs_chunked);
  m.impl("hidden_log_probs_backward", &hidden_log_probs_backward_chunked);
}

}  // namespace ppo_ext::cpu
