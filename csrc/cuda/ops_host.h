// The host side of the CUDA ops: the checked arguments turned into the kernels' argument structs,
// outputs and workspace allocated, grid sized, kernels launched. Generic over the Launcher that runs the
// kernels, so that the same lines serve the GPU (CudaLauncher of cuda_launcher.h, registered in
// policy_loss_cuda.cu and log_probs_cuda.cu) and the CPU simulator of tests/cuda_sim (every test run executes
// this code and the kernels on the CPU). A Launcher is built from the op's first tensor and provides
//   int sm_count() const;                       the multiprocessor count the grid is sized for
//   void zero(void* p, size_t bytes) const;     zero device memory, in stream order
//   void launch(kernel, blocks, threads, args...) const;
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "../checks.h"
#include "log_probs_kernels.cuh"
#include "policy_loss_kernels.cuh"

namespace ppo_ext::cuda {

inline DType dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::F32;
    case at::kDouble: return DType::F64;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    case at::kBool:
    case at::kByte: return DType::U8;
    case at::kChar: return DType::I8;
    case at::kShort: return DType::I16;
    case at::kInt: return DType::I32;
    case at::kLong: return DType::I64;
    default: TORCH_CHECK_TYPE(false, "ppo_ext CUDA: unsupported dtype ", t);
  }
}

// The kernels' element type of an ATen dtype: CUDA's own 16-bit floats (same bits as c10's).
template <typename scalar_t>
struct KernelScalar {
  using type = scalar_t;
};
template <>
struct KernelScalar<at::Half> {
  using type = __half;
};
template <>
struct KernelScalar<at::BFloat16> {
  using type = __nv_bfloat16;
};
template <typename scalar_t>
using kernel_scalar_t = typename KernelScalar<scalar_t>::type;


// A tensor normaliser is read by the kernel's last block, on the device.
inline DeviceNormaliser device_normaliser(const NormaliserArg& n) {
  if (n.tensor.has_value()) return {n.tensor->const_data_ptr(), dtype_code(n.tensor->scalar_type()), true, 0.0};
  return {nullptr, DType::F32, n.number.given, n.number.value};
}

template <typename Launcher>
PolicyLossOutputs policy_loss_device(const PolicyLossArgs& a) {
  const Launcher launcher(a.log_probs);
  auto [loss, metrics, counts, token_grad, grad_scale] = empty_policy_loss_outputs(a.log_probs, a.compute_grad);

  const int blocks = policy_loss_blocks(a.B, launcher.sm_count());
  const PolicyLossWorkspace layout = policy_loss_workspace(blocks);
  at::Tensor workspace = at::empty({layout.bytes}, a.log_probs.options().dtype(at::kByte));
  auto* workspace_bytes = static_cast<uint8_t*>(workspace.mutable_data_ptr());
  PolicyLossKernelArgs args;
  set_policy_loss_inputs(args, a, [](const at::Tensor& t, int64_t row_stride, int64_t col_stride) {
    return StridedInput{t.const_data_ptr(), dtype_code(t.scalar_type()), row_stride, col_stride};
  });
  args.token_grad = a.compute_grad ? token_grad.mutable_data_ptr() : nullptr;
  args.partials = reinterpret_cast<Partials*>(workspace_bytes);
  args.blocks_done = reinterpret_cast<unsigned int*>(workspace_bytes + layout.counter_offset);
  args.num_tokens = device_normaliser(a.num_tokens);
  args.num_seqs = device_normaliser(a.num_seqs);
  args.loss_scale_factor = device_normaliser(a.loss_scale_factor);
  args.loss = loss.mutable_data_ptr();
  args.grad_scale = grad_scale.mutable_data_ptr();
  args.metrics = metrics.mutable_data_ptr<float>();
  args.counts = counts.mutable_data_ptr<int64_t>();

  launcher.zero(args.blocks_done, sizeof(unsigned int));
  AT_DISPATCH_FLOATING_TYPES(acc_type_for(a.log_probs.scalar_type()), "ppo_ext_policy_loss_cuda", [&] {
    launcher.launch(&policy_loss_kernel<scalar_t>, blocks, kThreads, args);
  });
  return {loss, metrics, counts, token_grad, grad_scale};
}

// out = grad_loss * grad_scale * token_grad in out's dtype; out may be token_grad itself (each element is read
// before it is written, by the same thread).
template <typename Launcher>
void scale_token_grad(const Launcher& launcher, const at::Tensor& grad_loss, const at::Tensor& token_grad,
                      const at::Tensor& grad_scale, const at::Tensor& out) {
  const int64_t numel = token_grad.numel();
  if (numel == 0) return;
  const int blocks = policy_loss_backward_blocks(numel, launcher.sm_count());
  AT_DISPATCH_FLOATING_TYPES(token_grad.scalar_type(), "ppo_ext_policy_loss_backward_cuda", [&] {
    using acc_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "ppo_ext_policy_loss_backward_cuda_out",
                                    [&] {
      using out_t = kernel_scalar_t<scalar_t>;
      launcher.launch(&policy_loss_backward_kernel<acc_t, out_t>, blocks, kBackwardThreads,
                      grad_loss.const_data_ptr(), dtype_code(grad_loss.scalar_type()),
                      grad_scale.const_data_ptr<acc_t>(), token_grad.const_data_ptr<acc_t>(),
                      static_cast<out_t*>(out.mutable_data_ptr()), numel);
    });
  });
}

template <typename Launcher>
at::Tensor policy_loss_backward_device(const at::Tensor& grad_loss, const at::Tensor& token_grad,
                                       const at::Tensor& grad_scale, at::ScalarType dtype) {
  check_policy_loss_backward_args(grad_loss, token_grad, grad_scale, dtype);
  const Launcher launcher(token_grad);
  at::Tensor grad_log_probs = at::empty(token_grad.sizes(), token_grad.options().dtype(dtype));
  scale_token_grad(launcher, grad_loss, token_grad, grad_scale, grad_log_probs);
  return grad_log_probs;
}

template <typename Launcher>
void policy_loss_backward_inplace_device(const at::Tensor& grad_loss, const at::Tensor& token_grad,
                                         const at::Tensor& grad_scale) {
  check_policy_loss_backward_args(grad_loss, token_grad, grad_scale, token_grad.scalar_type());
  scale_token_grad(Launcher(token_grad), grad_loss, token_grad, grad_scale, token_grad);
}

inline LogitRows logit_rows(const at::Tensor& logits, const at::Tensor& labels, const LogitsLayout& l,
                            double temperature) {
  return {logits.const_data_ptr(), l.B, l.T, l.V, l.stride_b, l.stride_t, labels.const_data_ptr<int64_t>(),
          l.label_stride_b, l.label_stride_t, 1.0 / temperature};
}

template <typename Launcher>
TokenLogProbsOutputs token_log_probs_device(const at::Tensor& logits, const at::Tensor& labels, double temperature,
                                            bool compute_entropy,
                                            bool /*inplace_backward: for the autograd formula*/) {
  const LogitsLayout layout = check_token_log_probs_args(logits, labels, temperature);
  const Launcher launcher(logits);
  auto [log_probs, logsumexp, entropy] = empty_token_log_probs_outputs(logits, labels, compute_entropy);
  const int64_t rows = layout.B * layout.T;
  if (rows == 0) return {log_probs, logsumexp, entropy};
  const LogProbsForwardArgs args{logit_rows(logits, labels, layout, temperature), log_probs.mutable_data_ptr(),
                                 logsumexp.mutable_data_ptr(), compute_entropy ? entropy.mutable_data_ptr() : nullptr};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ppo_ext_token_log_probs_cuda", [&] {
    using element_t = kernel_scalar_t<scalar_t>;
    using acc_t = at::opmath_type<scalar_t>;
    const int threads = log_probs_threads(layout.V, Pack<element_t>::kSize);
    const int blocks = log_probs_blocks(rows, threads, launcher.sm_count());
    if (compute_entropy) {
      launcher.launch(&token_log_probs_kernel<element_t, acc_t, true>, blocks, threads, args);
    } else {
      launcher.launch(&token_log_probs_kernel<element_t, acc_t, false>, blocks, threads, args);
    }
  });
  return {log_probs, logsumexp, entropy};
}

// Writes the gradient into `out` (logits' dtype, rows at out_stride_b / out_stride_t).
template <typename Launcher>
void token_log_probs_backward_into(const Launcher& launcher, const TokenLogProbsBackwardInputs& in,
                                   const at::Tensor& logits, const at::Tensor& labels, double temperature, void* out,
                                   int64_t out_stride_b, int64_t out_stride_t) {
  const int64_t rows = in.layout.B * in.layout.T;
  if (rows == 0 || in.layout.V == 0) return;
  const bool with_entropy = in.grad_entropy.defined();
  const LogProbsBackwardArgs args{logit_rows(logits, labels, in.layout, temperature), in.grad_log_probs.const_data_ptr(),
                                  in.logsumexp.const_data_ptr(),
                                  with_entropy ? in.grad_entropy.const_data_ptr() : nullptr,
                                  with_entropy ? in.entropy.const_data_ptr() : nullptr, out, out_stride_b,
                                  out_stride_t};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                  "ppo_ext_token_log_probs_backward_cuda", [&] {
    using element_t = kernel_scalar_t<scalar_t>;
    using acc_t = at::opmath_type<scalar_t>;
    const int threads = log_probs_threads(in.layout.V, Pack<element_t>::kSize);
    const int blocks = log_probs_blocks(rows, threads, launcher.sm_count());
    if (with_entropy) {
      launcher.launch(&token_log_probs_backward_kernel<element_t, acc_t, true>, blocks, threads, args);
    } else {
      launcher.launch(&token_log_probs_backward_kernel<element_t, acc_t, false>, blocks, threads, args);
    }
  });
}

template <typename Launcher>
at::Tensor token_log_probs_backward_device(const at::Tensor& grad_log_probs, const at::Tensor& logits,
                                           const at::Tensor& labels, const at::Tensor& logsumexp, double temperature,
                                           const OptionalTensor& grad_entropy, const OptionalTensor& entropy) {
  const auto in =
      check_token_log_probs_backward_args(grad_log_probs, logits, labels, logsumexp, temperature, grad_entropy, entropy);
  const Launcher launcher(logits);
  at::Tensor grad_logits = at::empty(logits.sizes(), logits.options());  // contiguous
  token_log_probs_backward_into(launcher, in, logits, labels, temperature, grad_logits.mutable_data_ptr(),
                                in.layout.T * in.layout.V, logits.dim() == 3 ? in.layout.V : 0);
  return grad_logits;
}

template <typename Launcher>
void token_log_probs_backward_inplace_device(const at::Tensor& grad_log_probs, const at::Tensor& logits,
                                             const at::Tensor& labels, const at::Tensor& logsumexp, double temperature,
                                             const OptionalTensor& grad_entropy, const OptionalTensor& entropy) {
  const auto in =
      check_token_log_probs_backward_args(grad_log_probs, logits, labels, logsumexp, temperature, grad_entropy, entropy);
  check_writable_logits(logits);
  const Launcher launcher(logits);
  token_log_probs_backward_into(launcher, in, logits, labels, temperature, logits.mutable_data_ptr(),
                                in.layout.stride_b, in.layout.stride_t);
}

}  // namespace ppo_ext::cuda
