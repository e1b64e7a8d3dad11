"""Attention operators, one folder per op (`[B, T, H, D]` layout, fp32 inside, `(o, final_state)` out):

- `linear_attn`: causal linear attention, optionally normalized (`chunk_linear_attn`,
  `fused_recurrent_linear_attn`);
- `gated_linear_attn`: GLA-form gated linear attention (`chunk_gated_linear_attn`,
  `fused_recurrent_gated_linear_attn`);
- `window_linear_attn`: the LoLCATs sliding-window + linear hybrid (`window_linear_attn`,
  `fused_recurrent_window_linear_attn`, `WindowLinearState`).

Each folder has `naive.py` (pure-PyTorch parallel / chunk / recurrent forms, the CPU path and the test
oracle), optionally `triton.py` (kernels, imported only when a call needs them), and a `FORMS` registry.
"""
from .gated_linear_attn import chunk_gated_linear_attn, fused_recurrent_gated_linear_attn
from .linear_attn import chunk_linear_attn, fused_recurrent_linear_attn
from .window_linear_attn import WindowLinearState, fused_recurrent_window_linear_attn, window_linear_attn

__all__ = [
    "WindowLinearState",
    "chunk_gated_linear_attn",
    "chunk_linear_attn",
    "fused_recurrent_gated_linear_attn",
    "fused_recurrent_linear_attn",
    "fused_recurrent_window_linear_attn",
    "window_linear_attn",
]
