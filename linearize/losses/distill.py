"""Distillation to the teacher: KL(teacher || student) over next-token distributions, full or over the
teacher's top-k tokens (per position for evaluation, averaged over positions as a training loss), and
per-layer MSE of the student's decoder-layer outputs to the teacher's (hidden-state alignment)."""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F


class TeacherTopK(NamedTuple):
    """The teacher's k most likely next tokens per position: what a cache of teacher logits stores.

    log_probs: `[B, T, k]` log-probabilities of the temperature-softened teacher (normalised over the
    full vocabulary, so 1 − Σ exp is the mass of the other tokens); indices: `[B, T, k]` their token ids."""

    log_probs: torch.Tensor
    indices: torch.Tensor


def kl_per_position(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_teacher || p_student) at every position, fp32: logits `[B, T, V]` → `[B, T]`. The teacher is
    a target (no gradient flows into it)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"logit shapes differ: student {tuple(student_logits.shape)} vs teacher {tuple(teacher_logits.shape)}")
    log_p_student = F.log_softmax(student_logits.float(), dim=-1)  # [B, T, V]
    log_p_teacher = F.log_softmax(teacher_logits.detach().float(), dim=-1)  # [B, T, V]
    return (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=-1)  # [B, T]


def masked_mean(per_position: torch.Tensor, mask: Optional[torch.Tensor], name: str) -> torch.Tensor:
    """Mean of `[B, T]` values over the positions where `mask` `[B, T]` is 1/True (None = all)."""
    if mask is None:
        return per_position.mean()
    weights = mask.to(per_position.dtype)
    if weights.sum() == 0:
        raise ValueError(f"{name}: the mask selects no positions")
    return (per_position * weights).sum() / weights.sum()


def distill_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Mean over unmasked positions of KL(p_teacher || p_student), computed in fp32.

    student_logits, teacher_logits: `[B, T, V]`; mask: `[B, T]` (1/True = position counts), None = all.
    """
    return masked_mean(kl_per_position(student_logits, teacher_logits), mask, "distill_kl")


def teacher_top_k(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0) -> TeacherTopK:
    """The teacher's `k` largest logits `[B, T, V]` as log-probabilities of softmax(logits / temperature)
    over the full vocabulary, with their indices (`[B, T, k]` each, fp32 / int64; no gradient)."""
    vocab = teacher_logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"top-k KL: k must be in [1, {vocab}] (the vocabulary), got {k}")
    if temperature <= 0:
        raise ValueError(f"top-k KL: temperature must be > 0, got {temperature}")
    log_p = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)  # [B, T, V]
    values, indices = log_p.topk(k, dim=-1)  # [B, T, k]
    return TeacherTopK(values, indices)


def top_k_kl_per_position(student_logits: torch.Tensor, teacher: TeacherTopK, temperature: float = 1.0) -> torch.Tensor:
    """τ² · KL(p_teacher || p_student) over the teacher's top-k tokens plus one bucket holding the rest
    of the mass, at every position (fp32, `[B, T]`). τ = `temperature` must be the one `teacher` was
    made with. The student's log-softmax is over the full vocabulary, so with k = vocabulary (empty
    bucket) this is exactly the full KL at temperature τ."""
    if student_logits.shape[:-1] != teacher.indices.shape[:-1]:
        raise ValueError(f"top-k KL: student logits {tuple(student_logits.shape)} and teacher top-k "
                         f"{tuple(teacher.indices.shape)} cover different positions")
    vocab, k = student_logits.shape[-1], teacher.indices.shape[-1]
    scaled = student_logits.float() / temperature  # [B, T, V]
    log_norm = scaled.logsumexp(dim=-1)  # [B, T]
    log_q = scaled.gather(-1, teacher.indices) - log_norm[..., None]  # [B, T, k]
    log_p = teacher.log_probs.detach().float()  # [B, T, k]
    per_position = (log_p.exp() * (log_p - log_q)).sum(dim=-1)  # [B, T]
    if k < vocab:  # the rest bucket; with k = V it is empty and left out (its log-mass would be −inf)
        # Student rest mass from a logsumexp over the other tokens, not 1 − Σq: exact when it is tiny.
        others = scaled.scatter(-1, teacher.indices, float("-inf"))  # [B, T, V]
        log_q_rest = others.logsumexp(dim=-1) - log_norm  # [B, T]
        p_rest = (1.0 - log_p.exp().sum(dim=-1)).clamp_min(0.0)  # [B, T]; rounding can dip below 0
        per_position = per_position + torch.xlogy(p_rest, p_rest) - p_rest * log_q_rest
    return per_position * temperature**2  # τ² keeps gradient sizes comparable across temperatures


def top_k_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int, temperature: float = 1.0,
             mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean over unmasked positions of the top-k KL (`top_k_kl_per_position`) from full teacher logits
    `[B, T, V]`; `top_k_kl_cached` is the same from a stored `TeacherTopK`."""
    return top_k_kl_cached(student_logits, teacher_top_k(teacher_logits, k, temperature), temperature, mask)


def top_k_kl_cached(student_logits: torch.Tensor, teacher: TeacherTopK, temperature: float = 1.0,
                    mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`top_k_kl` from pre-computed teacher top-k (log-probabilities, indices), e.g. read from a cache:
    memory O(T·k) for the teacher instead of O(T·V)."""
    return masked_mean(top_k_kl_per_position(student_logits, teacher, temperature), mask, "top_k_kl")


def hidden_mse(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor],
               mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Hidden-state alignment: the mean over decoder layers of the MSE (fp32) between the student's and
    the teacher's layer outputs, each `[B, T, D]`, one per layer in the same order (e.g. HF
    `hidden_states[1:]`, whose last entry is after the final norm). mask `[B, T]` keeps positions
    (None = all); the teacher gets no gradient."""
    if len(student_hidden) != len(teacher_hidden) or not student_hidden:
        raise ValueError(f"hidden_mse: needs one teacher output per student layer, got {len(student_hidden)} "
                         f"student and {len(teacher_hidden)} teacher")
    per_layer = []
    for s, t in zip(student_hidden, teacher_hidden):
        if s.shape != t.shape:
            raise ValueError(f"hidden_mse: layer output shapes differ: {tuple(s.shape)} vs {tuple(t.shape)}")
        per_position = (s.float() - t.detach().float()).pow(2).mean(dim=-1)  # [B, T]
        per_layer.append(masked_mean(per_position, mask, "hidden_mse"))
    return torch.stack(per_layer).mean()
