"""Attention operators, one folder per op (`[B, T, H, D]` layout, fp32 inside, `(o, final_state)` out):

- `linear_attn`: causal linear attention, optionally normalized (`chunk_linear_attn`); the no-gate case
  of gated linear attention (one Triton template serves both);
- `gated_delta_rule`: the gated delta rule of Gated DeltaNet and KDA (`chunk_gated_delta_rule`;
  per-head or per-key-channel decay);
- `gated_linear_attn`: GLA-form gated linear attention (`chunk_gated_linear_attn`);
- `window_linear_attn`: the LoLCATs sliding-window + linear hybrid (`window_linear_attn`,
  `WindowLinearState`).

Each folder has `naive.py` (the obvious pure-PyTorch parallel and recurrent forms: the test oracles, and
the decoding step), `chunk.py` (the tuned pure-PyTorch chunk form, the CPU path), `triton.py` (kernels,
imported only when a call needs them) and a `FORMS` registry; every form has one signature. Decoding is
`form="recurrent"`.
"""
from .gated_delta_rule import chunk_gated_delta_rule
from .gated_linear_attn import chunk_gated_linear_attn
from .linear_attn import chunk_linear_attn
from .window_linear_attn import WindowLinearState, window_linear_attn

__all__ = [
    "WindowLinearState",
    "chunk_gated_delta_rule",
    "chunk_gated_linear_attn",
    "chunk_linear_attn",
    "window_linear_attn",
]
