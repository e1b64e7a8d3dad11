"""Triton chunked gated linear attention (GLA form): `chunk_gated_linear_attn_triton`, same contract as
`naive.chunk_gated_linear_attn_torch` (math, shapes, state layout: see `naive.py`).

One program per (value tile, batch·head) walks the chunks holding the fp32 state `S [K, V]`. Within a
chunk, G is the cumulative log-decay from the chunk start (fp32, ≤ 0 and decreasing), and every
exponent is a difference "later minus earlier" (≤ 0), so nothing overflows however strong the decay:
- intra-chunk scores Σ_k q_tk k_sk exp(G_tk − G_sk) from an explicit masked `[BT, BT, BK]` tile;
- inter-chunk `o += (q ⊙ exp(G)) S`;
- `S ← diag(exp(G_last)) S + (k ⊙ exp(G_last − G))ᵀ v`.
GQA by indexing (query head h reads kv head `h // group`). Normalized: the kernel runs on `[v, 1]`.
Backward: torch recompute of the chunk form (see `_triton_utils`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import NORMALIZE_EPS, check_heads, check_same_tokens
from .._triton_utils import (
    apply_with_torch_backward,
    block_k,
    block_t,
    block_v,
    contiguous,
    new_output,
)
from .naive import chunk_gated_linear_attn_torch

# Time tile cap: the intra-chunk decay tile is [BT, BT, BK], so BT stays small.
MAX_BLOCK_T = 16


@triton.jit
def _chunk_gla_fwd_kernel(
    q, k, v, g, o, s0, s_final, scale, T,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr,
):
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    i_hk = i_h // (H // HKV)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_state = o_k[:, None] * V + o_v[None, :] + i_bh * K * V  # [BK, BV]
    b_s = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_s += tl.load(s0 + p_state, mask=m_kv, other=0.0).to(tl.float32)
    causal = o_t[:, None] >= o_t[None, :]  # [BT, BT]
    for i_t in range(0, tl.cdiv(T, BT)):
        t = i_t * BT + o_t
        m_t = t < T
        m_tk = m_t[:, None] & m_k[None, :]
        row_q = (i_b * T + t) * H + i_h  # [BT]
        row_kv = (i_b * T + t) * HKV + i_hk  # [BT]
        b_q = tl.load(q + row_q[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32) * scale
        b_k = tl.load(k + row_kv[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
        # padded rows and columns get g = 0: they decay nothing
        b_g = tl.load(g + row_kv[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
        b_v = tl.load(v + row_kv[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
        b_v = b_v.to(tl.float32)  # [BT, BV]
        b_gc = tl.cumsum(b_g, axis=0)  # [BT, BK] G relative to the chunk start
        b_glast = tl.sum(b_g, axis=0)  # [BK]
        b_diff = b_gc[:, None, :] - b_gc[None, :, :]  # [BT, BT, BK]
        # the minimum only guards the masked (s > t) entries, whose differences are positive
        b_decay = tl.where(causal[:, :, None], tl.exp(tl.minimum(b_diff, 0.0)), 0.0)  # [BT, BT, BK]
        b_a = tl.sum(b_q[:, None, :] * b_k[None, :, :] * b_decay, axis=2)  # [BT, BT]
        b_o = tl.dot(b_a, b_v) + tl.dot(b_q * tl.exp(b_gc), b_s)  # [BT, BV]
        tl.store(o + row_q[:, None] * V + o_v[None, :], b_o, mask=m_t[:, None] & m_v[None, :])
        b_k_end = b_k * tl.exp(b_glast[None, :] - b_gc)  # [BT, BK]
        b_s = b_s * tl.exp(b_glast)[:, None] + tl.dot(tl.trans(b_k_end), b_v)  # [BK, BV]
    if STORE_FINAL_STATE:
        tl.store(s_final + p_state, b_s, mask=m_kv)


def gla_forward_fp32(q, k, v, g, scale, initial_state, output_final_state, chunk_size):
    """Unnormalized kernel launch on contiguous inputs: q `[B, T, H, K]`, k, g `[B, T, H_kv, K]`,
    v `[B, T, H_kv, V]` → (fp32 o `[B, T, H, V]`, fp32 state `[B, H, K, V]` or None)."""
    batch, seq_len, heads, key_dim = q.shape
    kv_heads, value_dim = k.shape[2], v.shape[-1]
    o = new_output((batch, seq_len, heads, value_dim), q.device)
    state_shape = (batch, heads, key_dim, value_dim)
    final = new_output(state_shape, q.device) if output_final_state else None
    if initial_state is not None and tuple(initial_state.shape) != state_shape:
        raise ValueError(f"initial_state must have shape {state_shape}, got {tuple(initial_state.shape)}")
    bv = block_v(value_dim)
    grid = (triton.cdiv(value_dim, bv), batch * heads)
    _chunk_gla_fwd_kernel[grid](
        q, k, v, g, o, initial_state, final, float(scale), seq_len,
        H=heads, HKV=kv_heads, K=key_dim, V=value_dim,
        BT=block_t(chunk_size, MAX_BLOCK_T), BK=block_k(key_dim), BV=bv,
        USE_INITIAL_STATE=initial_state is not None, STORE_FINAL_STATE=output_final_state,
    )
    return o, final


def _forward(q, k, v, g, initial_state, *, scale, normalize, output_final_state, chunk_size):
    """Triton forward with the public contract (no autograd)."""
    q, k, v, g, initial_state = (contiguous(x) for x in (q, k, v, g, initial_state))
    out_dtype = v.dtype
    if normalize:
        v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1).contiguous()  # [B, T, H_kv, V + 1]
        scale = 1.0
    elif scale is None:
        scale = q.shape[-1] ** -0.5
    o, final = gla_forward_fp32(q, k, v, g, scale, initial_state, output_final_state, chunk_size)
    if normalize:
        o = o[..., :-1] / (o[..., -1:] + NORMALIZE_EPS)  # [B, T, H, V]
    return o.to(out_dtype), final


def _reference(q, k, v, g, initial_state, *, scale, normalize, output_final_state, chunk_size):
    return chunk_gated_linear_attn_torch(
        q, k, v, g, scale=scale, normalize=normalize, initial_state=initial_state,
        output_final_state=output_final_state, chunk_size=chunk_size,
    )


def _check(q, k, v, g):
    check_same_tokens(q=q, k=k, v=v, g=g)
    if k.shape[2] != v.shape[2] or q.shape[-1] != k.shape[-1] or g.shape[2:] != k.shape[2:]:
        raise ValueError(
            f"k {tuple(k.shape)} must match g {tuple(g.shape)}, v's heads {v.shape[2]} and q's width {q.shape[-1]}"
        )
    check_heads(q.shape[2], k.shape[2])


def chunk_gated_linear_attn_triton(
    q, k, v, g, *, scale=None, normalize=False, initial_state=None, output_final_state=False, chunk_size=64
):
    """Gated linear attention, Triton forward; q `[B, T, H, K]`, k, g `[B, T, H_kv, K]`,
    v `[B, T, H_kv, V]` → (o `[B, T, H, V]` in v.dtype, fp32 state `[B, H, K, V(+1)]` or None).
    `chunk_size` sets the time tile (rounded down to a power of two, at most 16); the result does not
    depend on it."""
    _check(q, k, v, g)
    kwargs = dict(scale=scale, normalize=normalize, output_final_state=output_final_state, chunk_size=chunk_size)
    return apply_with_torch_backward(_forward, _reference, kwargs, q, k, v, g, initial_state)
