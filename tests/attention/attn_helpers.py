"""Shared by the attention tests: one tiny converted model per mechanism and formula oracles."""
import torch

import linearize
from linearize.attention import RunOptions
from linearize.config import AttentionConfig
from linearize.surgery import wrapped_attentions

from helpers import rel_rms  # noqa: F401  (re-exported to the attention tests)


MECHANISMS = ["linear", "window_linear", "liger", "liger_window", "lawcat"]


def attention_config(mechanism: str, **overrides) -> AttentionConfig:
    kwargs = dict(
        mechanism=mechanism,
        feature_map="softmax_dim" if mechanism.startswith("liger") else "hedgehog",
        feature_dim=8, window_size=8, chunk_size=16,
    )
    kwargs.update(overrides)
    return AttentionConfig(**kwargs)


def randomize_student(model, seed: int = 1) -> None:
    """Move the student away from its init so tests do not pass only at the identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for group in linearize.student_parameters(model).values():
            for _, p in group:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))


def set_form(model, form: str) -> None:
    for attn in wrapped_attentions(model):
        attn.opts = RunOptions(form=form, chunk_size=attn.opts.chunk_size, backend="torch")



def converted(make_tiny_model, mechanism, arch="llama", **overrides):
    """A tiny model with every layer converted to `mechanism` and the student moved off its init."""
    model = make_tiny_model(arch)
    linearize.linearize_model(model, attention_config(mechanism, **overrides))
    randomize_student(model)
    return model


def sliding_window_softmax(p, window: int) -> torch.Tensor:
    """The oracle: causal softmax restricted to the last `window` keys, from the rotated q/k, `[B, T, H, D]`."""
    group = p.q.shape[2] // p.k.shape[2]
    q = p.q_rope.double().transpose(1, 2)  # [B, H, T, D]
    k = p.k_rope.double().repeat_interleave(group, dim=2).transpose(1, 2)  # [B, H, T, D]
    v = p.v.double().repeat_interleave(group, dim=2).transpose(1, 2)  # [B, H, T, D]
    pos = torch.arange(q.shape[2])
    lag = pos[:, None] - pos[None, :]  # [T, T]
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # [B, H, T, T]
    scores = scores.masked_fill(~((lag >= 0) & (lag < window)), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)  # [B, T, H, D]


def greedy_by_full_forwards(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """The greedy continuation computed without a cache: every step recomputes the whole sequence, the
    oracle for cached `generate`."""
    sequence = prompt
    for _ in range(new_tokens):
        nxt = model(sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, nxt], dim=1)
    return sequence
