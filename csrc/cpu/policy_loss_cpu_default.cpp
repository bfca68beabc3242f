// The CPU kernels (policy_loss, token_log_probs) for any x86-64 / ARM CPU (ATen's DEFAULT capability).
#define CPU_CAPABILITY DEFAULT
#include "policy_loss_cpu_kernel.h"
#include "log_probs_cpu_kernel.h"
