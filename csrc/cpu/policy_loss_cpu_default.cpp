// The CPU kernels for any x86-64 / ARM CPU (ATen's DEFAULT capability).
#define CPU_CAPABILITY DEFAULT
#include "policy_loss_cpu_kernel.h"
