"""Losses: attention-transfer MSE, attention-weight cross-entropy, logit distillation KL (full or top-k, with
a temperature), hidden-state alignment, and the next-token language-model loss; and the stages' training
objectives built from them."""
from .distill import TeacherTopK, distill_kl, hidden_mse, kl_per_position, teacher_top_k, top_k_kl, top_k_kl_cached
from .lm import next_token_loss
from .objectives import recovery_objective, transfer_objective
from .transfer import PairCollector, attention_ce, transfer_mse

__all__ = ["PairCollector", "TeacherTopK", "attention_ce", "distill_kl", "hidden_mse", "kl_per_position",
           "next_token_loss", "recovery_objective", "teacher_top_k", "top_k_kl", "top_k_kl_cached", "transfer_mse",
           "transfer_objective"]
