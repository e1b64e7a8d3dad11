"""Triton chunked gated linear attention (GLA form), the one kernel template for both chunked ops:
`chunk_gated_linear_attn_triton` (same contract as `chunk.chunk_gated_linear_attn_torch`) and its no-gate
case, which `linear_attn.triton.chunk_linear_attn_triton` calls with `g=None` (math, shapes, state layout:
see each op's `naive.py`).

One program per (value tile, batch·head) walks the chunks holding the fp32 state `S [K, V]`. GQA by
indexing (query head h reads kv head `h // group`); nothing is repeated. Normalized: the kernels run on
`[v, 1]` (the ones column yields the normalizer) and the division happens afterwards.

With a gate (`USE_GATE`), within a chunk G is the cumulative log-decay from the chunk start (fp32, ≤ 0
and decreasing), and every exponent is a difference "later minus earlier" (≤ 0), so nothing overflows
however strong the decay:
- intra-chunk scores Σ_k q_tk k_sk exp(G_tk − G_sk) from an explicit masked `[BT, BT, BK]` tile;
- inter-chunk `o += (q ⊙ exp(G)) S`;
- `S ← diag(exp(G_last)) S + (k ⊙ exp(G_last − G))ᵀ v`.
Without a gate (g = 0) every decay is 1: the scores are one `tl.dot` masked to `tril`, the state update is
`S += kᵀ v`, and the time tile can be 4× longer (no `[BT, BT, BK]` tile).

Backward: Triton for dq (forward order) and dk, dv, d(initial_state) (reverse order, carrying dS, the
gradient of the state leaving the chunk); with a gate, the log-decay gradient follows from them in torch:
with G the cumulative log-decay from the sequence start, dL/dG_t = q_t ⊙ dq_t − k_t ⊙ dk_t
(+ Σ_v dS_T ⊙ S_T at t = T), and dg is its reverse cumsum.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import NORMALIZE_EPS, check_heads, check_same_tokens
from .._triton_utils import block_k, block_t, block_v, contiguous, new_output

# Time tile caps. With a gate the intra-chunk decay tile is [BT, BT, BK], so BT stays small; without one a
# step holds a [BT, BT] score tile plus [BT, BK] / [BT, BV] operand tiles.
MAX_BLOCK_T_GATED = 16
MAX_BLOCK_T_UNGATED = 64


@triton.jit
def _chunk_decays(g, row_kv, o_k, m_tk, causal, K: tl.constexpr):
    """One chunk's log-decays: G `[BT, BK]` cumulative from the chunk start, G_last `[BK]`, and the
    intra-chunk decay tile exp(G_t − G_s) `[BT(t), BT(s), BK]`, 0 where s > t."""
    # padded rows and columns get g = 0: they decay nothing
    b_g = tl.load(g + row_kv[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
    b_gc = tl.cumsum(b_g, axis=0)  # [BT, BK]
    b_glast = tl.sum(b_g, axis=0)  # [BK]
    b_diff = b_gc[:, None, :] - b_gc[None, :, :]  # [BT(t), BT(s), BK]
    # the minimum only guards the masked (s > t) entries, whose differences are positive
    b_decay = tl.where(causal[:, :, None], tl.exp(tl.minimum(b_diff, 0.0)), 0.0)  # [BT(t), BT(s), BK]
    return b_gc, b_glast, b_decay


@triton.jit
def _chunk_gla_fwd_kernel(
    q, k, v, g, o, s0, s_final, scale, T,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_GATE: tl.constexpr, USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr,
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
        # upcast before tl.dot: accumulation is fp32 whatever the input dtype
        b_q = tl.load(q + row_q[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32) * scale
        b_k = tl.load(k + row_kv[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
        b_v = tl.load(v + row_kv[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
        b_v = b_v.to(tl.float32)  # [BT, BV]
        if USE_GATE:
            b_gc, b_glast, b_decay = _chunk_decays(g, row_kv, o_k, m_tk, causal, K)
            b_a = tl.sum(b_q[:, None, :] * b_k[None, :, :] * b_decay, axis=2)  # [BT, BT]
            b_q_decayed = b_q * tl.exp(b_gc)  # [BT, BK] reads S decayed to each row
            b_k_end = b_k * tl.exp(b_glast[None, :] - b_gc)  # [BT, BK] decayed to the chunk end
        else:
            b_a = tl.where(causal, tl.dot(b_q, tl.trans(b_k)), 0.0)  # [BT, BT]
            b_q_decayed = b_q
            b_k_end = b_k
        b_o = tl.dot(b_a, b_v) + tl.dot(b_q_decayed, b_s)  # [BT, BV]
        tl.store(o + row_q[:, None] * V + o_v[None, :], b_o, mask=m_t[:, None] & m_v[None, :])
        if USE_GATE:
            b_s = b_s * tl.exp(b_glast)[:, None]
        b_s += tl.dot(tl.trans(b_k_end), b_v)  # [BK, BV]
    if STORE_FINAL_STATE:
        tl.store(s_final + p_state, b_s, mask=m_kv)


def max_block_t(gated: bool) -> int:
    return MAX_BLOCK_T_GATED if gated else MAX_BLOCK_T_UNGATED


def gla_forward_fp32(q, k, v, g, scale, initial_state, output_final_state, chunk_size):
    """Unnormalized kernel launch on contiguous inputs: q `[B, T, H, K]`, k, g `[B, T, H_kv, K]` (g None:
    no gate), v `[B, T, H_kv, V]` → (fp32 o `[B, T, H, V]`, fp32 state `[B, H, K, V]` or None)."""
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
        BT=block_t(chunk_size, max_block_t(g is not None)), BK=block_k(key_dim), BV=bv,
        USE_GATE=g is not None, USE_INITIAL_STATE=initial_state is not None, STORE_FINAL_STATE=output_final_state,
    )
    return o, final


@triton.jit
def _chunk_gla_bwd_dq_kernel(
    k, v, g, do, dq, s0, scale, T,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_GATE: tl.constexpr, USE_INITIAL_STATE: tl.constexpr,
):
    """dq_t = scale · (Σ_{s≤t in chunk} (do_t·v_s) k_s ⊙ exp(G_t − G_s) + exp(G_t) ⊙ S_n do_t), S_n the
    state entering the chunk (without a gate every exp is 1); this value tile's share goes to dq[i_v]
    (the wrapper sums the tiles)."""
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
    causal = o_t[:, None] >= o_t[None, :]  # [BT(t), BT(s)]
    for i_t in range(0, tl.cdiv(T, BT)):
        t = i_t * BT + o_t
        m_t = t < T
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        row_q = (i_b * T + t) * H + i_h
        row_kv = (i_b * T + t) * HKV + i_hk
        b_k = tl.load(k + row_kv[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
        b_v = tl.load(v + row_kv[:, None] * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        b_do = tl.load(do + row_q[:, None] * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        b_dp = tl.dot(b_do, tl.trans(b_v))  # [BT(t), BT(s)]
        if USE_GATE:
            b_gc, b_glast, b_decay = _chunk_decays(g, row_kv, o_k, m_tk, causal, K)
            b_dq = tl.sum(b_dp[:, :, None] * b_k[None, :, :] * b_decay, axis=1)  # [BT, BK]
            b_dq += tl.exp(b_gc) * tl.dot(b_do, tl.trans(b_s))
            b_k_end = b_k * tl.exp(b_glast[None, :] - b_gc)  # [BT, BK]
        else:
            b_dq = tl.dot(tl.where(causal, b_dp, 0.0), b_k) + tl.dot(b_do, tl.trans(b_s))  # [BT, BK]
            b_k_end = b_k
        p_dq = dq + i_v * B * T * H * K + row_q[:, None] * K + o_k[None, :]
        tl.store(p_dq, b_dq * scale, mask=m_tk)
        if USE_GATE:
            b_s = b_s * tl.exp(b_glast)[:, None]
        b_s += tl.dot(tl.trans(b_k_end), b_v)


@triton.jit
def _chunk_gla_bwd_dkv_kernel(
    q, k, v, g, do, dk, dv, ds_final, ds0, scale, T,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_GATE: tl.constexpr, USE_FINAL_GRAD: tl.constexpr,
):
    """Walks the chunks backwards holding dS (gradient of the state leaving the chunk):
    dk_s = Σ_{t≥s} (do_t·v_s) q_t ⊙ exp(G_t − G_s) + exp(G_last − G_s) ⊙ dS v_s,
    dv_s = Σ_{t≥s} A_ts do_t + dSᵀ (k_s ⊙ exp(G_last − G_s)),
    then dS ← diag(exp(G_last)) dS + (q ⊙ exp(G))ᵀ do (without a gate every exp is 1). dk[i_v] is this
    value tile's share; dk, dv are per query head (the wrapper sums GQA groups)."""
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
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        row_q = (i_b * T + t) * H + i_h
        row_kv = (i_b * T + t) * HKV + i_hk
        b_q = tl.load(q + row_q[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32) * scale
        b_k = tl.load(k + row_kv[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
        b_v = tl.load(v + row_kv[:, None] * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        b_do = tl.load(do + row_q[:, None] * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        b_dp = tl.dot(b_do, tl.trans(b_v))  # [BT(t), BT(s)]
        if USE_GATE:
            b_gc, b_glast, b_decay = _chunk_decays(g, row_kv, o_k, m_tk, causal, K)
            b_a = tl.sum(b_q[:, None, :] * b_k[None, :, :] * b_decay, axis=2)  # [BT(t), BT(s)]
            b_k_end = b_k * tl.exp(b_glast[None, :] - b_gc)  # [BT, BK]
            b_dk = tl.sum(b_dp[:, :, None] * b_q[:, None, :] * b_decay, axis=0)  # [BT, BK]
            b_dk += tl.exp(b_glast[None, :] - b_gc) * tl.dot(b_v, tl.trans(b_ds))
            b_q_decayed = b_q * tl.exp(b_gc)  # [BT, BK]
        else:
            b_a = tl.where(causal, tl.dot(b_q, tl.trans(b_k)), 0.0)  # [BT(t), BT(s)], scaled
            b_k_end = b_k
            b_dk = tl.dot(tl.trans(tl.where(causal, b_dp, 0.0)), b_q) + tl.dot(b_v, tl.trans(b_ds))  # [BT, BK]
            b_q_decayed = b_q
        b_dv = tl.dot(tl.trans(b_a), b_do) + tl.dot(b_k_end, b_ds)  # [BT, BV]
        tl.store(dv + row_q[:, None] * V + o_v[None, :], b_dv, mask=m_tv)
        tl.store(dk + i_v * B * T * H * K + row_q[:, None] * K + o_k[None, :], b_dk, mask=m_tk)
        if USE_GATE:
            b_ds = b_ds * tl.exp(b_glast)[:, None]
        b_ds += tl.dot(tl.trans(b_q_decayed), b_do)
    tl.store(ds0 + p_state, b_ds, mask=m_k[:, None] & m_v[None, :])


def _group_view(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """`[B, T, H, D]` → `[B, T, H_kv, group, D]` (query head h = kv head h // group)."""
    batch, seq_len, heads, width = x.shape
    return x.view(batch, seq_len, kv_heads, heads // kv_heads, width)


def _decay_gradient(q, k, dq, dk_per_head, final, dfinal, kv_heads):
    """dg `[B, T, H_kv, K]` from dL/dG_t = q ⊙ dq − k ⊙ dk (+ Σ_v dS_T ⊙ S_T at the last token),
    G being the cumulative log-decay, so dg is the reverse cumulative sum over time."""
    d_cum = (_group_view(q.float() * dq, kv_heads) - k.float().unsqueeze(3) * _group_view(dk_per_head, kv_heads))
    d_cum = d_cum.sum(3)  # [B, T, H_kv, K]
    dg = d_cum.flip(1).cumsum(1).flip(1)  # [B, T, H_kv, K]
    if dfinal is not None:
        batch, heads, key_dim, _ = final.shape
        last = (dfinal * final).sum(-1).view(batch, kv_heads, heads // kv_heads, key_dim).sum(2)  # [B, H_kv, K]
        dg = dg + last.unsqueeze(1)  # every g_j (j ≤ T) decays the final state
    return dg


def gla_backward_fp32(q, k, v, g, do, initial_state, dfinal, scale, chunk_size):
    """Per-query-head fp32 dq `[B, T, H, K]`, dk `[B, T, H, K]`, dv `[B, T, H, V]` and d(initial_state)
    (g None: no gate)."""
    batch, seq_len, heads, key_dim = q.shape
    kv_heads, value_dim = k.shape[2], v.shape[-1]
    bv = block_v(value_dim)
    num_v_tiles = triton.cdiv(value_dim, bv)
    grid = (num_v_tiles, batch * heads)
    blocks = dict(BT=block_t(chunk_size, max_block_t(g is not None)), BK=block_k(key_dim), BV=bv)
    dims = dict(H=heads, HKV=kv_heads, K=key_dim, V=value_dim)
    dq = new_output((num_v_tiles, batch, seq_len, heads, key_dim), q.device)
    dk = new_output((num_v_tiles, batch, seq_len, heads, key_dim), q.device)
    dv = new_output((batch, seq_len, heads, value_dim), q.device)
    ds0 = new_output((batch, heads, key_dim, value_dim), q.device)
    _chunk_gla_bwd_dq_kernel[grid](
        k, v, g, do, dq, initial_state, float(scale), seq_len, **dims, **blocks,
        USE_GATE=g is not None, USE_INITIAL_STATE=initial_state is not None,
    )
    _chunk_gla_bwd_dkv_kernel[grid](
        q, k, v, g, do, dk, dv, dfinal, ds0, float(scale), seq_len, **dims, **blocks,
        USE_GATE=g is not None, USE_FINAL_GRAD=dfinal is not None,
    )
    return dq.sum(0), dk.sum(0), dv, ds0


class _GlaCore(torch.autograd.Function):
    """Unnormalized GLA `S_t = diag(exp(g_t)) S_{t−1} + k_t v_tᵀ`, `o_t = scale · q_tᵀ S_t` in fp32,
    Triton both ways (dg assembled in torch from dq and dk); g None is the ungated case."""

    @staticmethod
    def forward(ctx, q, k, v, g, initial_state, scale, output_final_state, chunk_size):
        q, k, v, g, initial_state = (contiguous(x) for x in (q, k, v, g, initial_state))
        o, final = gla_forward_fp32(q, k, v, g, scale, initial_state, output_final_state, chunk_size)
        # the final state only enters the decay gradient
        ctx.save_for_backward(q, k, v, g, initial_state, final if g is not None else None)
        ctx.scale, ctx.chunk_size = scale, chunk_size
        ctx.set_materialize_grads(False)
        return o, final

    @staticmethod
    def backward(ctx, do, dfinal):
        q, k, v, g, initial_state, final = ctx.saved_tensors
        kv_heads = k.shape[2]
        do = torch.zeros(q.shape[:3] + v.shape[-1:], device=q.device) if do is None else do.contiguous()
        dfinal = contiguous(dfinal)
        dq, dk, dv, ds0 = gla_backward_fp32(q, k, v, g, do, initial_state, dfinal, ctx.scale, ctx.chunk_size)
        dg = None if g is None else _decay_gradient(q, k, dq, dk, final, dfinal, kv_heads).to(g.dtype)
        dk = _group_view(dk, kv_heads).sum(3)  # [B, T, H_kv, K]
        dv = _group_view(dv, kv_heads).sum(3)  # [B, T, H_kv, V]
        ds0 = None if initial_state is None else ds0.to(initial_state.dtype)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg, ds0, None, None, None


def _check(q, k, v, g):
    tensors = dict(q=q, k=k, v=v) if g is None else dict(q=q, k=k, v=v, g=g)
    check_same_tokens(**tensors)
    if k.shape[2] != v.shape[2] or q.shape[-1] != k.shape[-1] or (g is not None and g.shape[2:] != k.shape[2:]):
        gate = "" if g is None else f"g {tuple(g.shape)}, "
        raise ValueError(f"k {tuple(k.shape)} must match {gate}v's heads {v.shape[2]} and q's width {q.shape[-1]}")
    check_heads(q.shape[2], k.shape[2])


def chunk_gated_linear_attn_triton(
    q, k, v, g, *, scale=None, normalize=False, initial_state=None, output_final_state=False, chunk_size=64
):
    """Gated linear attention, Triton forward and backward; q `[B, T, H, K]`, k, g `[B, T, H_kv, K]`
    (g None: no gate, plain causal linear attention), v `[B, T, H_kv, V]` → (o `[B, T, H, V]` in v.dtype,
    fp32 state `[B, H, K, V(+1)]` or None). `chunk_size` sets the time tile (a power of two: 16 with a gate,
    the largest one ≤ chunk_size in [16, 64] without); the result does not depend on it. Normalized: the core runs
    on `[v, 1]` and torch autograd handles the division."""
    _check(q, k, v, g)
    out_dtype = v.dtype
    if normalize:
        v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # [B, T, H_kv, V + 1]
        scale = 1.0
    elif scale is None:
        scale = q.shape[-1] ** -0.5
    state_shape = (q.shape[0], q.shape[2], q.shape[-1], v.shape[-1])
    if initial_state is not None and tuple(initial_state.shape) != state_shape:
        raise ValueError(f"initial_state must have shape {state_shape}, got {tuple(initial_state.shape)}")
    o, final = _GlaCore.apply(q, k, v, g, initial_state, float(scale), output_final_state, chunk_size)
    if normalize:
        o = o[..., :-1] / (o[..., -1:] + NORMALIZE_EPS)  # [B, T, H, V]
    return o.to(out_dtype), final
