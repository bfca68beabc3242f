// The CUDA ops of ppo_ext run on the CPU by the simulator of cuda_sim.h: the host code of
// csrc/cuda/ops_host.h and the kernels of csrc/cuda/*.cuh, exactly as csrc/cuda/*_cuda.cu build them for the GPU,
// with a launcher that runs each launch in the simulator on CPU tensors. Built and loaded by
// tests/cuda_sim/__init__.py; used by tests/test_cuda_simulated.py.
//
// Also: the simulator's settings (schedule, multiprocessor count), its 16-bit float conversions and __expf
// (checked against torch), and small kernels with deliberate errors that show what the simulator reports.

// ATen first: cuda_sim.h defines CUDA's keywords (__host__, __device__, ...) as macros, which ATen's headers
// must not see.
#include <torch/extension.h>

#include "cuda_sim.h"
// (after the simulator: the kernels are compiled against its CUDA built-ins)
#include "cuda/ops_host.h"

#include <cstring>
#include <string>
#include <string_view>

namespace {

int g_sm_count = 2;

class SimLauncher {
 public:
  explicit SimLauncher(const at::Tensor& t) {
    TORCH_CHECK_VALUE(t.device().is_cpu(), "the CUDA simulator runs on CPU tensors, got ", t.device());
  }
  int sm_count() const { return g_sm_count; }
  void zero(void* p, size_t bytes) const { std::memset(p, 0, bytes); }
  template <typename... Params, typename... Args>
  void launch(void (*kernel)(Params...), int blocks, int threads, Args&&... args) const {
    cuda_sim::launch(dim3(static_cast<unsigned>(blocks)), dim3(static_cast<unsigned>(threads)), kernel,
                     std::forward<Args>(args)...);
  }
};

cuda_sim::Order parse_order(const std::string& s) {
  if (s == "forward") return cuda_sim::Order::Forward;
  if (s == "reverse") return cuda_sim::Order::Reverse;
  if (s == "random") return cuda_sim::Order::Random;
  TORCH_CHECK_VALUE(false, "schedule must be \"forward\", \"reverse\" or \"random\", got \"", s, "\"");
}

// ---- 16-bit floats and __expf, elementwise over CPU tensors (for the tests that check them against torch).
at::Tensor half_to_float(const at::Tensor& bits, bool bfloat) {
  const at::Tensor in = bits.contiguous();
  at::Tensor out = at::empty(in.sizes(), in.options().dtype(at::kFloat));
  const auto* p = static_cast<const uint16_t*>(in.const_data_ptr());
  float* q = out.mutable_data_ptr<float>();
  for (int64_t k = 0; k < in.numel(); ++k) q[k] = bfloat ? __bfloat162float({p[k]}) : __half2float({p[k]});
  return out;
}

at::Tensor float_to_half(const at::Tensor& x, bool bfloat) {
  const at::Tensor in = x.contiguous();
  at::Tensor out = at::empty(in.sizes(), in.options().dtype(at::kShort));
  const float* p = in.const_data_ptr<float>();
  auto* q = static_cast<uint16_t*>(out.mutable_data_ptr());
  for (int64_t k = 0; k < in.numel(); ++k) q[k] = bfloat ? __float2bfloat16_rn(p[k]).__x : __float2half_rn(p[k]).__x;
  return out;
}

at::Tensor expf_approx(const at::Tensor& x) {
  const at::Tensor in = x.contiguous();
  at::Tensor out = at::empty_like(in);
  for (int64_t k = 0; k < in.numel(); ++k) out.mutable_data_ptr<float>()[k] = __expf(in.const_data_ptr<float>()[k]);
  return out;
}

}  // namespace

// ---- Kernels with (and without) deliberate errors: what the simulator reports for each. (Not in the
// anonymous namespace: the simulator names a kernel by its exported symbol.)
namespace examples {

// Each thread writes its slot of shared memory and reads its neighbour's: correct only with the barrier.
template <bool kBarrier>
__global__ void neighbour_kernel(int* out, int salt) {
  __shared__ int slots[1024];
  const unsigned n = blockDim.x, t = threadIdx.x;
  slots[t] = static_cast<int>(t) + salt;
  if (kBarrier) __syncthreads();
  out[blockIdx.x * n + t] = slots[(t + 1) % n];
}

__global__ void divergent_barrier_kernel(int*) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

__global__ void barrier_after_exit_kernel(int*) {
  if (threadIdx.x == 3) return;
  __syncthreads();
}

__global__ void partial_barrier_kernel(int*) {
  if (threadIdx.x < 16) __syncthreads();
}

__global__ void shuffle_outside_mask_kernel(int* out) {
  int v = static_cast<int>(threadIdx.x);
  if (threadIdx.x < 16) v = __shfl_down_sync(0x0000ffffu, v, 1);
  out[threadIdx.x] = v;
}

__global__ void lane_not_in_mask_kernel(int* out) {
  out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, static_cast<int>(threadIdx.x), 1);
}

__global__ void shuffle_after_exit_kernel(int* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x), 0);
}

__global__ void masks_disagree_kernel(int* out) {
  const unsigned mask = threadIdx.x < 16 ? 0xffffffffu : 0xfffffffeu;
  out[threadIdx.x] = __shfl_sync(mask, static_cast<int>(threadIdx.x), 1);
}

__global__ void shuffle_beside_barrier_kernel(int* out) {  // a warp collective in divergent code: a deadlock on a GPU
  if (threadIdx.x % 2 == 0) {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
  } else {
    __syncthreads();
  }
}

__global__ void disjoint_syncwarp_kernel(int* out) {  // correct: a partial __syncwarp, then a full-warp shuffle
  const unsigned lane = threadIdx.x % 32;
  if (lane >= 16) __syncwarp(0xffff0000u);
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<int>(lane), 16);
}

__global__ void spin_on_flag_kernel(int* out) {  // correct: thread 0 waits (atomics) until thread 5 raises a flag
  if (threadIdx.x == 0) {
    while (atomicAdd(out + 1, 0) == 0) {
    }
    out[0] = 1;
  }
  if (threadIdx.x == 5) atomicAdd(out + 1, 1);
}

__global__ void spin_forever_kernel(int* out) {  // a flag nobody raises
  if (threadIdx.x == 0) {
    while (atomicAdd(out + 2, 0) == 0) {
    }
  }
}

__global__ void vector_store_kernel(int* out) {  // correct: 16-byte stores to 16-byte-aligned addresses
  const unsigned v = threadIdx.x;
  __stwb(reinterpret_cast<uint4*>(out + threadIdx.x * 4), uint4{v, v + 1, v + 2, v + 3});
}

__global__ void misaligned_store_kernel(int* out) {  // thread 3 stores 16 bytes to an address 4 bytes off
  const unsigned v = threadIdx.x;
  __stwb(reinterpret_cast<uint4*>(out + threadIdx.x * 4 + (threadIdx.x == 3 ? 1 : 0)), uint4{v, v, v, v});
}

__global__ void warp_sum_kernel(int* out) {  // correct: a reduction with every shuffle kind
  const int lane = static_cast<int>(threadIdx.x % 32);
  int v = lane;
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  int down = __shfl_down_sync(0xffffffffu, lane, 3);
  int up = __shfl_up_sync(0xffffffffu, lane, 2, 8);
  int idx = __shfl_sync(0xffffffffu, lane, lane + 9, 16);
  __syncwarp();
  out[threadIdx.x * 4 + 0] = v;
  out[threadIdx.x * 4 + 1] = down;
  out[threadIdx.x * 4 + 2] = up;
  out[threadIdx.x * 4 + 3] = idx;
}

}  // namespace examples

namespace {

// Runs one of the kernels above on `out` (int32, at least blocks * threads * 4 elements).
void run_example(const std::string& name, at::Tensor out, int64_t blocks, int64_t threads, int64_t salt) {
  using namespace examples;
  TORCH_CHECK_VALUE(out.scalar_type() == at::kInt && out.is_contiguous() && out.numel() >= blocks * threads * 4,
                    "out must be a contiguous int32 tensor of at least blocks * threads * 4 elements");
  int* p = out.mutable_data_ptr<int>();
  const dim3 grid(static_cast<unsigned>(blocks)), block(static_cast<unsigned>(threads));
  if (name == "neighbour") return cuda_sim::launch(grid, block, &neighbour_kernel<true>, p, static_cast<int>(salt));
  if (name == "neighbour_no_barrier") {
    return cuda_sim::launch(grid, block, &neighbour_kernel<false>, p, static_cast<int>(salt));
  }
  static const std::pair<std::string_view, void (*)(int*)> kernels[] = {
      {"divergent_barrier", &divergent_barrier_kernel},
      {"barrier_after_exit", &barrier_after_exit_kernel},
      {"partial_barrier", &partial_barrier_kernel},
      {"shuffle_outside_mask", &shuffle_outside_mask_kernel},
      {"lane_not_in_mask", &lane_not_in_mask_kernel},
      {"shuffle_after_exit", &shuffle_after_exit_kernel},
      {"masks_disagree", &masks_disagree_kernel},
      {"shuffle_beside_barrier", &shuffle_beside_barrier_kernel},
      {"warp_sum", &warp_sum_kernel},
      {"disjoint_syncwarp", &disjoint_syncwarp_kernel},
      {"spin_on_flag", &spin_on_flag_kernel},
      {"spin_forever", &spin_forever_kernel},
      {"vector_store", &vector_store_kernel},
      {"misaligned_store", &misaligned_store_kernel},
  };
  for (const auto& [kernel_name, kernel] : kernels) {
    if (name == kernel_name) return cuda_sim::launch(grid, block, kernel, p);
  }
  TORCH_CHECK_VALUE(false, "no example kernel \"", name, "\"");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace ppo_ext::cuda;
  m.doc() = "ppo_ext's CUDA host code and kernels, run on the CPU by tests/cuda_sim";
  m.def("policy_loss", ppo_ext::checked_policy_loss<&policy_loss_device<SimLauncher>>);
  m.def("policy_loss_backward", &policy_loss_backward_device<SimLauncher>);
  m.def("policy_loss_backward_inplace", &policy_loss_backward_inplace_device<SimLauncher>);
  m.def("token_log_probs", &token_log_probs_device<SimLauncher>);
  namespace py = pybind11;
  // (the entropy's gradient optional, as in the ops' schemas)
  m.def("token_log_probs_backward", &token_log_probs_backward_device<SimLauncher>, py::arg("grad_log_probs"),
        py::arg("logits"), py::arg("labels"), py::arg("logsumexp"), py::arg("temperature"),
        py::arg("grad_entropy") = py::none(), py::arg("entropy") = py::none());
  m.def("token_log_probs_backward_inplace", &token_log_probs_backward_inplace_device<SimLauncher>,
        py::arg("grad_log_probs"), py::arg("logits"), py::arg("labels"), py::arg("logsumexp"), py::arg("temperature"),
        py::arg("grad_entropy") = py::none(), py::arg("entropy") = py::none());

  m.def("set_schedule", [](const std::string& order, uint64_t seed) { cuda_sim::set_schedule({parse_order(order), seed}); });
  m.def("set_sm_count", [](int n) {
    TORCH_CHECK_VALUE(n >= 1, "sm_count must be >= 1, got ", n);
    g_sm_count = n;
  });
  m.def("stats", [] {
    const cuda_sim::Stats s = cuda_sim::stats();
    return std::map<std::string, int64_t>{
        {"launches", s.launches}, {"blocks", s.blocks}, {"threads", s.threads}, {"switches", s.switches}};
  });
  m.def("reset_stats", &cuda_sim::reset_stats);

  // The launch configuration the host code uses, for the tests to compare with.
  m.def("policy_loss_blocks", &policy_loss_blocks);
  m.def("policy_loss_backward_blocks", &policy_loss_backward_blocks);
  m.def("log_probs_threads", &log_probs_threads);
  m.def("log_probs_blocks", &log_probs_blocks);
  m.attr("policy_loss_threads") = kThreads;

  m.def("half_to_float", &half_to_float);
  m.def("float_to_half", &float_to_half);
  m.def("expf_approx", &expf_approx);
  m.def("run_example", &run_example);
}
