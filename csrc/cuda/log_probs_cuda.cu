// The CUDA implementation of ppo_ext::token_log_probs and its backward ops (kernels: log_probs_kernels.cuh)
// (TORCH_LIBRARY_IMPL(ppo_ext, CUDA)): the host code of ops_host.h with the GPU's launcher (cuda_launcher.h).
// tests/cuda_sim runs the same host code and kernels on the CPU.
#include <torch/library.h>

#include "../hidden.h"
#include "cuda_launcher.h"
#include "ops_host.h"

namespace ppo_ext::cuda {

TORCH_LIBRARY_IMPL(ppo_ext, CUDA, m) {
  m.impl("token_log_probs", &token_log_probs_device<CudaLauncher>);
  m.impl("token_log_probs_backward", &token_log_probs_backward_device<CudaLauncher>);
  m.impl("token_log_probs_backward_inplace", &token_log_probs_backward_inplace_device<CudaLauncher>);
  m.impl("hidden_log_probs", &hidden_log_probs_chunked);  // (backend-agnostic: hidden.cpp)
  m.impl("hidden_log_probs_backward", &hidden_log_probs_backward_chunked);
}

}  // namespace ppo_ext::cuda
