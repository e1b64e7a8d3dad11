"""The two training objectives as `loss_fn(model, input_ids [B, L])` closures for `train.loop.train`:
attention transfer (stage 1) and LoRA recovery (stage 2). The stage runners pick one; benchmarks time
the same closures."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .. import adapters
from ..surgery import transfer_mode
from .distill import distill_kl, hidden_mse, top_k_kl
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


def recovery_objective(kl_weight: float = 0.0, ce_weight: float = 1.0, *, kl_top_k: int = 0,
                       kl_temperature: float = 1.0, hidden_weight: float = 0.0):
    """ce_weight · next-token CE + kl_weight · KL(teacher || student) + hidden_weight · per-layer MSE of the
    decoder-layer outputs to the teacher's. The teacher is the same model seen through
    `adapters.teacher_view` (adapter off, softmax attention), so no second copy of the weights.
    ce_weight = 0 with kl_weight > 0 is pure distillation on the teacher's logits (RADLADS, MambaInLlama).
    kl_top_k > 0 keeps the teacher's k largest logits per position plus one bucket for the rest (memory
    O(T·k) for the teacher's side); kl_temperature τ softens both sides, the KL scaled by τ²."""
    if min(ce_weight, kl_weight, hidden_weight) < 0 or ce_weight + kl_weight + hidden_weight <= 0:
        raise ValueError(f"recovery_objective: weights must be >= 0 with a positive sum, got ce_weight={ce_weight}, "
                         f"kl_weight={kl_weight}, hidden_weight={hidden_weight}")
    hidden = hidden_weight > 0

    def kl(logits, teacher_logits):
        if kl_top_k == 0 and kl_temperature == 1.0:
            return distill_kl(logits, teacher_logits)
        k = kl_top_k or logits.shape[-1]  # the whole vocabulary: exactly the full KL at temperature τ
        return top_k_kl(logits, teacher_logits, min(k, logits.shape[-1]), kl_temperature)

    def loss_fn(model, input_ids):
        # [B, L, V] logits (and per-layer [B, L, D] outputs): no decode state in training
        out = model(input_ids=input_ids, use_cache=False, output_hidden_states=hidden)
        loss = ce_weight * next_token_loss(out.logits, input_ids) if ce_weight > 0 else out.logits.new_zeros(())
        if kl_weight > 0 or hidden:
            with torch.no_grad(), adapters.teacher_view(model):
                teacher = model(input_ids=input_ids, use_cache=False, output_hidden_states=hidden)
            if kl_weight > 0:
                loss = loss + kl_weight * kl(out.logits, teacher.logits)
            if hidden:  # hidden_states[0] is the shared embedding output: the layers' outputs follow it
                loss = loss + hidden_weight * hidden_mse(out.hidden_states[1:], teacher.hidden_states[1:])
        return loss

    return loss_fn
