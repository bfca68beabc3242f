// The launcher of the CUDA ops' host code (ops_host.h) on the GPU: kernels on the current stream, under a
// device guard, with a launch check; memsets in stream order; the grid sized for the device's multiprocessors.
// (tests/cuda_sim has the simulator's launcher, with the same three members.)
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <atomic>
#include <utility>

namespace ppo_ext::cuda {

inline int sm_count(int device) {
  static std::atomic<int> counts[64];  // read once per device (host threads may launch concurrently)
  int n = device < 64 ? counts[device].load(std::memory_order_relaxed) : 0;
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    if (device < 64) counts[device].store(n, std::memory_order_relaxed);
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

}  // namespace ppo_ext::cuda
