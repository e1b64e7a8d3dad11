"""Triton fused LoLCATs hybrid attention (sliding-window softmax + linear attention over older keys):
`window_linear_attn_triton`, same contract as `chunk.chunk_window_linear_attn_torch` (math, shapes and
`WindowLinearState`: see `naive.py`).

Keys are the cached prefix (P ≤ W keys from `initial_state`) followed by the T new ones; query t sits at
key position P + t. One program per (value tile, batch·head) walks query chunks of BT tokens starting at
q0, holding the fp32 linear state (S `[F, V]`, z `[F]`) of every key older than q0 − W. For each chunk
it visits the key tiles covering [q0 − W, q0 + BT) once:
- window keys (0 ≤ t − s < W): an online softmax (running max, flash-attention style); its final max is
  c_t, so the sum equals Σ exp(scale·q_t·k_s − c_t) exactly;
- linear keys inside the range (t − s ≥ W): `fq_t·fk_s` weights;
- older keys: `fq_t S`, `fq_t z`.
The first tile ([q0 − W, q0 − W + BT)) is linear for every later query, so it joins S and z afterwards.
Sinks (`sink_tokens=N`, the first N keys): before that walk, the tiles of sinks older than q0 − W join the
online softmax; inside the walk a key below N counts as a window key at any distance. The wrapper zeroes
the sinks' fk, so they add nothing to S, z or any linear weight (and their fk gradient is 0).
GQA by indexing: k, v by kv head `h // group`; q, fq, fk by query head.
A half-life (`linear_half_life=H`, one or one per head) multiplies each linear weight by 2^(−λ_h(t − s)),
λ_h = 1/H_h (λ = 0 without one, where every factor is exactly 1); a learned (gradient-needing) half-life
has no Triton backward for itself and runs the torch forms. S and z are kept decayed to a reference key index that only moves
forward (the prefix's last key, then the last key that joined), so every factor is a power ≤ 1: nothing is
rescaled upwards, and no length overflows. A query reads them times 2^(−λ(t − reference)).

Backward (Triton): with o_t = Σ_s w_ts v_s / den_t, every weight gets dw_ts = (do_t·v_s − do_t·o_t) / den_t.
A query-side kernel (forward order) gives dq, dfq and the per-row window_logit term; a key-side kernel
(reverse order over key tiles) visits the query tiles within W + BT of each key tile and reaches later
queries (all linear) through an accumulator R = Σ fq_tᵀ [do_t, −do_t·o_t] / den_t, giving dk, dv, dfk.
A key tile holding sinks visits every later query tile (sinks are softmax keys of all of them); its
sinks' zero fk keeps R out of their gradients.
The row max c_t does not cancel (it scales the softmax weights against the linear ones), so the forward
saves the key position attaining it and torch adds that gradient to dq and dk; d(initial kv) is a torch
einsum.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._triton_utils import MIN_BLOCK as MIN_BLOCK_V, block_k, block_t, block_v, contiguous, new_output
from .naive import (
    WindowLinearState, _check_inputs, _initial_state, cache_split, decay_factor, decay_powers, linear_decay,
    zero_sink_features,
)

# Time tile cap for queries and keys: [BT, BT] score tiles beside [BT, BD] / [BT, BF] operands.
MAX_BLOCK_T = 64
# Running-max start: finite so a row with no window key yet rescales by exp(0), not exp(-inf + inf).
NEG_LARGE = tl.constexpr(-1.0e30)


@triton.jit
def _join_state(b_s, b_z, ref, b_fk, b_v, s, last, lam):
    """S `[BF, BV]` and z `[BF]` (decayed to key index `ref`) after a key tile at positions s joins them, all
    decayed to the newer of `ref` and the tile's `last` key → (S, z, new reference)."""
    new_ref = tl.maximum(ref, last)
    b_fk_aged = b_fk * tl.exp2(-lam * tl.maximum(new_ref - s, 0).to(tl.float32))[:, None]  # [BT, BF]
    b_shift = tl.exp2(-lam * (new_ref - ref).to(tl.float32))
    b_s = b_s * b_shift + tl.dot(tl.trans(b_fk_aged), b_v)
    b_z = b_z * b_shift + tl.sum(b_fk_aged, axis=0)
    return b_s, b_z, new_ref


@triton.jit
def _window_linear_fwd_kernel(
    q, k, v, fq, fk, gamma, kv0, o, den, row_max, row_arg, scale, lams, T, P, W, NS,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, F: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
):
    """Writes o and, for the backward pass, per row the normalizer den_t, the window max c_t and the
    key position attaining it (c_t scales the softmax part against the linear part: it gets a gradient)."""
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    i_hk = i_h // (H // HKV)
    L = P + T  # number of keys
    o_t = tl.arange(0, BT)
    o_d = tl.arange(0, BD)
    o_f = tl.arange(0, BF)
    o_v = i_v * BV + tl.arange(0, BV)
    m_d = o_d < D
    m_f = o_f < F
    m_v = o_v < V
    b_gamma = tl.load(gamma + i_h)
    lam = tl.load(lams + i_h)  # this head's −log2 γ per token (0: no decay)
    b_s = tl.zeros([BF, BV], dtype=tl.float32)
    b_z = tl.zeros([BF], dtype=tl.float32)
    if USE_INITIAL_STATE:
        # kv0 is [B, H, F, V + 1]: value columns, then the key sum z
        p_kv0 = kv0 + i_bh * F * (V + 1) + o_f[:, None] * (V + 1)  # [BF, 1]
        b_s += tl.load(p_kv0 + o_v[None, :], mask=m_f[:, None] & m_v[None, :], other=0.0)
        b_z += tl.load(kv0 + i_bh * F * (V + 1) + o_f * (V + 1) + V, mask=m_f, other=0.0)
    ref = P - 1  # the key index S and z are decayed to (kv0: the prefix's last key)
    for i_t in range(0, tl.cdiv(T, BT)):
        t = i_t * BT + o_t  # query index
        m_t = t < T
        pos_q = P + t  # key position of each query
        row_q = (i_b * T + t) * H + i_h
        b_q = tl.load(q + row_q[:, None] * D + o_d[None, :], mask=m_t[:, None] & m_d[None, :], other=0.0)
        b_q = b_q.to(tl.float32) * scale  # [BT, BD]
        b_fq = tl.load(fq + row_q[:, None] * F + o_f[None, :], mask=m_t[:, None] & m_f[None, :], other=0.0)
        b_fq = b_fq.to(tl.float32)  # [BT, BF]
        # older keys, through the linear state (every query is after its reference: pos_q > ref)
        b_age = tl.exp2(-lam * (pos_q - ref).to(tl.float32))  # [BT]
        b_lin = tl.dot(b_fq, b_s) * b_age[:, None]  # [BT, BV]
        b_lin_den = tl.sum(b_fq * b_z[None, :], axis=1) * b_age  # [BT]
        b_m = tl.full([BT], NEG_LARGE, dtype=tl.float32)
        b_arg = tl.zeros([BT], dtype=tl.int32)
        b_l = tl.zeros([BT], dtype=tl.float32)
        b_acc = tl.zeros([BT, BV], dtype=tl.float32)
        lo = P + i_t * BT - W
        n_early = tl.maximum(tl.minimum(NS, lo), 0)  # sinks before the window walk: softmax for every row
        for i_s in range(0, tl.cdiv(n_early, BT)):
            s = i_s * BT + o_t
            m_s = s < n_early
            row_k = (i_b * L + s) * HKV + i_hk
            b_k = tl.load(k + row_k[:, None] * D + o_d[None, :], mask=m_s[:, None] & m_d[None, :], other=0.0)
            b_v = tl.load(v + row_k[:, None] * V + o_v[None, :], mask=m_s[:, None] & m_v[None, :], other=0.0)
            b_k = b_k.to(tl.float32)  # [BT, BD]
            b_v = b_v.to(tl.float32)  # [BT, BV]
            b_score = tl.where(m_t[:, None] & m_s[None, :], tl.dot(b_q, tl.trans(b_k)), float("-inf"))  # [BT, BT]
            b_tile_max = tl.max(b_score, axis=1)
            b_arg = tl.where(b_tile_max > b_m, i_s * BT + tl.argmax(b_score, axis=1).to(tl.int32), b_arg)
            b_m_new = tl.maximum(b_m, b_tile_max)
            b_alpha = tl.exp(b_m - b_m_new)
            b_p = tl.exp(b_score - b_m_new[:, None])  # [BT, BT]
            b_l = b_l * b_alpha + tl.sum(b_p, axis=1)
            b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p, b_v)
            b_m = b_m_new
        for i_s in range(0, tl.cdiv(W + BT, BT)):
            s = lo + i_s * BT + o_t  # key positions of this tile
            m_s = (s >= 0) & (s < L)
            row_k = (i_b * L + s) * HKV + i_hk
            row_fk = (i_b * L + s) * H + i_h
            b_k = tl.load(k + row_k[:, None] * D + o_d[None, :], mask=m_s[:, None] & m_d[None, :], other=0.0)
            b_fk = tl.load(fk + row_fk[:, None] * F + o_f[None, :], mask=m_s[:, None] & m_f[None, :], other=0.0)
            b_v = tl.load(v + row_k[:, None] * V + o_v[None, :], mask=m_s[:, None] & m_v[None, :], other=0.0)
            b_k = b_k.to(tl.float32)  # [BT, BD]
            b_fk = b_fk.to(tl.float32)  # [BT, BF]
            b_v = b_v.to(tl.float32)  # [BT, BV]
            dist = pos_q[:, None] - s[None, :]  # [BT, BT]
            valid = m_t[:, None] & m_s[None, :]
            in_window = valid & (dist >= 0) & ((dist < W) | (s < NS))
            is_linear = valid & (dist >= W) & (s >= NS)
            b_decay = tl.exp2(-lam * tl.maximum(dist, 0).to(tl.float32))  # [BT, BT]
            b_a_lin = tl.where(is_linear, tl.dot(b_fq, tl.trans(b_fk)) * b_decay, 0.0)  # [BT, BT]
            b_lin += tl.dot(b_a_lin, b_v)
            b_lin_den += tl.sum(b_a_lin, axis=1)
            b_score = tl.where(in_window, tl.dot(b_q, tl.trans(b_k)), float("-inf"))  # [BT, BT]
            b_tile_max = tl.max(b_score, axis=1)
            b_tile_arg = lo + i_s * BT + tl.argmax(b_score, axis=1).to(tl.int32)
            b_arg = tl.where(b_tile_max > b_m, b_tile_arg, b_arg)
            b_m_new = tl.maximum(b_m, b_tile_max)
            b_alpha = tl.exp(b_m - b_m_new)
            b_p = tl.exp(b_score - b_m_new[:, None])  # [BT, BT]
            b_l = b_l * b_alpha + tl.sum(b_p, axis=1)
            b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p, b_v)
            b_m = b_m_new
            if i_s == 0:
                # this tile is linear for every later chunk's queries
                b_s, b_z, ref = _join_state(b_s, b_z, ref, b_fk, b_v, s, lo + BT - 1, lam)
        b_num = b_gamma * b_acc + b_lin
        # padded query rows have a zero normalizer: give them 1 so nothing divides by 0
        b_den = tl.where(m_t, b_gamma * b_l + b_lin_den, 1.0)
        tl.store(o + row_q[:, None] * V + o_v[None, :], b_num / b_den[:, None], mask=m_t[:, None] & m_v[None, :])
        # every value tile computes the same row statistics; the first one writes them
        if i_v == 0:
            tl.store(den + row_q, b_den, mask=m_t)
            tl.store(row_max + row_q, b_m, mask=m_t)
            tl.store(row_arg + row_q, b_arg, mask=m_t)


def _final_state(k_all, v_all, fk_all, kv0, window_size, sink_tokens=0, decay=None, new_tokens=0):
    """State after the last key: the sinks and the last W keys stay cached; the keys between join kv.
    k_all `[B, L, H_kv, D]`, v_all `[B, L, H_kv, V]`, fk_all `[B, L, H, F]`, kv0 `[B, H, F, V + 1]`. With a
    decay γ every kv term is decayed to the last key, as in naive.final_state (kv0 through `new_tokens`)."""
    batch, num_keys, kv_heads, _ = k_all.shape
    heads, feat = fk_all.shape[2], fk_all.shape[3]
    sinks, old_end = cache_split(num_keys, window_size, sink_tokens)
    num_old = old_end - sinks
    fk_old = fk_all[:, sinks:old_end].float()
    if decay is not None:
        ages = num_keys - 1 - torch.arange(sinks, old_end, device=fk_old.device)  # [n]
        powers = decay_powers(decay, ages)  # [n], or [H, n] per head
        powers = powers.t()[..., None] if powers.dim() == 2 else powers[:, None, None]  # [n, H or 1, 1]
        fk_old = fk_old * powers  # [B, n, H, F]
        kv0 = kv0 * decay_factor(decay, new_tokens, 2)
    fk_old = fk_old.view(batch, num_old, kv_heads, heads // kv_heads, feat)  # [B, n, Hkv, G, F]
    v_old = v_all[:, sinks:old_end].float()
    v1_old = torch.cat([v_old, torch.ones_like(v_old[..., :1])], dim=-1)  # [B, n, H_kv, V + 1]
    added = torch.einsum("bnkgf,bnkv->bkgfv", fk_old, v1_old).flatten(1, 2)  # [B, H, F, V + 1]

    def cached(t):  # [B, L, H_x, ·] → fp32 [B, H_x, C, ·]
        kept = torch.cat([t[:, :sinks], t[:, old_end:]], dim=1) if sinks else t[:, old_end:]
        return kept.float().transpose(1, 2).clone()

    return WindowLinearState(kv=kv0 + added, k=cached(k_all), v=cached(v_all), fk=cached(fk_all))




@triton.jit
def _window_linear_bwd_q_kernel(
    q, k, v, fq, fk, gamma, kv0, do, den, row_max, delta, dq, dfq, dlog, scale, lams, T, P, W, NS,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, F: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
):
    """Query side, forward order: dq = scale · Σ_win w·dw k, dfq = Σ_lin dw fk + S dN + z dD, and the
    per-row Σ_win w·dw (the window_logit gradient before the sigmoid factor). One value tile (BV ≥ V)."""
    i_bh = tl.program_id(0)
    i_b = i_bh // H
    i_h = i_bh % H
    i_hk = i_h // (H // HKV)
    L = P + T
    o_t = tl.arange(0, BT)
    o_d = tl.arange(0, BD)
    o_f = tl.arange(0, BF)
    o_v = tl.arange(0, BV)
    m_d = o_d < D
    m_f = o_f < F
    m_v = o_v < V
    b_gamma = tl.load(gamma + i_h)
    lam = tl.load(lams + i_h)  # this head's −log2 γ per token (0: no decay)
    b_s = tl.zeros([BF, BV], dtype=tl.float32)
    b_z = tl.zeros([BF], dtype=tl.float32)
    if USE_INITIAL_STATE:
        p_kv0 = kv0 + i_bh * F * (V + 1) + o_f[:, None] * (V + 1)  # [BF, 1]
        b_s += tl.load(p_kv0 + o_v[None, :], mask=m_f[:, None] & m_v[None, :], other=0.0)
        b_z += tl.load(kv0 + i_bh * F * (V + 1) + o_f * (V + 1) + V, mask=m_f, other=0.0)
    ref = P - 1  # as in the forward kernel
    for i_t in range(0, tl.cdiv(T, BT)):
        t = i_t * BT + o_t
        m_t = t < T
        pos_q = P + t
        row_q = (i_b * T + t) * H + i_h
        b_q = tl.load(q + row_q[:, None] * D + o_d[None, :], mask=m_t[:, None] & m_d[None, :], other=0.0)
        b_q = b_q.to(tl.float32) * scale  # [BT, BD]
        b_fq = tl.load(fq + row_q[:, None] * F + o_f[None, :], mask=m_t[:, None] & m_f[None, :], other=0.0)
        b_fq = b_fq.to(tl.float32)  # [BT, BF]
        b_do = tl.load(do + row_q[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
        b_den = tl.load(den + row_q, mask=m_t, other=1.0)
        b_c = tl.load(row_max + row_q, mask=m_t, other=0.0)
        b_dn = b_do / b_den[:, None]  # [BT, BV] gradient of the numerator
        b_dd = -tl.load(delta + row_q, mask=m_t, other=0.0) / b_den  # [BT] gradient of the normalizer
        b_age = tl.exp2(-lam * (pos_q - ref).to(tl.float32))  # [BT]
        b_dfq = (tl.dot(b_dn, tl.trans(b_s)) + b_dd[:, None] * b_z[None, :]) * b_age[:, None]  # [BT, BF]
        b_dq = tl.zeros([BT, BD], dtype=tl.float32)
        b_dlog = tl.zeros([BT], dtype=tl.float32)
        lo = P + i_t * BT - W
        n_early = tl.maximum(tl.minimum(NS, lo), 0)  # sinks before the window walk (softmax only)
        for i_s in range(0, tl.cdiv(n_early, BT)):
            s = i_s * BT + o_t
            m_s = s < n_early
            row_k = (i_b * L + s) * HKV + i_hk
            b_k = tl.load(k + row_k[:, None] * D + o_d[None, :], mask=m_s[:, None] & m_d[None, :], other=0.0)
            b_v = tl.load(v + row_k[:, None] * V + o_v[None, :], mask=m_s[:, None] & m_v[None, :], other=0.0)
            b_k = b_k.to(tl.float32)
            b_v = b_v.to(tl.float32)
            b_score = tl.dot(b_q, tl.trans(b_k)) - b_c[:, None]  # ≤ 0 on sink entries
            b_w = tl.where(m_t[:, None] & m_s[None, :], b_gamma * tl.exp(tl.minimum(b_score, 0.0)), 0.0)  # [BT, BT]
            b_dscore = b_w * (tl.dot(b_dn, tl.trans(b_v)) + b_dd[:, None])
            b_dq += tl.dot(b_dscore, b_k)
            b_dlog += tl.sum(b_dscore, axis=1)
        for i_s in range(0, tl.cdiv(W + BT, BT)):
            s = lo + i_s * BT + o_t
            m_s = (s >= 0) & (s < L)
            row_k = (i_b * L + s) * HKV + i_hk
            row_fk = (i_b * L + s) * H + i_h
            b_k = tl.load(k + row_k[:, None] * D + o_d[None, :], mask=m_s[:, None] & m_d[None, :], other=0.0)
            b_fk = tl.load(fk + row_fk[:, None] * F + o_f[None, :], mask=m_s[:, None] & m_f[None, :], other=0.0)
            b_v = tl.load(v + row_k[:, None] * V + o_v[None, :], mask=m_s[:, None] & m_v[None, :], other=0.0)
            b_k = b_k.to(tl.float32)
            b_fk = b_fk.to(tl.float32)
            b_v = b_v.to(tl.float32)
            dist = pos_q[:, None] - s[None, :]  # [BT, BT]
            valid = m_t[:, None] & m_s[None, :]
            in_window = valid & (dist >= 0) & ((dist < W) | (s < NS))
            is_linear = valid & (dist >= W) & (s >= NS)
            b_score = tl.dot(b_q, tl.trans(b_k)) - b_c[:, None]  # ≤ 0 on window entries
            b_w = tl.where(in_window, b_gamma * tl.exp(tl.minimum(b_score, 0.0)), 0.0)  # [BT, BT]
            b_dw = tl.dot(b_dn, tl.trans(b_v)) + b_dd[:, None]  # [BT, BT]
            b_dscore = b_w * b_dw
            b_dq += tl.dot(b_dscore, b_k)
            b_dlog += tl.sum(b_dscore, axis=1)
            b_decay = tl.exp2(-lam * tl.maximum(dist, 0).to(tl.float32))  # [BT, BT]
            b_dfq += tl.dot(tl.where(is_linear, b_dw * b_decay, 0.0), b_fk)
            if i_s == 0:
                b_s, b_z, ref = _join_state(b_s, b_z, ref, b_fk, b_v, s, lo + BT - 1, lam)
        tl.store(dq + row_q[:, None] * D + o_d[None, :], b_dq * scale, mask=m_t[:, None] & m_d[None, :])
        tl.store(dfq + row_q[:, None] * F + o_f[None, :], b_dfq, mask=m_t[:, None] & m_f[None, :])
        tl.store(dlog + row_q, b_dlog, mask=m_t)


@triton.jit
def _window_linear_bwd_kv_kernel(
    q, k, v, fq, fk, gamma, do, den, row_max, delta, dk, dv, dfk, scale, lams, T, P, W, NS,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, F: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr,
):
    """Key side, key tiles in reverse order. Query tiles starting at the key tile and covering W + BT
    positions are visited explicitly; later queries are all linear for these keys and arrive through
    R = Σ fq_tᵀ dN_t, r = Σ fq_t dD_t, to which each key tile adds its last query tile before moving on.
    With a half-life R is kept decayed to the first query position it holds, and a key reads it times
    2^(−λ(that position − s)). Writes per-query-head dk, dv (the wrapper sums GQA groups) and dfk. One value tile (BV ≥ V)."""
    i_bh = tl.program_id(0)
    i_b = i_bh // H
    i_h = i_bh % H
    i_hk = i_h // (H // HKV)
    L = P + T
    o_t = tl.arange(0, BT)
    o_d = tl.arange(0, BD)
    o_f = tl.arange(0, BF)
    o_v = tl.arange(0, BV)
    m_d = o_d < D
    m_f = o_f < F
    m_v = o_v < V
    b_gamma = tl.load(gamma + i_h)
    lam = tl.load(lams + i_h)  # this head's −log2 γ per token (0: no decay)
    b_r = tl.zeros([BF, BV], dtype=tl.float32)
    b_rz = tl.zeros([BF], dtype=tl.float32)
    num_q_tiles = tl.cdiv(W + BT, BT)
    num_k_tiles = tl.cdiv(L, BT)
    for i_r in range(0, num_k_tiles):
        i_k = num_k_tiles - 1 - i_r
        s = i_k * BT + o_t
        m_s = s < L
        row_k = (i_b * L + s) * HKV + i_hk
        row_fk = (i_b * L + s) * H + i_h
        b_k = tl.load(k + row_k[:, None] * D + o_d[None, :], mask=m_s[:, None] & m_d[None, :], other=0.0)
        b_fk = tl.load(fk + row_fk[:, None] * F + o_f[None, :], mask=m_s[:, None] & m_f[None, :], other=0.0)
        b_v = tl.load(v + row_k[:, None] * V + o_v[None, :], mask=m_s[:, None] & m_v[None, :], other=0.0)
        b_k = b_k.to(tl.float32)  # [BT, BD]
        b_fk = b_fk.to(tl.float32)  # [BT, BF]
        b_v = b_v.to(tl.float32)  # [BT, BV]
        # R holds the queries from position (i_k + num_q_tiles)·BT on, decayed to that position
        b_key_age = tl.exp2(-lam * ((i_k + num_q_tiles) * BT - s).to(tl.float32))  # [BT]
        b_dv = tl.dot(b_fk, b_r) * b_key_age[:, None]  # [BT, BV]
        b_dfk = (tl.dot(b_v, tl.trans(b_r)) + b_rz[None, :]) * b_key_age[:, None]  # [BT, BF]
        b_dk = tl.zeros([BT, BD], dtype=tl.float32)
        n_q = num_q_tiles
        if i_k * BT < NS:  # sinks here: softmax keys of every later query tile, not only the next W + BT
            n_q = tl.maximum(tl.cdiv(L - i_k * BT, BT), num_q_tiles)
        for i_q in range(0, n_q):
            pos_q = i_k * BT + i_q * BT + o_t
            t = pos_q - P
            m_q = (t >= 0) & (t < T)
            row_q = (i_b * T + t) * H + i_h
            b_q = tl.load(q + row_q[:, None] * D + o_d[None, :], mask=m_q[:, None] & m_d[None, :], other=0.0)
            b_q = b_q.to(tl.float32) * scale  # [BT, BD]
            b_fq = tl.load(fq + row_q[:, None] * F + o_f[None, :], mask=m_q[:, None] & m_f[None, :], other=0.0)
            b_fq = b_fq.to(tl.float32)  # [BT, BF]
            b_do = tl.load(do + row_q[:, None] * V + o_v[None, :], mask=m_q[:, None] & m_v[None, :], other=0.0)
            b_den = tl.load(den + row_q, mask=m_q, other=1.0)
            b_c = tl.load(row_max + row_q, mask=m_q, other=0.0)
            b_dn = b_do / b_den[:, None]  # [BT, BV]
            b_dd = -tl.load(delta + row_q, mask=m_q, other=0.0) / b_den  # [BT]
            dist = pos_q[:, None] - s[None, :]  # [BT(q), BT(s)]
            valid = m_q[:, None] & m_s[None, :]
            in_window = valid & (dist >= 0) & ((dist < W) | (s < NS))
            # beyond the first num_q_tiles, R already holds the linear part: only sinks are visited there
            is_linear = valid & (dist >= W) & (s >= NS) & (i_q < num_q_tiles)
            b_score = tl.dot(b_q, tl.trans(b_k)) - b_c[:, None]
            b_w = tl.where(in_window, b_gamma * tl.exp(tl.minimum(b_score, 0.0)), 0.0)  # [BT, BT]
            b_decay = tl.exp2(-lam * tl.maximum(dist, 0).to(tl.float32))  # [BT, BT]
            b_a = tl.where(is_linear, tl.dot(b_fq, tl.trans(b_fk)) * b_decay, 0.0)  # [BT, BT]
            b_dw = tl.dot(b_dn, tl.trans(b_v)) + b_dd[:, None]  # [BT, BT]
            b_dv += tl.dot(tl.trans(b_w + b_a), b_dn)
            b_dk += tl.dot(tl.trans(b_w * b_dw), b_q)
            b_dfk += tl.dot(tl.trans(tl.where(is_linear, b_dw * b_decay, 0.0)), b_fq)
            if i_q == num_q_tiles - 1:
                # this query tile joins R, whose reference moves back to the tile's first position
                b_q_age = tl.exp2(-lam * o_t.to(tl.float32))  # [BT]: pos_q − (i_k + num_q_tiles − 1)·BT
                b_shift = tl.exp2(-lam * BT)
                b_r = b_r * b_shift + tl.dot(tl.trans(b_fq * b_q_age[:, None]), b_dn)
                b_rz = b_rz * b_shift + tl.sum(b_fq * (b_dd * b_q_age)[:, None], axis=0)
        row_kq = (i_b * L + s) * H + i_h  # per-query-head gradient rows
        tl.store(dk + row_kq[:, None] * D + o_d[None, :], b_dk, mask=m_s[:, None] & m_d[None, :])
        tl.store(dv + row_kq[:, None] * V + o_v[None, :], b_dv, mask=m_s[:, None] & m_v[None, :])
        tl.store(dfk + row_fk[:, None] * F + o_f[None, :], b_dfk, mask=m_s[:, None] & m_f[None, :])


def _launch_dims(q, k_all, v_all, fq, chunk_size):
    batch, seq_len, heads, head_dim = q.shape
    dims = dict(H=heads, HKV=k_all.shape[2], D=head_dim, F=fq.shape[-1], V=v_all.shape[-1])
    blocks = dict(BT=block_t(chunk_size, MAX_BLOCK_T), BD=block_k(head_dim), BF=block_k(fq.shape[-1]))
    return batch, seq_len, heads, dims, blocks


def window_forward_fp32(
    q, k_all, v_all, fq, fk_all, gamma, kv0, scale, window_size, prefix, chunk_size, has_state, sink_tokens=0,
    lam=None,
):
    """Kernel launch on contiguous inputs (keys include the cached prefix) → fp32 o `[B, T, H, V]`,
    normalizer and window max `[B, T, H]`. lam `[H]`: −log2 γ per token of each head (None: no decay)."""
    batch, seq_len, heads, dims, blocks = _launch_dims(q, k_all, v_all, fq, chunk_size)
    if lam is None:  # no decay: every factor 2^0
        lam = torch.zeros(heads, device=q.device)
    value_dim = dims["V"]
    o = new_output((batch, seq_len, heads, value_dim), q.device)
    den = new_output((batch, seq_len, heads), q.device)
    row_max = new_output((batch, seq_len, heads), q.device)
    row_arg = torch.zeros((batch, seq_len, heads), dtype=torch.int32, device=q.device)
    bv = block_v(value_dim)
    _window_linear_fwd_kernel[(triton.cdiv(value_dim, bv), batch * heads)](
        q, k_all, v_all, fq, fk_all, gamma, kv0, o, den, row_max, row_arg, scale, lam, seq_len, prefix, window_size,
        sink_tokens, **dims, **blocks, BV=bv, USE_INITIAL_STATE=has_state,
    )
    return o, den, row_max, row_arg


def _group_sum(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Per-query-head gradients `[B, L, H, D]` → per-kv-head `[B, L, H_kv, D]`."""
    batch, num_keys, heads, width = x.shape
    return x.view(batch, num_keys, kv_heads, heads // kv_heads, width).sum(3)  # [B, L, H_kv, D]


def _add_row_max_gradient(q, k_all, row_arg, d_max, scale, dq, dk):
    """c_t = scale · q_t·k_{arg_t}: add its gradient d_max `[B, T, H]` (= −Σ_win w·dw) to dq and to the
    per-query-head dk `[B, L, H, D]` in place."""
    batch, seq_len, heads, _ = q.shape
    group = heads // k_all.shape[2]
    b_idx = torch.arange(batch, device=q.device).view(batch, 1, 1).expand_as(row_arg)  # [B, T, H]
    h_idx = torch.arange(heads, device=q.device).view(1, 1, heads).expand_as(row_arg)  # [B, T, H]
    arg = row_arg.long()
    k_max = k_all[b_idx, arg, h_idx // group].float()  # [B, T, H, D]
    dq += scale * d_max.unsqueeze(-1) * k_max
    dk.index_put_((b_idx, arg, h_idx), scale * d_max.unsqueeze(-1) * q.float(), accumulate=True)


class _WindowCore(torch.autograd.Function):
    """Fused hybrid attention over `P + T` keys (prefix included) → fp32 o; Triton both ways."""

    @staticmethod
    def forward(
        ctx, q, k_all, v_all, fq, fk_all, window_logit, kv0, scale, window_size, chunk_size, has_state, sink_tokens,
        lam,
    ):
        q, k_all, v_all, fq, fk_all, kv0 = (contiguous(x) for x in (q, k_all, v_all, fq, fk_all, kv0))
        gamma = torch.sigmoid(window_logit.float()).contiguous()  # [H]
        prefix = k_all.shape[1] - q.shape[1]
        o, den, row_max, row_arg = window_forward_fp32(
            q, k_all, v_all, fq, fk_all, gamma, kv0, scale, window_size, prefix, chunk_size, has_state, sink_tokens,
            lam,
        )
        ctx.save_for_backward(q, k_all, v_all, fq, fk_all, gamma, kv0, o, den, row_max, row_arg)
        ctx.config = (scale, window_size, prefix, chunk_size, has_state, sink_tokens, lam)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k_all, v_all, fq, fk_all, gamma, kv0, o, den, row_max, row_arg = ctx.saved_tensors
        scale, window_size, prefix, chunk_size, has_state, sink_tokens, lam = ctx.config
        batch, seq_len, heads, dims, blocks = _launch_dims(q, k_all, v_all, fq, chunk_size)
        num_keys = k_all.shape[1]
        do = do.float().contiguous()
        delta = (do * o).sum(-1).contiguous()  # [B, T, H]: do_t · o_t
        dq = new_output(q.shape, q.device)
        dfq = new_output(fq.shape, q.device)
        dlog = new_output((batch, seq_len, heads), q.device)
        dk = new_output((batch, num_keys, heads, dims["D"]), q.device)
        dv = new_output((batch, num_keys, heads, dims["V"]), q.device)
        dfk = new_output(fk_all.shape, q.device)
        bv = max(MIN_BLOCK_V, triton.next_power_of_2(dims["V"]))  # one value tile: dw needs all of do·v
        common = (scale, lam, seq_len, prefix, window_size, sink_tokens)
        _window_linear_bwd_q_kernel[(batch * heads,)](
            q, k_all, v_all, fq, fk_all, gamma, kv0, do, den, row_max, delta, dq, dfq, dlog, *common,
            **dims, **blocks, BV=bv, USE_INITIAL_STATE=has_state,
        )
        _window_linear_bwd_kv_kernel[(batch * heads,)](
            q, k_all, v_all, fq, fk_all, gamma, do, den, row_max, delta, dk, dv, dfk, *common,
            **dims, **blocks, BV=bv,
        )
        _add_row_max_gradient(q, k_all, row_arg, -dlog, scale, dq, dk)
        dlogit = (1.0 - gamma) * dlog.sum((0, 1))  # [H]: d sigmoid / d logit = γ(1 − γ), γ cancels in w/γ
        dkv0 = None
        if has_state:
            dn_dd = torch.cat([do, -delta.unsqueeze(-1)], dim=-1) / den.unsqueeze(-1)  # [B, T, H, V + 1]
            # query t reads kv0 decayed by t + 1 more tokens (2^(−λ_h(t + 1)); 1 without a half-life)
            steps = torch.arange(1, seq_len + 1, device=q.device, dtype=torch.float32)
            ages = torch.exp2(-steps[:, None] * lam[None, :])  # [T, H]
            dkv0 = torch.einsum("bthf,bthv->bhfv", fq.float() * ages[..., None], dn_dd)  # [B, H, F, V + 1]
        kv_heads = k_all.shape[2]
        return (
            dq.to(q.dtype), _group_sum(dk, kv_heads).to(k_all.dtype), _group_sum(dv, kv_heads).to(v_all.dtype),
            dfq.to(fq.dtype), dfk.to(fk_all.dtype), dlogit, dkv0, None, None, None, None, None, None,
        )


def window_linear_attn_triton(
    q, k, v, fq, fk, window_logit, *, window_size=64, scale=None, initial_state=None,
    output_final_state=False, chunk_size=64, sink_tokens=0, linear_half_life=None,
):
    """Hybrid sliding-window softmax + linear attention (and `sink_tokens` sinks), Triton forward and
    backward; q `[B, T, H, D]`, k `[B, T, H_kv, D]`, v `[B, T, H_kv, V]`, fq, fk `[B, T, H, F]`, window_logit
    `[H]` → (o `[B, T, H, V]` in v.dtype, `WindowLinearState` or None). `chunk_size` sets the query/key tile
    (rounded down to a power of two in [16, 64]); the result does not depend on it. `linear_half_life`: the
    decayed linear branch (naive.py)."""
    _check_inputs(q, k, v, fq, fk, window_logit, window_size, sink_tokens)
    if isinstance(linear_half_life, torch.Tensor) and linear_half_life.requires_grad:
        raise ValueError("a linear_half_life that needs its gradient (learned) has no Triton backward: use "
                         "backend='torch' (or 'auto')")
    decay = linear_decay(linear_half_life)
    heads = q.shape[2]
    if decay is None:
        lam = torch.zeros(heads, device=q.device)  # [H]
    elif isinstance(decay, torch.Tensor):
        lam = (-torch.log2(decay)).to(q.device).contiguous()  # [H]: −log2 γ per token
    else:
        lam = torch.full((heads,), -math.log2(decay), device=q.device)  # [H]
    has_state = initial_state is not None
    state = _initial_state(q, k, v, fq, initial_state, window_size, sink_tokens)
    if has_state:
        # the caller's tensors (not fp32 copies), so gradients reach them through the concatenation
        state = WindowLinearState(*initial_state)
        k_all = torch.cat([state.k.transpose(1, 2).to(k.dtype), k], dim=1)  # [B, P + T, H_kv, D]
        v_all = torch.cat([state.v.transpose(1, 2).to(v.dtype), v], dim=1)  # [B, P + T, H_kv, V]
        fk_all = torch.cat([state.fk.transpose(1, 2).to(fk.dtype), fk], dim=1)  # [B, P + T, H, F]
    else:
        k_all, v_all, fk_all = k, v, fk
    fk_all = zero_sink_features(fk_all, sink_tokens, dim=1)  # [B, P + T, H, F]: sinks are never linear
    scale = float(scale if scale is not None else q.shape[-1] ** -0.5)
    kv0 = state.kv.float()
    o = _WindowCore.apply(
        q, k_all, v_all, fq, fk_all, window_logit, kv0, scale, window_size, chunk_size, has_state, sink_tokens, lam
    )
    final = (_final_state(k_all, v_all, fk_all, kv0, window_size, sink_tokens, decay, q.shape[1])
             if output_final_state else None)
    return o.to(v.dtype), final
