"""TRL's per-token log-probs from logits, a row at a time to bound the peak memory."""

import torch
import torch.nn.functional as F


def selective_log_softmax(logits, index):
    """TRL's (trl/trainer/utils.py), but for the float32 upcast of each row in the bf16 branch (TRL keeps bf16
    there, which would not pass the float64 check)."""
    if logits.dtype in (torch.float32, torch.float64):
        selected_logits = torch.gather(logits, dim=-1, index=index.unsqueeze(-1)).squeeze(-1)
        logsumexp_values = torch.stack([torch.logsumexp(lg, dim=-1) for lg in logits])  # loop to reduce peak memory
        return selected_logits - logsumexp_values
    per_token_logps = []
    for row_logits, row_labels in zip(logits, index):
        row_logps = F.log_softmax(row_logits.float(), dim=-1)
        per_token_logps.append(row_logps.gather(dim=-1, index=row_labels.unsqueeze(-1)).squeeze(-1))
    return torch.stack(per_token_logps)
