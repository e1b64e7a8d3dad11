"""Triton chunked gated delta rule, forward and backward: `chunk_gated_delta_rule_triton`, same contract as
`chunk.chunk_gated_delta_rule_torch` (math, shapes, state layout: `naive.py`; the chunk derivation:
`chunk.py`).

One program per (value tile, batch · kv head) walks the chunks holding the fp32 state `S [K, BV]`. Per chunk
of C tokens, with Γ the cumulative log-decay from the chunk start (≤ 0, per head or per key channel):

  M_rs = Σ_d k_rd k_sd e^{Γ_rd − Γ_sd} (s < r),   T = (I + diag(β) M)⁻¹   (forward substitution, in registers)
  U = T Z,   Z = diag(β) (V − (K ⊙ e^Γ) S)                               (the new values; chunk.py's Ū − W S)
  O_h = (Q_h ⊙ e^Γ) S + P_h U,   P_h[r, s] = Σ_d q_rd k_sd e^{Γ_rd − Γ_sd} (s ≤ r),  q pre-scaled
  S ← e^{Γ_last} ⊙ S + (K ⊙ e^{Γ_last − Γ})ᵀ U

The G query heads of a kv head (GQA) are served by the kv head's program, one after another, so T and U are
solved once per chunk for all of them; nothing is repeated in memory. T and U depend only on this chunk and
the state, so a program holds O(C² + C·K + K·BV) values and memory stays O(T) outside it: no T × T matrix.
Every exponent is a difference "later minus earlier" ≤ 0 (masked entries are zeroed before the exp), so
nothing overflows however strong the decay.

Per-head decay makes the pair decays one `[BT, BT]` tile and every score one `tl.dot`, so the time tile follows
`chunk_size` up to 64 (32 for K = 128, 16 for K = 256: MAX_TILE_ELEMENTS). Per-channel decay (KDA) needs an
explicit `[BT, BT, BK]` pair-decay tile, so its time tile is capped at 16 (as in the gated linear attention
template); the result does not depend on the tile.

Backward: the chunk-start states are recomputed by rerunning the forward kernel without outputs (so they exist
only while one layer's backward runs, `[B, H_kv, N, K, V]` fp32), then one kernel walks the chunks in reverse
holding dS (the gradient of the state leaving the chunk) and recomputes T, U per chunk. With dZ = Tᵀ dU, the
solve's gradient is dA = −dZ Uᵀ (strictly lower), and the log-decay gradient comes from the identity
dL/dΓ = a ⊙ da − b ⊙ db of every score Σ_d a_rd b_sd e^{Γ_rd − Γ_sd}, then dg = reverse cumsum within the chunk
(+ the Γ_last terms on every token of the chunk). Gradients that sum over values (dq, dk, dβ, dg) are written
per value tile and summed by the wrapper.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .naive import check_delta_shapes
from .._triton_utils import MIN_BLOCK, block_k, block_t, block_v, contiguous, new_output

# Time tile caps: per-channel decay holds a [BT, BT, BK] pair-decay tile, so it stays small.
MAX_BLOCK_T_PER_HEAD = 64
MAX_BLOCK_T_PER_CHANNEL = 16
# Largest [BT, BK] tile: compiled for sm_90, the backward kernel needs 144 KiB of shared memory at BT = 64,
# BK = 64 but 240 KiB at BT = 64, BK = 128, over a Hopper SM's 227 KiB; so wide keys get a shorter tile.
MAX_TILE_ELEMENTS = 64 * 64


@triton.jit
def _load_chunk(k, v, g, beta, row_kv, o_k, o_v, m_t, m_k, m_v,
                K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, PER_CHANNEL: tl.constexpr):
    """One chunk's k `[BT, BK]`, v `[BT, BV]`, β `[BT]` (fp32) and its log-decays: Γ `[BT, BK]` cumulative
    from the chunk start (per head: the row's value in every column), Γ per row `[BT]` (per head only; per
    channel it is unused) and Γ_last `[BK]`. Padded rows load k = v = β = g = 0: they write nothing and decay
    nothing."""
    m_tk = m_t[:, None] & m_k[None, :]
    b_k = tl.load(k + row_kv[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
    b_v = tl.load(v + row_kv[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
    b_beta = tl.load(beta + row_kv, mask=m_t, other=0.0).to(tl.float32)
    if PER_CHANNEL:
        b_g = tl.load(g + row_kv[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)  # [BT, BK]
        b_gh = tl.sum(b_g, axis=1)  # unused per channel; a [BT] value keeps both branches one shape
    else:
        b_g1 = tl.load(g + row_kv, mask=m_t, other=0.0).to(tl.float32)  # [BT]
        b_gh = tl.cumsum(b_g1, axis=0)  # [BT]
        b_g = tl.broadcast_to(b_g1[:, None], (BT, BK))  # [BT, BK]
    b_gc = tl.cumsum(b_g, axis=0)  # [BT, BK]
    b_glast = tl.sum(b_g, axis=0)  # [BK]: padded rows add 0, so this is Γ of the last real row
    return b_k, b_v.to(tl.float32), b_beta, b_gc, b_gh, b_glast


@triton.jit
def _pair_decay(b_gc, b_gh, keep, PER_CHANNEL: tl.constexpr):
    """exp(Γ_r − Γ_s) where `keep[r, s]`, else 0: `[BT, BT, BK]` per channel, `[BT, BT]` per head. Where not
    kept the exponent is replaced by 0 before the exp: there s comes after r and it may overflow."""
    if PER_CHANNEL:
        keep3 = keep[:, :, None]
        return tl.where(keep3, tl.exp(tl.where(keep3, b_gc[:, None, :] - b_gc[None, :, :], 0.0)), 0.0)
    else:
        return tl.where(keep, tl.exp(tl.where(keep, b_gh[:, None] - b_gh[None, :], 0.0)), 0.0)


@triton.jit
def _scores(b_a, b_b, b_e, PER_CHANNEL: tl.constexpr):
    """`[BT, BT]` scores Σ_d a_rd b_sd exp(Γ_rd − Γ_sd), with the pair decays `b_e` of `_pair_decay`."""
    if PER_CHANNEL:
        return tl.sum(b_a[:, None, :] * b_b[None, :, :] * b_e, axis=2)
    else:
        return tl.dot(b_a, tl.trans(b_b)) * b_e


@triton.jit
def _scores_grad(b_dscore, b_a, b_b, b_e, PER_CHANNEL: tl.constexpr):
    """Gradients of `_scores` from d(scores) `[BT, BT]`: da_r = Σ_s dP_rs b_s e^{Γ_r − Γ_s} and
    db_s = Σ_r dP_rs a_r e^{Γ_r − Γ_s}, both `[BT, BK]`; the scores' log-decay gradient is a ⊙ da − b ⊙ db."""
    if PER_CHANNEL:
        b_w = b_dscore[:, :, None] * b_e  # [BT(r), BT(s), BK]
        b_da = tl.sum(b_w * b_b[None, :, :], axis=1)
        b_db = tl.sum(b_w * b_a[:, None, :], axis=0)
    else:
        b_w = b_dscore * b_e  # [BT(r), BT(s)]
        b_da = tl.dot(b_w, b_b)
        b_db = tl.dot(tl.trans(b_w), b_a)
    return b_da, b_db


@triton.jit
def _unit_lower_inverse(b_a, BT: tl.constexpr):
    """(I + A)⁻¹ for a strictly lower `[BT, BT]` A, by forward substitution: row i of the inverse is
    e_i − Σ_{s<i} A_is · (row s), and rows s < i are final when row i is formed. (The product
    (I − A)(I + A²)(I + A⁴)… would need only matmuls, but with correlated keys the powers of A grow huge
    and cancel in fp32.)"""
    o_t = tl.arange(0, BT)
    b_inv = tl.where(o_t[:, None] == o_t[None, :], 1.0, 0.0)  # [BT, BT]
    for i in range(1, BT):
        is_row = o_t[:, None] == i  # [BT, 1]
        b_ai = tl.sum(tl.where(is_row, b_a, 0.0), axis=0)  # [BT(s)]: row i of A, 0 for s ≥ i
        b_inv = tl.where(is_row, b_inv - tl.sum(b_ai[:, None] * b_inv, axis=0)[None, :], b_inv)
    return b_inv


@triton.jit
def _new_values(b_k, b_v, b_beta, b_gc, b_gh, b_s, strict, BT: tl.constexpr, PER_CHANNEL: tl.constexpr):
    """The chunk's WY quantities: pair decays (s < r), M, T = (I + diag(β) M)⁻¹, K ⊙ e^Γ, the residual
    V − (K ⊙ e^Γ) S and U = T diag(β) residual."""
    b_e_strict = _pair_decay(b_gc, b_gh, strict, PER_CHANNEL)
    b_m = _scores(b_k, b_k, b_e_strict, PER_CHANNEL)  # [BT, BT], strictly lower
    b_tinv = _unit_lower_inverse(b_beta[:, None] * b_m, BT)  # [BT, BT]
    b_kg = b_k * tl.exp(b_gc)  # [BT, BK]: keys decayed from the chunk start
    b_res = b_v - tl.dot(b_kg, b_s)  # [BT, BV]: what the entering state misses for each key
    b_u = tl.dot(b_tinv, b_beta[:, None] * b_res)  # [BT, BV]
    return b_e_strict, b_m, b_tinv, b_kg, b_res, b_u


@triton.jit
def _gdr_fwd_kernel(
    q, k, v, g, beta, o, s0, s_final, states, scale, T,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PER_CHANNEL: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr,
    WRITE_OUTPUT: tl.constexpr, STORE_STATES: tl.constexpr,
):
    """Outputs (WRITE_OUTPUT) and/or the state entering every chunk (STORE_STATES, `[B, H_kv, N, K, V]`, for
    the backward) of one (value tile, batch · kv head)."""
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // HKV
    i_hk = i_bh % HKV
    group = H // HKV
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_state = o_k[:, None] * V + o_v[None, :]  # [BK, BV] inside one [K, V] state
    b_s = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_s += tl.load(s0 + i_bh * K * V + p_state, mask=m_kv, other=0.0).to(tl.float32)
    strict = o_t[:, None] > o_t[None, :]  # [BT, BT]
    causal = o_t[:, None] >= o_t[None, :]
    num_chunks = tl.cdiv(T, BT)
    for i_t in range(0, num_chunks):
        if STORE_STATES:
            tl.store(states + (i_bh * num_chunks + i_t) * K * V + p_state, b_s, mask=m_kv)
        t = i_t * BT + o_t
        m_t = t < T
        row_kv = (i_b * T + t) * HKV + i_hk  # [BT]
        b_k, b_v, b_beta, b_gc, b_gh, b_glast = _load_chunk(
            k, v, g, beta, row_kv, o_k, o_v, m_t, m_k, m_v, K, V, BT, BK, PER_CHANNEL
        )
        _, _, _, _, _, b_u = _new_values(b_k, b_v, b_beta, b_gc, b_gh, b_s, strict, BT, PER_CHANNEL)
        if WRITE_OUTPUT:
            b_e_causal = _pair_decay(b_gc, b_gh, causal, PER_CHANNEL)
            for i_g in range(0, group):
                row_q = (i_b * T + t) * H + i_hk * group + i_g  # [BT]
                b_q = tl.load(q + row_q[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
                b_q = b_q.to(tl.float32) * scale  # [BT, BK]
                b_o = tl.dot(b_q * tl.exp(b_gc), b_s) + tl.dot(_scores(b_q, b_k, b_e_causal, PER_CHANNEL), b_u)
                tl.store(o + row_q[:, None] * V + o_v[None, :], b_o, mask=m_t[:, None] & m_v[None, :])
        b_k_end = b_k * tl.exp(b_glast[None, :] - b_gc)  # [BT, BK]: keys decayed to the chunk end
        b_s = b_s * tl.exp(b_glast)[:, None] + tl.dot(tl.trans(b_k_end), b_u)  # [BK, BV]
    if STORE_FINAL_STATE:
        tl.store(s_final + i_bh * K * V + p_state, b_s, mask=m_kv)


@triton.jit
def _gdr_bwd_kernel(
    q, k, v, g, beta, do, states, ds_final, dq, dk, dv, dbeta, dg, ds0, scale, T,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PER_CHANNEL: tl.constexpr,
    USE_FINAL_GRAD: tl.constexpr,
):
    """Walks the chunks in reverse holding dS, the gradient of the state leaving the chunk; see the module
    docstring. dq, dk, dβ, dg are this value tile's shares (`[NV, ...]`), dv and d(initial state) exact."""
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // HKV
    i_hk = i_bh % HKV
    B = tl.num_programs(1) // HKV
    group = H // HKV
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_state = o_k[:, None] * V + o_v[None, :]  # [BK, BV]
    b_ds = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_FINAL_GRAD:
        b_ds += tl.load(ds_final + i_bh * K * V + p_state, mask=m_kv, other=0.0).to(tl.float32)
    strict = o_t[:, None] > o_t[None, :]  # [BT, BT]
    causal = o_t[:, None] >= o_t[None, :]
    num_chunks = tl.cdiv(T, BT)
    for i_r in range(0, num_chunks):
        i_t = num_chunks - 1 - i_r
        t = i_t * BT + o_t
        m_t = t < T
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        row_kv = (i_b * T + t) * HKV + i_hk  # [BT]
        b_s = tl.load(states + (i_bh * num_chunks + i_t) * K * V + p_state, mask=m_kv, other=0.0)  # [BK, BV]
        b_k, b_v, b_beta, b_gc, b_gh, b_glast = _load_chunk(
            k, v, g, beta, row_kv, o_k, o_v, m_t, m_k, m_v, K, V, BT, BK, PER_CHANNEL
        )
        b_e_strict, b_m, b_tinv, b_kg, b_res, b_u = _new_values(
            b_k, b_v, b_beta, b_gc, b_gh, b_s, strict, BT, PER_CHANNEL
        )
        # the state update S' = e^{Γ_last} ⊙ S + K_endᵀ U
        b_decay_end = tl.exp(b_glast[None, :] - b_gc)  # [BT, BK]
        b_k_end = b_k * b_decay_end
        b_du = tl.dot(b_k_end, b_ds)  # [BT, BV]
        b_dk_end = tl.dot(b_u, tl.trans(b_ds))  # [BT, BK]
        b_dk = b_dk_end * b_decay_end  # [BT, BK]
        b_dgc = -b_dk_end * b_k_end  # [BT, BK]: dL/dΓ of each row
        b_dglast = tl.sum(b_dk_end * b_k_end, axis=0) + tl.sum(b_ds * b_s, axis=1) * tl.exp(b_glast)  # [BK]
        b_ds_prev = b_ds * tl.exp(b_glast)[:, None]  # [BK, BV]
        # outputs O_h = (Q_h ⊙ e^Γ) S + P_h U of each query head of the group
        b_e_causal = _pair_decay(b_gc, b_gh, causal, PER_CHANNEL)
        for i_g in range(0, group):
            row_q = (i_b * T + t) * H + i_hk * group + i_g  # [BT]
            b_q = tl.load(q + row_q[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32) * scale
            b_do = tl.load(do + row_q[:, None] * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
            b_qg = b_q * tl.exp(b_gc)  # [BT, BK]
            b_p = _scores(b_q, b_k, b_e_causal, PER_CHANNEL)  # [BT, BT]
            b_du += tl.dot(tl.trans(b_p), b_do)
            b_ds_prev += tl.dot(tl.trans(b_qg), b_do)
            b_dqg = tl.dot(b_do, tl.trans(b_s))  # [BT, BK]: d(q ⊙ e^Γ)
            b_dq_p, b_dk_p = _scores_grad(tl.dot(b_do, tl.trans(b_u)), b_q, b_k, b_e_causal, PER_CHANNEL)
            b_dk += b_dk_p
            b_dgc += b_qg * b_dqg + b_q * b_dq_p - b_k * b_dk_p
            b_dq = (b_dqg * tl.exp(b_gc) + b_dq_p) * scale  # q was loaded scaled
            tl.store(dq + i_v * B * T * H * K + row_q[:, None] * K + o_k[None, :], b_dq, mask=m_tk)
        # U = T Z: dZ = Tᵀ dU, and the inverse's gradient dA = −Tᵀ dU Zᵀ Tᵀ = −dZ Uᵀ (A strictly lower)
        b_dz = tl.dot(tl.trans(b_tinv), b_du)  # [BT, BV]
        b_da = tl.where(strict, -tl.dot(b_dz, tl.trans(b_u)), 0.0)  # [BT, BT]
        # Z = diag(β) (V − (K ⊙ e^Γ) S)
        b_dres = b_beta[:, None] * b_dz  # [BT, BV]
        b_dkg = -tl.dot(b_dres, tl.trans(b_s))  # [BT, BK]: d(K ⊙ e^Γ)
        b_dk += b_dkg * tl.exp(b_gc)
        b_dgc += b_dkg * b_kg
        b_ds_prev -= tl.dot(tl.trans(b_kg), b_dres)
        # A = diag(β) M
        b_dbeta = tl.sum(b_dz * b_res, axis=1) + tl.sum(b_da * b_m, axis=1)  # [BT]
        b_dk_r, b_dk_s = _scores_grad(b_beta[:, None] * b_da, b_k, b_k, b_e_strict, PER_CHANNEL)
        b_dk += b_dk_r + b_dk_s
        b_dgc += b_k * (b_dk_r - b_dk_s)
        # Γ_r = Σ_{t ≤ r} g_t within the chunk, and Γ_last sums every g of the chunk
        b_dg = tl.cumsum(b_dgc, axis=0, reverse=True) + b_dglast[None, :]  # [BT, BK]
        p_share = i_v * B * T * HKV + row_kv  # [BT]: row of this value tile's share
        tl.store(dk + p_share[:, None] * K + o_k[None, :], b_dk, mask=m_tk)
        tl.store(dv + row_kv[:, None] * V + o_v[None, :], b_dres, mask=m_tv)
        tl.store(dbeta + p_share, b_dbeta, mask=m_t)
        if PER_CHANNEL:
            tl.store(dg + p_share[:, None] * K + o_k[None, :], b_dg, mask=m_tk)
        else:
            tl.store(dg + p_share, tl.sum(tl.where(m_k[None, :], b_dg, 0.0), axis=1), mask=m_t)
        b_ds = b_ds_prev
    tl.store(ds0 + i_bh * K * V + p_state, b_ds, mask=m_kv)


def launch_meta(key_dim, value_dim, heads, kv_heads, per_channel, chunk_size):
    """The kernels' shape constants and block sizes. The time tile is the largest power of two ≤ chunk_size
    within the decay shape's cap and MAX_TILE_ELEMENTS."""
    bk = block_k(key_dim)
    cap = MAX_BLOCK_T_PER_CHANNEL if per_channel else MAX_BLOCK_T_PER_HEAD
    bt = block_t(chunk_size, min(cap, max(MIN_BLOCK, MAX_TILE_ELEMENTS // bk)))
    return dict(H=heads, HKV=kv_heads, K=key_dim, V=value_dim, BT=bt, BK=bk, BV=block_v(value_dim),
                PER_CHANNEL=per_channel)


def _launch(q, k, v, g, chunk_size):
    """Grid `(value tiles, batch · kv heads)` and `launch_meta` for these inputs."""
    meta = launch_meta(q.shape[3], v.shape[3], q.shape[2], k.shape[2], g.dim() == 4, chunk_size)
    return (triton.cdiv(meta["V"], meta["BV"]), q.shape[0] * meta["HKV"]), meta


def gated_delta_forward_fp32(q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size):
    """Kernel launch on contiguous inputs → (fp32 o `[B, T, H, V]`, fp32 state `[B, H_kv, K, V]` or None)."""
    batch, seq_len, heads, _ = q.shape
    grid, meta = _launch(q, k, v, g, chunk_size)
    o = new_output((batch, seq_len, heads, meta["V"]), q.device)
    final = new_output((batch, meta["HKV"], meta["K"], meta["V"]), q.device) if output_final_state else None
    _gdr_fwd_kernel[grid](
        q, k, v, g, beta, o, initial_state, final, None, float(scale), seq_len, **meta,
        USE_INITIAL_STATE=initial_state is not None, STORE_FINAL_STATE=output_final_state,
        WRITE_OUTPUT=True, STORE_STATES=False,
    )
    return o, final


def chunk_start_states(q, k, v, g, beta, initial_state, chunk_size):
    """The state entering every chunk, `[B, H_kv, N, K, V]` fp32 (the forward kernel without outputs)."""
    grid, meta = _launch(q, k, v, g, chunk_size)
    num_chunks = triton.cdiv(q.shape[1], meta["BT"])
    states = new_output((q.shape[0], meta["HKV"], num_chunks, meta["K"], meta["V"]), q.device)
    _gdr_fwd_kernel[grid](
        q, k, v, g, beta, None, initial_state, None, states, 1.0, q.shape[1], **meta,
        USE_INITIAL_STATE=initial_state is not None, STORE_FINAL_STATE=False, WRITE_OUTPUT=False, STORE_STATES=True,
    )
    return states


def gated_delta_backward_fp32(q, k, v, g, beta, do, initial_state, dfinal, scale, chunk_size):
    """fp32 dq, dk, dv, dg, dβ (in the inputs' shapes) and d(initial state) `[B, H_kv, K, V]`."""
    states = chunk_start_states(q, k, v, g, beta, initial_state, chunk_size)
    grid, meta = _launch(q, k, v, g, chunk_size)
    num_v_tiles = grid[0]
    dq = new_output((num_v_tiles, *q.shape), q.device)
    dk = new_output((num_v_tiles, *k.shape), q.device)
    dv = new_output(v.shape, q.device)
    dg = new_output((num_v_tiles, *g.shape), q.device)
    dbeta = new_output((num_v_tiles, *beta.shape), q.device)
    ds0 = new_output((q.shape[0], meta["HKV"], meta["K"], meta["V"]), q.device)
    _gdr_bwd_kernel[grid](
        q, k, v, g, beta, do, states, dfinal, dq, dk, dv, dbeta, dg, ds0, float(scale), q.shape[1], **meta,
        USE_FINAL_GRAD=dfinal is not None,
    )
    return dq.sum(0), dk.sum(0), dv, dg.sum(0), dbeta.sum(0), ds0


class _GatedDeltaCore(torch.autograd.Function):
    """The gated delta rule in fp32, Triton both ways; returns (o `[B, T, H, V]` fp32, final state or None)."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, initial_state, scale, output_final_state, chunk_size):
        q, k, v, g, beta, initial_state = (contiguous(x) for x in (q, k, v, g, beta, initial_state))
        o, final = gated_delta_forward_fp32(q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size)
        ctx.save_for_backward(q, k, v, g, beta, initial_state)
        ctx.scale, ctx.chunk_size = scale, chunk_size
        ctx.set_materialize_grads(False)
        return o, final

    @staticmethod
    def backward(ctx, do, dfinal):
        q, k, v, g, beta, initial_state = ctx.saved_tensors
        do = torch.zeros(q.shape[:3] + v.shape[-1:], device=q.device) if do is None else do.contiguous()
        dq, dk, dv, dg, dbeta, ds0 = gated_delta_backward_fp32(
            q, k, v, g, beta, do, initial_state, contiguous(dfinal), ctx.scale, ctx.chunk_size
        )
        ds0 = None if initial_state is None else ds0.to(initial_state.dtype)
        grads = (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg.to(g.dtype), dbeta.to(beta.dtype), ds0)
        return (*grads, None, None, None)


def chunk_gated_delta_rule_triton(
    q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False, chunk_size=64
):
    """Gated delta rule, Triton forward and backward; q `[B, T, H, K]`, k `[B, T, H_kv, K]`, v
    `[B, T, H_kv, V]`, g `[B, T, H_kv]` or `[B, T, H_kv, K]`, beta `[B, T, H_kv]` → (o `[B, T, H, V]` in
    q.dtype, fp32 state `[B, H_kv, K, V]` or None). Computes in fp32 whatever the input dtype (float64
    inputs included). `chunk_size` sets the time tile (see the module docstring); the result does not
    depend on it."""
    check_delta_shapes(q, k, v, g, beta, initial_state)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    o, final = _GatedDeltaCore.apply(q, k, v, g, beta, initial_state, float(scale), output_final_state, chunk_size)
    return o.to(q.dtype), final
