// The CUDA implementation of the ppo_ext ops (TORCH_LIBRARY_IMPL(ppo_ext, CUDA)): the host code of
// ops_host.h with the launcher that runs the kernels on the GPU, on the current stream under a device guard.
// The kernels are policy_loss_kernels.cuh and log_probs_kernels.cuh; tests/cuda_sim runs the same host code
// and kernels on the CPU.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <utility>

#include "ops_host.h"

namespace ppo_ext::cuda {
namespace {

int sm_count(int device) {
  static int counts[64] = {};
  int n = device < 64 ? counts[device] : 0;
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    if (device < 64) counts[device] = n;
  }
  return n;
}

class CudaLauncher {
 public:
  explicit CudaLauncher(const at::Tensor& t)
      : guard_(t.device()), stream_(c10::cuda::getCurrentCUDAStream()), device_(t.get_device()) {}

  int sm_count() const { return cuda::sm_count(device_); }

  // A memset, not a kernel; capturable in a CUDA graph.
  void zero(void* p, size_t bytes) const { C10_CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, stream_)); }

  template <typename... Params, typename... Args>
  void launch(void (*kernel)(Params...), int blocks, int threads, Args&&... args) const {
    kernel<<<blocks, threads, 0, stream_>>>(std::forward<Args>(args)...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

 private:
  const c10::cuda::CUDAGuard guard_;
  const cudaStream_t stream_;
  const int device_;
};

}  // namespace

TORCH_LIBRARY_IMPL(ppo_ext, CUDA, m) {
  m.impl("policy_loss", &policy_loss_device<CudaLauncher>);
  m.impl("policy_loss_backward", &policy_loss_backward_device<CudaLauncher>);
  m.impl("token_log_probs", &token_log_probs_device<CudaLauncher>);
  m.impl("token_log_probs_backward", &token_log_probs_backward_device<CudaLauncher>);
  m.impl("token_log_probs_backward_inplace", &token_log_probs_backward_inplace_device<CudaLauncher>);
}

}  // namespace ppo_ext::cuda
