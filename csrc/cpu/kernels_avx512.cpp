// The CPU kernels of every op with AVX-512 (F, BW, VL, DQ: ATen's AVX512 capability, 16 float lanes).
#define PPO_EXT_CPU_AVX512
#include "instruction_set.h"
#include "log_probs_cpu_kernel.h"
#include "policy_loss_cpu_kernel.h"
