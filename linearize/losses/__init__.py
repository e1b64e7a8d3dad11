"""Training losses: attention-transfer MSE, attention-weight cross-entropy, logit distillation KL."""
from .distill import distill_kl
from .transfer import PairCollector, attention_ce, transfer_mse

__all__ = ["PairCollector", "attention_ce", "distill_kl", "transfer_mse"]
