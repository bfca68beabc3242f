"""ppo_ext: the policy losses of LLM RL (PPO, GRPO, DAPO, GSPO, CISPO, SAPO, GPG, DRO, DPPO, GMPO, VESPO) and the
critic's value loss, forward and backward in fused CPU and CUDA kernels, with their clip counters, from log-probs,
logits or hidden states and the LM head. See README.md and docs/SPEC.md."""

from ppo_ext._ops import COUNT_NAMES, METRIC_NAMES, built_with_cuda
from ppo_ext.names import LOSS_TYPES
from ppo_ext.functional import (PolicyLoss, PolicyLossFromLogitsOutput, PolicyLossOutput, ValueLossOutput, kl_loss,
                                log_probs_from_hidden, log_probs_from_logits, policy_loss, policy_loss_from_hidden,
                                policy_loss_from_logits, value_loss)

__all__ = ["policy_loss", "PolicyLoss", "PolicyLossOutput", "policy_loss_from_logits", "PolicyLossFromLogitsOutput",
           "log_probs_from_logits", "log_probs_from_hidden", "policy_loss_from_hidden", "value_loss", "kl_loss",
           "ValueLossOutput", "COUNT_NAMES", "METRIC_NAMES", "LOSS_TYPES", "built_with_cuda"]
__version__ = "0.1.0"
