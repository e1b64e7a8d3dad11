"""Teacher-vs-student metrics on held-out tokens, computed with one model: the student forward, then
the teacher view of the same weights (see `linearize.adapters.teacher_view`)."""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from ..losses import kl_per_position, next_token_loss

TeacherView = Callable[[torch.nn.Module], contextlib.AbstractContextManager]


def _nll_sum(logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token negative log-likelihood and the number of predictions; logits `[B, T, V]`."""
    return float(next_token_loss(logits, input_ids, reduction="sum")), input_ids[:, 1:].numel()


def _kl_and_agreement(student: torch.Tensor, teacher: torch.Tensor) -> tuple[float, int]:
    """Summed KL(teacher || student) over positions and the count of equal argmax tokens."""
    kl = kl_per_position(student, teacher)  # [B, T]
    return float(kl.sum()), int((student.argmax(-1) == teacher.argmax(-1)).sum())


@torch.no_grad()
def compare_on_tokens(model: torch.nn.Module, tokens: torch.Tensor, batch_size: int = 1,
                      teacher_view: Optional[TeacherView] = None, device: Optional[torch.device] = None) -> dict:
    """student_ppl over `tokens` `[M, L]`; with `teacher_view`: also teacher_ppl, kl (mean per position,
    teacher || student) and top1_agreement (fraction of positions with the same argmax)."""
    device = device or next(model.parameters()).device
    totals = {"student_nll": 0.0, "teacher_nll": 0.0, "kl": 0.0, "agree": 0, "predictions": 0, "positions": 0}
    model.eval()
    for start in tqdm(range(0, len(tokens), batch_size), desc="evaluating", leave=False):
        batch = tokens[start:start + batch_size].to(device)  # [B, L]
        student = model(input_ids=batch, use_cache=False).logits  # [B, L, V]
        nll, count = _nll_sum(student, batch)
        totals["student_nll"] += nll
        totals["predictions"] += count
        if teacher_view is not None:
            with teacher_view(model):
                teacher = model(input_ids=batch, use_cache=False).logits  # [B, L, V]
            totals["teacher_nll"] += _nll_sum(teacher, batch)[0]
            kl, agree = _kl_and_agreement(student, teacher)
            totals["kl"] += kl
            totals["agree"] += agree
            totals["positions"] += batch.numel()
    result = {"student_ppl": math.exp(totals["student_nll"] / totals["predictions"]), "sequences": len(tokens),
              "tokens": int(tokens.numel())}
    if teacher_view is not None:
        result.update(teacher_ppl=math.exp(totals["teacher_nll"] / totals["predictions"]),
                      kl=totals["kl"] / totals["positions"], top1_agreement=totals["agree"] / totals["positions"])
    return result


@torch.no_grad()
def greedy_sample(model: torch.nn.Module, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The greedy continuation of `prompt` (decoded new tokens only)."""
    device = next(model.parameters()).device
    encoded = tokenizer(prompt, return_tensors="pt").to(device)
    output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
