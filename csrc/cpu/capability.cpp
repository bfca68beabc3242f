// The CPU's instruction set, read once per call from the CPU's feature bits (and PPO_EXT_CPU_CAPABILITY).
#include "capability.h"

#include <cstdlib>
#include <string_view>

namespace ppo_ext::cpu {

Capability capability() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  const char* forced_env = std::getenv("PPO_EXT_CPU_CAPABILITY");
  const std::string_view forced = forced_env ? forced_env : "";
  if (forced == "default") return Capability::Default;
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (avx512 && forced != "avx2") return Capability::Avx512;
  return avx2 ? Capability::Avx2 : Capability::Default;
#else
  return Capability::Default;
#endif
}

}  // namespace ppo_ext::cpu
