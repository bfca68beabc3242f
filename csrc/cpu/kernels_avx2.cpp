// The CPU kernels of every op with AVX2 + FMA (ATen's AVX2 capability: 8 float lanes, SLEEF's vector exp).
#define PPO_EXT_CPU_AVX2
#include "instruction_set.h"
#include "log_probs_cpu_kernel.h"
#include "policy_loss_cpu_kernel.h"
