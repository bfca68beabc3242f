"""ppo_ext: the clipped PPO policy loss of LLM RL (PPO, GRPO, DAPO, GSPO), forward and backward in
fused CPU and CUDA kernels, with its clip counters. See README.md and SPEC.md."""

from ppo_ext._ops import COUNT_NAMES, METRIC_NAMES, built_with_cuda
from ppo_ext.functional import PolicyLoss, PolicyLossOutput, policy_loss

__all__ = ["policy_loss", "PolicyLoss", "PolicyLossOutput", "COUNT_NAMES", "METRIC_NAMES", "built_with_cuda"]
__version__ = "0.1.0"
