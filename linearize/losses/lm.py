"""The language-model loss: cross-entropy of each position's logits predicting the next token. One
definition serves training (mean), evaluation (sum → perplexity) and perplexity by position (none)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy (fp32) of logits `[B, T, V]` predicting input_ids `[B, T]` shifted by one.

    reduction: "mean" or "sum" over the B·(T−1) predictions, or "none" for `[B, T−1]`."""
    shifted = logits[:, :-1].float().flatten(0, 1)  # [B·(T−1), V]
    targets = input_ids[:, 1:].flatten()  # [B·(T−1)]
    loss = F.cross_entropy(shifted, targets, reduction=reduction)
    return loss.view(input_ids.shape[0], -1) if reduction == "none" else loss  # [B, T−1] unreduced
