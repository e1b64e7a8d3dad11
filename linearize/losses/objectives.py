"""The two training objectives as `loss_fn(model, input_ids [B, L])` closures for `train.loop.train`:
attention transfer (stage 1) and LoRA recovery (stage 2). The stage runners pick one; benchmarks time
the same closures."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .. import adapters
from ..surgery import transfer_mode
from .distill import distill_kl
from .lm import next_token_loss
from .transfer import PairCollector, attention_ce, transfer_mse


def transfer_objective(mse_factor: float = 1.0, attn_ce_weight: float = 0.0, *,
                       inputs: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                       num_layers: Optional[int] = None):
    """mse_factor · MSE (+ attn_ce_weight · attention-weight cross-entropy) over one teacher-forced
    forward in transfer mode. The layers hand over their attention weights only when the cross-entropy
    term needs them.

    Whole model (default): the decoder runs on the token ids (the LM head is skipped: transfer needs only
    the per-layer pairs). A block of layers (block-wise transfer): `inputs(input_ids [B, L]) -> [B, L, D]`
    gives the teacher's hidden states at the block's input (cached), the block runs on them, and each
    layer's loss weighs 1 / `num_layers` (all converted layers of the model), so the blocks' losses add up
    to the whole model's."""
    collector = PairCollector()
    weights = attn_ce_weight > 0

    def forward(model, input_ids):
        if inputs is None:
            model.get_decoder()(input_ids=input_ids, use_cache=False)  # no decode state in training
        else:
            model(inputs(input_ids))

    def loss_fn(model, input_ids):
        collector.take()
        with transfer_mode(model, collector, weights=weights):
            forward(model, input_ids)
        pairs = collector.take()
        loss = transfer_mse(pairs, mse_factor, num_layers=num_layers)
        if weights:
            loss = loss + attn_ce_weight * attention_ce(pairs, num_layers=num_layers)
        return loss

    return loss_fn


def recovery_objective(kl_weight: float = 0.0, ce_weight: float = 1.0):
    """ce_weight · next-token CE + kl_weight · KL(teacher || student). The teacher is the same model seen
    through `adapters.teacher_view` (adapter off, softmax attention), so no second copy of the weights.
    ce_weight = 0 with kl_weight > 0 is pure distillation on the teacher's logits (RADLADS, MambaInLlama)."""
    if ce_weight < 0 or kl_weight < 0 or ce_weight + kl_weight <= 0:
        raise ValueError(f"recovery_objective: weights must be >= 0 with a positive sum, got ce_weight={ce_weight}, "
                         f"kl_weight={kl_weight}")

    def loss_fn(model, input_ids):
        logits = model(input_ids=input_ids, use_cache=False).logits  # [B, L, V]: no decode state in training
        loss = ce_weight * next_token_loss(logits, input_ids) if ce_weight > 0 else logits.new_zeros(())
        if kl_weight > 0:
            with torch.no_grad(), adapters.teacher_view(model):
                teacher_logits = model(input_ids=input_ids, use_cache=False).logits  # [B, L, V]
            loss = loss + kl_weight * distill_kl(logits, teacher_logits)
        return loss

    return loss_fn
