"""Triton chunked causal linear attention: `chunk_linear_attn_triton`, same contract as
`chunk.chunk_linear_attn_torch` (math, shapes, state layout: see `naive.py`).

Linear attention is gated linear attention with g = 0: this is the gated kernel template
(`gated_linear_attn/triton.py`) run without a gate, where every decay is 1, the scores are one masked
`tl.dot` and the time tile may be 64 tokens long.
"""
from __future__ import annotations

from ..gated_linear_attn.triton import chunk_gated_linear_attn_triton


def chunk_linear_attn_triton(
    q, k, v, *, scale=None, normalize=True, initial_state=None, output_final_state=False, chunk_size=64
):
    """Causal linear attention, Triton forward and backward; q `[B, T, H, K]`, k `[B, T, H_kv, K]`,
    v `[B, T, H_kv, V]` → (o `[B, T, H, V]` in v.dtype, fp32 state `[B, H, K, V(+1)]` or None).
    `chunk_size` sets the time tile (rounded down to a power of two in [16, 64]); the result does not
    depend on it."""
    return chunk_gated_linear_attn_triton(
        q, k, v, None, scale=scale, normalize=normalize, initial_state=initial_state,
        output_final_state=output_final_state, chunk_size=chunk_size,
    )
