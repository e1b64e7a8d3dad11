"""Logit distillation: KL(teacher || student) over next-token distributions, per position (evaluation)
and averaged over positions (the training loss)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def kl_per_position(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_teacher || p_student) at every position, fp32: logits `[B, T, V]` → `[B, T]`. The teacher is
    a target (no gradient flows into it)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"logit shapes differ: student {tuple(student_logits.shape)} vs teacher {tuple(teacher_logits.shape)}")
    log_p_student = F.log_softmax(student_logits.float(), dim=-1)  # [B, T, V]
    log_p_teacher = F.log_softmax(teacher_logits.detach().float(), dim=-1)  # [B, T, V]
    return (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=-1)  # [B, T]


def distill_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Mean over unmasked positions of KL(p_teacher || p_student), computed in fp32.

    student_logits, teacher_logits: `[B, T, V]`; mask: `[B, T]` (1/True = position counts), None = all.
    """
    per_position = kl_per_position(student_logits, teacher_logits)  # [B, T]
    if mask is None:
        return per_position.mean()
    weights = mask.to(per_position.dtype)
    if weights.sum() == 0:
        raise ValueError("distill_kl: the mask selects no positions")
    return (per_position * weights).sum() / weights.sum()
