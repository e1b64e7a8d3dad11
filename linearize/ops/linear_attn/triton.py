"""Triton chunked causal linear attention: `chunk_linear_attn_triton`, same contract as
`naive.chunk_linear_attn_torch` (math, shapes, state layout: see `naive.py`).

One program per (value tile, batch·head) walks the sequence chunk by chunk, holding the fp32 state
`S [K, V]` in registers: `o_chunk = tril(q kᵀ) v + q S`, then `S += kᵀ v`. GQA is by indexing (query
head h reads kv head `h // group`); nothing is repeated. The normalized form runs the same kernel on
`[v, 1]` (the ones column yields the normalizer) and divides afterwards.
Backward: Triton too. A forward-order kernel recomputes the entering state per chunk for dq; a
reverse-order kernel carries dS (the gradient of the leaving state) for dk, dv and d(initial_state).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import NORMALIZE_EPS, check_heads, check_same_tokens
from .._triton_utils import block_k, block_t, block_v, contiguous, new_output

# Time tile cap: a [BT, BT] score tile plus [BT, BK] / [BT, BV] operand tiles per step.
MAX_BLOCK_T = 64


@triton.jit
def _chunk_linear_fwd_kernel(
    q, k, v, o, s0, s_final, scale, T,
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
        row_q = (i_b * T + t) * H + i_h  # [BT]
        row_kv = (i_b * T + t) * HKV + i_hk  # [BT]
        # upcast before tl.dot: accumulation is fp32 whatever the input dtype
        b_q = tl.load(q + row_q[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_q = b_q.to(tl.float32) * scale  # [BT, BK]
        b_k = tl.load(k + row_kv[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_k = b_k.to(tl.float32)  # [BT, BK]
        b_v = tl.load(v + row_kv[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
        b_v = b_v.to(tl.float32)  # [BT, BV]
        b_a = tl.where(causal, tl.dot(b_q, tl.trans(b_k)), 0.0)  # [BT, BT]
        b_o = tl.dot(b_a, b_v) + tl.dot(b_q, b_s)  # [BT, BV]
        tl.store(o + row_q[:, None] * V + o_v[None, :], b_o, mask=m_t[:, None] & m_v[None, :])
        b_s += tl.dot(tl.trans(b_k), b_v)  # [BK, BV]
    if STORE_FINAL_STATE:
        tl.store(s_final + p_state, b_s, mask=m_kv)


def linear_attn_forward_fp32(q, k, v, scale, initial_state, output_final_state, chunk_size):
    """Unnormalized kernel launch on contiguous inputs: q `[B, T, H, K]`, k `[B, T, H_kv, K]`,
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
    _chunk_linear_fwd_kernel[grid](
        q, k, v, o, initial_state, final, float(scale), seq_len,
        H=heads, HKV=kv_heads, K=key_dim, V=value_dim,
        BT=block_t(chunk_size, MAX_BLOCK_T), BK=block_k(key_dim), BV=bv,
        USE_INITIAL_STATE=initial_state is not None, STORE_FINAL_STATE=output_final_state,
    )
    return o, final



@triton.jit
def _chunk_linear_bwd_dq_kernel(
    k, v, do, dq, s0, scale, T,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_INITIAL_STATE: tl.constexpr,
):
    """dq = scale · (tril(do vᵀ) k + do S_nᵀ), S_n the state entering the chunk; this value tile's share
    goes to dq[i_v] (the wrapper sums the tiles)."""
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    i_hk = i_h // (H // HKV)
    B = tl.num_programs(1) // H
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    b_s = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        p_state = o_k[:, None] * V + o_v[None, :] + i_bh * K * V  # [BK, BV]
        b_s += tl.load(s0 + p_state, mask=m_k[:, None] & m_v[None, :], other=0.0).to(tl.float32)
    causal = o_t[:, None] >= o_t[None, :]  # [BT, BT]
    for i_t in range(0, tl.cdiv(T, BT)):
        t = i_t * BT + o_t
        m_t = t < T
        row_q = (i_b * T + t) * H + i_h
        row_kv = (i_b * T + t) * HKV + i_hk
        b_k = tl.load(k + row_kv[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_k = b_k.to(tl.float32)  # [BT, BK]
        b_v = tl.load(v + row_kv[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
        b_v = b_v.to(tl.float32)  # [BT, BV]
        b_do = tl.load(do + row_q[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
        b_do = b_do.to(tl.float32)  # [BT, BV]
        b_dp = tl.where(causal, tl.dot(b_do, tl.trans(b_v)), 0.0)  # [BT, BT]
        b_dq = (tl.dot(b_dp, b_k) + tl.dot(b_do, tl.trans(b_s))) * scale  # [BT, BK]
        p_dq = dq + i_v * B * T * H * K + row_q[:, None] * K + o_k[None, :]
        tl.store(p_dq, b_dq, mask=m_t[:, None] & m_k[None, :])
        b_s += tl.dot(tl.trans(b_k), b_v)


@triton.jit
def _chunk_linear_bwd_dkv_kernel(
    q, k, v, do, dk, dv, ds_final, ds0, scale, T,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_FINAL_GRAD: tl.constexpr,
):
    """Walks the chunks backwards holding dS (the gradient of the state leaving the chunk):
    dv = scale · tril(q kᵀ)ᵀ do + k dS, dk = scale · tril(do vᵀ)ᵀ q + v dSᵀ, then dS += scale · qᵀ do.
    dk[i_v] is this value tile's share; dk, dv are per query head (the wrapper sums GQA groups)."""
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    i_hk = i_h // (H // HKV)
    B = tl.num_programs(1) // H
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    p_state = o_k[:, None] * V + o_v[None, :] + i_bh * K * V  # [BK, BV]
    b_ds = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_FINAL_GRAD:
        b_ds += tl.load(ds_final + p_state, mask=m_k[:, None] & m_v[None, :], other=0.0).to(tl.float32)
    causal = o_t[:, None] >= o_t[None, :]  # [BT(t), BT(s)]
    num_chunks = tl.cdiv(T, BT)
    for i_r in range(0, num_chunks):
        i_t = num_chunks - 1 - i_r
        t = i_t * BT + o_t
        m_t = t < T
        row_q = (i_b * T + t) * H + i_h
        row_kv = (i_b * T + t) * HKV + i_hk
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        b_q = tl.load(q + row_q[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32) * scale
        b_k = tl.load(k + row_kv[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
        b_v = tl.load(v + row_kv[:, None] * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        b_do = tl.load(do + row_q[:, None] * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        b_a = tl.where(causal, tl.dot(b_q, tl.trans(b_k)), 0.0)  # [BT(t), BT(s)], scaled
        b_dp = tl.where(causal, tl.dot(b_do, tl.trans(b_v)), 0.0)  # [BT(t), BT(s)]
        b_dv = tl.dot(tl.trans(b_a), b_do) + tl.dot(b_k, b_ds)  # [BT, BV]
        b_dk = tl.dot(tl.trans(b_dp), b_q) + tl.dot(b_v, tl.trans(b_ds))  # [BT, BK]
        tl.store(dv + row_q[:, None] * V + o_v[None, :], b_dv, mask=m_tv)
        tl.store(dk + i_v * B * T * H * K + row_q[:, None] * K + o_k[None, :], b_dk, mask=m_tk)
        b_ds += tl.dot(tl.trans(b_q), b_do)
    tl.store(ds0 + p_state, b_ds, mask=m_k[:, None] & m_v[None, :])


def _sum_groups(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Per-query-head gradients `[B, T, H, D]` → per-kv-head `[B, T, H_kv, D]` (GQA readers add up)."""
    batch, seq_len, heads, width = x.shape
    return x.view(batch, seq_len, kv_heads, heads // kv_heads, width).sum(3)  # [B, T, H_kv, D]


def linear_attn_backward_fp32(q, k, v, do, initial_state, dfinal, scale, chunk_size):
    """Gradients of the unnormalized op (contiguous inputs): fp32 dq, dk, dv and d(initial_state)."""
    batch, seq_len, heads, key_dim = q.shape
    kv_heads, value_dim = k.shape[2], v.shape[-1]
    bv = block_v(value_dim)
    num_v_tiles = triton.cdiv(value_dim, bv)
    grid = (num_v_tiles, batch * heads)
    blocks = dict(BT=block_t(chunk_size, MAX_BLOCK_T), BK=block_k(key_dim), BV=bv)
    dims = dict(H=heads, HKV=kv_heads, K=key_dim, V=value_dim)
    dq = new_output((num_v_tiles, batch, seq_len, heads, key_dim), q.device)
    dk = new_output((num_v_tiles, batch, seq_len, heads, key_dim), q.device)
    dv = new_output((batch, seq_len, heads, value_dim), q.device)
    ds0 = new_output((batch, heads, key_dim, value_dim), q.device)
    _chunk_linear_bwd_dq_kernel[grid](
        k, v, do, dq, initial_state, float(scale), seq_len, **dims, **blocks,
        USE_INITIAL_STATE=initial_state is not None,
    )
    _chunk_linear_bwd_dkv_kernel[grid](
        q, k, v, do, dk, dv, dfinal, ds0, float(scale), seq_len, **dims, **blocks,
        USE_FINAL_GRAD=dfinal is not None,
    )
    return dq.sum(0), _sum_groups(dk.sum(0), kv_heads), _sum_groups(dv, kv_heads), ds0


class _LinearAttnCore(torch.autograd.Function):
    """Unnormalized op `o = scale · (tril(q kᵀ) v + q S0)`, `S_T = S0 + kᵀ v` in fp32, Triton both ways."""

    @staticmethod
    def forward(ctx, q, k, v, initial_state, scale, output_final_state, chunk_size):
        q, k, v, initial_state = (contiguous(x) for x in (q, k, v, initial_state))
        o, final = linear_attn_forward_fp32(q, k, v, scale, initial_state, output_final_state, chunk_size)
        ctx.save_for_backward(q, k, v, initial_state)
        ctx.scale, ctx.chunk_size = scale, chunk_size
        ctx.set_materialize_grads(False)
        return o, final

    @staticmethod
    def backward(ctx, do, dfinal):
        q, k, v, initial_state = ctx.saved_tensors
        do = torch.zeros(q.shape[:3] + v.shape[-1:], device=q.device) if do is None else do.contiguous()
        dq, dk, dv, ds0 = linear_attn_backward_fp32(
            q, k, v, do, initial_state, contiguous(dfinal), ctx.scale, ctx.chunk_size
        )
        ds0 = None if initial_state is None else ds0.to(initial_state.dtype)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), ds0, None, None, None


def _check(q, k, v):
    check_same_tokens(q=q, k=k, v=v)
    if k.shape[2] != v.shape[2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"k {tuple(k.shape)} must match v's heads {v.shape[2]} and q's width {q.shape[-1]}")
    check_heads(q.shape[2], k.shape[2])


def chunk_linear_attn_triton(
    q, k, v, *, scale=None, normalize=True, initial_state=None, output_final_state=False, chunk_size=64
):
    """Causal linear attention, Triton forward and backward; q `[B, T, H, K]`, k `[B, T, H_kv, K]`,
    v `[B, T, H_kv, V]` → (o `[B, T, H, V]` in v.dtype, fp32 state `[B, H, K, V(+1)]` or None).
    `chunk_size` sets the time tile (rounded down to a power of two in [16, 64]); the result does not
    depend on it. Normalized: the core runs on `[v, 1]` and torch autograd handles the division."""
    _check(q, k, v)
    out_dtype = v.dtype
    if normalize:
        v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # [B, T, H_kv, V + 1]
        scale = 1.0
    elif scale is None:
        scale = q.shape[-1] ** -0.5
    state_shape = (q.shape[0], q.shape[2], q.shape[-1], v.shape[-1])
    if initial_state is not None and tuple(initial_state.shape) != state_shape:
        raise ValueError(f"initial_state must have shape {state_shape}, got {tuple(initial_state.shape)}")
    o, final = _LinearAttnCore.apply(q, k, v, initial_state, float(scale), output_final_state, chunk_size)
    if normalize:
        o = o[..., :-1] / (o[..., -1:] + NORMALIZE_EPS)  # [B, T, H, V]
    return o.to(out_dtype), final
