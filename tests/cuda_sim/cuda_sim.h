// A CPU simulator of the CUDA execution model, enough to run ppo_ext's kernels (csrc/cuda/*.cuh) unchanged
// on a machine without a GPU: include this header, then the kernel headers, and call cuda_sim::launch where
// the GPU code writes kernel<<<grid, block>>>(args).
//
// How it runs a launch. Blocks run one after another, each to completion (a legal schedule for blocks that
// do not wait for one another). Every thread of a block is a fibre on its own stack; one fibre runs at a
// time and gives way only at a synchronisation point (__syncthreads, __syncwarp, a warp shuffle) or a
// global-memory event (atomicAdd, __threadfence), so the kernel's code runs as written, at the speed of
// ordinary compiled code. The schedule (set_schedule) decides which thread runs next and in which order the
// blocks run: Forward (lowest thread id first: warp 0 runs ahead to its next barrier), Reverse (highest
// first), Random (a seeded random pick at every switch, a random block order). A missing barrier passes
// in one order and fails in another; the tests run every kernel under all three.
//
// What it checks, with an error (cuda_sim::Error, naming the kernel's file:line, the block and the
// threads) instead of hanging or passing:
//   - __syncthreads reached by every live thread of the block, at one call site (not in divergent code),
//     and no thread exiting while others wait at one (or before others arrive);
//   - warp collectives (__syncwarp, __shfl*_sync) as real barriers over exactly the lanes of their mask:
//     the calling lane in its mask, every lane of the mask present in the block, not exited, not waiting
//     at a block barrier or another kind of collective, the same mask on every lane; a shuffle reading
//     a lane outside the mask; a width that is not a power of two <= 32;
//   - deadlock: no thread can run and none can be released (a dump says where each waits); a thread that
//     spins on memory (atomics, fences) lets the others run first, and 10 million such turns in a row with
//     no other progress are reported as a spin-wait that is never released;
//   - the launch: grid and block dimensions within CUDA's limits (a grid of 0 blocks is an error), the
//     kernel's parameters within 4 KiB.
// What it cannot see: no memory model or caches (a missing __threadfence or a stale L1 read is not caught:
// every load sees the last store), no timing, no compiler or PTX (nvcc's code is not the code run here),
// no shared-memory bank conflicts; shared memory is one static instance reused by each block in turn
// (zeroed once, not poisoned between blocks); a thread that spins on plain loads (no atomic or fence)
// waiting for another thread hangs, and one waiting for another block is reported (blocks run in turn).
// Stricter than CUDA on purpose: a lane named in a collective's mask must not have exited, and no thread may
// exit while others will still reach a __syncthreads.
//
// The device functions are the host's (libm's expf, logf, exp, fma), except __expf, emulated as the GPU
// computes it under nvcc's default -ftz=false (the PTX: mul.f32, then ex2.approx.f32, without .ftz): exp2f
// of the float32 product x * log2(e), subnormals kept (the GPU's ex2.approx adds up to 2 ulp more), and
// __half / __nv_bfloat16 with round-to-nearest-even conversions. A vector store (__stwb) to an address not
// aligned to its size fails the launch, as it faults on the GPU (plain loads and stores are not checked).
#pragma once

#define PPO_EXT_CUDA_SIM 1

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- CUDA's keywords on the host.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace cuda_sim {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum class Order { Forward, Reverse, Random };
struct Schedule {
  Order order = Order::Forward;
  uint64_t seed = 0;
};
void set_schedule(Schedule schedule);
Schedule schedule();

// Totals since the last reset_stats(): what the simulated tests ran.
struct Stats {
  int64_t launches = 0, blocks = 0, threads = 0, switches = 0;
};
Stats stats();
void reset_stats();

namespace detail {

enum class WarpOp { Sync, Idx, Up, Down, Xor };

const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();
void sync_block(const char* file, int line);
uint64_t warp_collective(WarpOp op, unsigned mask, int param, int width, uint64_t value, const char* file, int line);
void yield();  // a global-memory event: another thread may run
[[noreturn]] void fault(const char* what, const char* file, int line);  // the launch fails, naming the thread
void run(dim3 grid, dim3 block, size_t param_bytes, const void* kernel, const std::function<void()>& body);

template <typename T>
T shuffle(WarpOp op, unsigned mask, T var, int param, int width, const char* file, int line) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffles move values of up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = warp_collective(op, mask, param, width, bits, file, line);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

}  // namespace detail

// kernel<<<grid, block>>>(args...): copies the arguments once, as the GPU does, and runs every thread.
template <typename... Params, typename... Args>
void launch(dim3 grid, dim3 block, void (*kernel)(Params...), Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "a kernel takes exactly its parameters");
  const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  detail::run(grid, block, sizeof(params), reinterpret_cast<const void*>(kernel), [&] { std::apply(kernel, params); });
}

}  // namespace cuda_sim

#define threadIdx (::cuda_sim::detail::thread_idx())
#define blockIdx (::cuda_sim::detail::block_idx())
#define blockDim (::cuda_sim::detail::block_dim())
#define gridDim (::cuda_sim::detail::grid_dim())

// ---- Synchronisation and warp intrinsics (the call site is recorded for the error messages).
inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  cuda_sim::detail::sync_block(file, line);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  cuda_sim::detail::warp_collective(cuda_sim::detail::WarpOp::Sync, mask, 0, 32, 0, file, line);
}
template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32, const char* file = __builtin_FILE(),
              int line = __builtin_LINE()) {
  return cuda_sim::detail::shuffle(cuda_sim::detail::WarpOp::Idx, mask, var, src_lane, width, file, line);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32, const char* file = __builtin_FILE(),
                 int line = __builtin_LINE()) {
  return cuda_sim::detail::shuffle(cuda_sim::detail::WarpOp::Up, mask, var, static_cast<int>(delta), width, file, line);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32, const char* file = __builtin_FILE(),
                   int line = __builtin_LINE()) {
  return cuda_sim::detail::shuffle(cuda_sim::detail::WarpOp::Down, mask, var, static_cast<int>(delta), width, file,
                                   line);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32, const char* file = __builtin_FILE(),
                  int line = __builtin_LINE()) {
  return cuda_sim::detail::shuffle(cuda_sim::detail::WarpOp::Xor, mask, var, lane_mask, width, file, line);
}

// ---- Global memory: every load sees the last store (no caches, no reordering).
template <typename T>
T atomicAdd(T* address, T value) {
  static_assert(std::is_arithmetic_v<T>, "atomicAdd on numbers");
  const T old = *address;
  *address = static_cast<T>(old + value);
  cuda_sim::detail::yield();
  return old;
}
inline void __threadfence() { cuda_sim::detail::yield(); }
template <typename T>
T __ldcg(const T* p) {
  return *p;
}
// A vector store: the address must be aligned to its size, as the GPU requires (a misaligned one faults).
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
template <typename T>
void __stwb(T* p, T value, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0) {
    cuda_sim::detail::fault("misaligned address: a vector store (__stwb) to an address not aligned to its size", file,
                            line);
  }
  *p = value;
}

// ---- Float intrinsics.
inline float __expf(float x) {
  const float y = x * 1.44269504088896341f;  // rounded to float32, as the GPU's mul.f32
  return std::exp2(y);
}

// ---- 16-bit floats: the bits, and round-to-nearest-even conversions (NaN becomes the canonical 0x7fff).
struct __half {
  unsigned short __x;
};
struct __nv_bfloat16 {
  unsigned short __x;
};

inline float cuda_sim_bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t cuda_sim_float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.__x & 0x8000u) << 16;
  const uint32_t exponent = (h.__x >> 10) & 0x1fu, mantissa = h.__x & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float32
    const float v = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -v : v;
  }
  if (exponent == 31) return cuda_sim_bits_to_float(sign | 0x7f800000u | (mantissa << 13));
  return cuda_sim_bits_to_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

inline __half __float2half_rn(float f) {
  const uint32_t u = cuda_sim_float_to_bits(f);
  const auto sign = static_cast<unsigned short>((u >> 16) & 0x8000u);
  const uint32_t magnitude = u & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return {0x7fff};                                       // NaN
  if (magnitude >= 0x477ff000u) return {static_cast<unsigned short>(sign | 0x7c00u)};  // >= 65520 rounds to inf
  if (magnitude < 0x38800000u) {  // below 2^-14: a subnormal half, round(|f| * 2^24)
    const float scaled = std::ldexp(cuda_sim_bits_to_float(magnitude), 24);
    return {static_cast<unsigned short>(sign | static_cast<uint32_t>(std::nearbyint(scaled)))};
  }
  const uint32_t rounded = magnitude + 0xfffu + ((magnitude >> 13) & 1u);  // to nearest, ties to even
  return {static_cast<unsigned short>(sign | ((rounded - 0x38000000u) >> 13))};
}

inline float __bfloat162float(__nv_bfloat16 b) { return cuda_sim_bits_to_float(static_cast<uint32_t>(b.__x) << 16); }

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t u = cuda_sim_float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {0x7fff};  // NaN
  return {static_cast<unsigned short>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}
