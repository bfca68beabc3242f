// What the CUDA kernels of ppo_ext share: dtype codes, element loads and stores, 16-byte packs. Device code
// only, with no ATen or c10, so that the kernel headers (policy_loss_kernels.cuh, log_probs_kernels.cuh)
// compile under nvcc and, unchanged, under the CPU simulator of tests/cuda_sim (which provides the CUDA
// built-ins, __half and __nv_bfloat16 in their place).
#pragma once

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#elif !defined(PPO_EXT_CUDA_SIM)
#error "csrc/cuda/*.cuh hold device code: compiled by nvcc, or on the CPU after tests/cuda_sim/cuda_sim.h"
#endif

#include <cstdint>
#include <type_traits>

namespace ppo_ext::cuda {

constexpr int kWarpSize = 32;

// The dtype of an input read through a void pointer (policy_loss reads inputs of mixed dtypes).
enum class DType : int32_t { F32, F64, F16, BF16, U8, I8, I16, I32, I64 };

// A 16-bit float as float (exact); float and double as themselves.
__device__ __forceinline__ float widen(__half x) { return __half2float(x); }
__device__ __forceinline__ float widen(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ double widen(double x) { return x; }

// An accumulator value rounded (to nearest even) into a kernel's element type.
template <typename T, typename acc_t>
__device__ __forceinline__ T narrow(acc_t x) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(static_cast<float>(x));
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(static_cast<float>(x));
  } else {
    return static_cast<T>(x);
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t load_element(const void* p, DType dtype, int64_t k) {
  switch (dtype) {
    case DType::F32: return static_cast<acc_t>(static_cast<const float*>(p)[k]);
    case DType::F64: return static_cast<acc_t>(static_cast<const double*>(p)[k]);
    case DType::F16: return static_cast<acc_t>(widen(static_cast<const __half*>(p)[k]));
    case DType::BF16: return static_cast<acc_t>(widen(static_cast<const __nv_bfloat16*>(p)[k]));
    case DType::U8: return static_cast<acc_t>(static_cast<const uint8_t*>(p)[k]);
    case DType::I8: return static_cast<acc_t>(static_cast<const int8_t*>(p)[k]);
    case DType::I16: return static_cast<acc_t>(static_cast<const int16_t*>(p)[k]);
    case DType::I32: return static_cast<acc_t>(static_cast<const int32_t*>(p)[k]);
    case DType::I64: return static_cast<acc_t>(static_cast<const int64_t*>(p)[k]);
  }
  return acc_t(0);
}

__device__ __forceinline__ bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// 16 bytes of a row: 8 bf16/fp16, 4 float32 or 2 float64 values, one vector load or store.
template <typename scalar_t>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(scalar_t);
  scalar_t v[kSize];
};

// A pack into 16-byte-aligned memory in one store instruction: nvcc 13 splits the assignment of a Pack (and of
// a uint4 assembled from one) into per-element stores (the PTX of the backward had 7 stores a pack of bf16);
// __stwb is one st.global.wb.v4.u32, the default caching of a plain store.
template <typename scalar_t>
__device__ __forceinline__ void store_pack(scalar_t* dst, const Pack<scalar_t>& p) {
  uint4 bits;
  memcpy(&bits, &p, sizeof(bits));
  __stwb(reinterpret_cast<uint4*>(dst), bits);
}

}  // namespace ppo_ext::cuda
