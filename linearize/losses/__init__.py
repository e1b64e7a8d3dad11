"""Losses: attention-transfer MSE, attention-weight cross-entropy, logit distillation KL, and the
next-token language-model loss; and the stages' training objectives built from them."""
from .distill import distill_kl, kl_per_position
from .lm import next_token_loss
from .objectives import recovery_objective, transfer_objective
from .transfer import PairCollector, attention_ce, transfer_mse

__all__ = ["PairCollector", "attention_ce", "distill_kl", "kl_per_position", "next_token_loss", "recovery_objective",
           "transfer_mse", "transfer_objective"]
