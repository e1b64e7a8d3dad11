"""Attention-transfer losses over the (student, teacher) pairs that linearized layers emit in
transfer mode (see `linearize.transfer_mode`). Everything is computed in fp32: the MSE between
near-equal bf16 tensors underflows otherwise."""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Student attention rows are normalized and logged; the clamp keeps log() finite where a causal row
# has exact zeros (masked keys) or a feature map underflows.
ROW_EPS = 1e-12


class PairCollector:
    """Callable handed to `linearize.transfer_mode`: stores every layer's TransferPair of one forward.

    `want_weights`: whether this collector's loss needs `[B, H, T, T]` attention weights; pass it on
    explicitly as `transfer_mode(model, collector, weights=collector.want_weights)` (transfer_mode reads
    it itself when `weights` is not given)."""

    def __init__(self, want_weights: bool = False):
        self.want_weights = want_weights
        self.pairs: list = []

    def __call__(self, pair) -> None:
        self.pairs.append(pair)

    def take(self) -> list:
        """Returns the pairs collected so far and forgets them (one forward's worth)."""
        pairs, self.pairs = self.pairs, []
        return pairs


def _require_pairs(pairs) -> None:
    if not pairs:
        raise ValueError("no transfer pairs were collected: is any layer linearized and in transfer mode?")


def _over_layers(per_layer: list[torch.Tensor], num_layers: int | None) -> torch.Tensor:
    """The mean of the per-layer losses; with `num_layers`, their sum / num_layers: a block of layers
    then weighs each layer as the whole model does (1 / all converted layers), so the per-layer gradients,
    and Adam's steps with them (its epsilon is not scale-free), do not depend on the block size."""
    if num_layers is None:
        return torch.stack(per_layer).mean()
    return torch.stack(per_layer).sum() / num_layers


def transfer_mse(pairs, factor: float = 1.0, num_layers: int | None = None) -> torch.Tensor:
    """Mean over layers of MSE(student, teacher) × factor (`num_layers`: see `_over_layers`).

    Each pair carries per-head outputs `student`, `teacher` of shape `[B, T, H, D]`; the teacher is a
    target (no gradient flows into it)."""
    _require_pairs(pairs)
    per_layer = [F.mse_loss(p.student.float(), p.teacher.detach().float()) for p in pairs]
    return _over_layers(per_layer, num_layers) * factor


def _soft_cross_entropy(student_weights: torch.Tensor, teacher_weights: torch.Tensor) -> torch.Tensor:
    """Mean over rows of −Σ_s p_teacher(t, s) · log p_student(t, s); inputs `[B, H, T, T]`.

    Student rows are normalized here so raw linear-attention scores (φ(q)·φ(k)) can be passed."""
    student = student_weights.float()
    student = student / student.sum(dim=-1, keepdim=True).clamp_min(ROW_EPS)  # [B, H, T, T]
    teacher = teacher_weights.detach().float()
    return -(teacher * student.clamp_min(ROW_EPS).log()).sum(dim=-1).mean()


def attention_ce(pairs, num_layers: int | None = None) -> torch.Tensor:
    """Mean over layers (that returned weights) of the soft cross-entropy between teacher attention
    rows and normalized student rows (Hedgehog's loss; `num_layers`: see `_over_layers`). Weights are
    `[B, H, T, T]`."""
    _require_pairs(pairs)
    weighted = [p for p in pairs if p.student_weights is not None and p.teacher_weights is not None]
    if not weighted:
        raise ValueError(
            "attention_ce needs attention weights: build the collector with want_weights=True "
            "and use attention.form=parallel"
        )
    per_layer = [_soft_cross_entropy(p.student_weights, p.teacher_weights) for p in weighted]
    return _over_layers(per_layer, num_layers)
