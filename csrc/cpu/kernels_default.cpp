// The CPU kernels of every op for any x86-64 / ARM CPU (ATen's DEFAULT capability).
#include "instruction_set.h"
#include "log_probs_cpu_kernel.h"
#include "policy_loss_cpu_kernel.h"
