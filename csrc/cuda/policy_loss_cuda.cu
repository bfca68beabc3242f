// The CUDA implementation of ppo_ext::policy_loss and its backward (kernels: policy_loss_kernels.cuh)
// (TORCH_LIBRARY_IMPL(ppo_ext, CUDA)): the host code of ops_host.h with the GPU's launcher (cuda_launcher.h).
// tests/cuda_sim runs the same host code and kernels on the CPU.
#include <torch/library.h>

#include "cuda_launcher.h"
#include "ops_host.h"

namespace ppo_ext::cuda {

TORCH_LIBRARY_IMPL(ppo_ext, CUDA, m) {
  m.impl("policy_loss", checked_policy_loss<&policy_loss_device<CudaLauncher>>);
  m.impl("policy_loss_backward", &policy_loss_backward_device<CudaLauncher>);
  m.impl("policy_loss_backward_inplace", &policy_loss_backward_inplace_device<CudaLauncher>);
}

}  // namespace ppo_ext::cuda
