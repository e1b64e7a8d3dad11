"""Triton fused LoLCATs hybrid attention (sliding-window softmax + linear attention over older keys):
`window_linear_attn_triton`, same contract as `naive.chunk_window_linear_attn_torch` (math, shapes and
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
GQA by indexing: k, v by kv head `h // group`; q, fq, fk by query head.
Backward: torch recompute of the chunk form (see `_triton_utils`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton_utils import apply_with_torch_backward, block_k, block_t, block_v, contiguous, new_output
from .naive import WindowLinearState, _check_inputs, _initial_state, chunk_window_linear_attn_torch

# Time tile cap for queries and keys: [BT, BT] score tiles beside [BT, BD] / [BT, BF] operands.
MAX_BLOCK_T = 64
# Running-max start: finite so a row with no window key yet rescales by exp(0), not exp(-inf + inf).
NEG_LARGE = tl.constexpr(-1.0e30)


@triton.jit
def _window_linear_fwd_kernel(
    q, k, v, fq, fk, gamma, kv0, o, scale, T, P, W,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, F: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
):
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
    b_s = tl.zeros([BF, BV], dtype=tl.float32)
    b_z = tl.zeros([BF], dtype=tl.float32)
    if USE_INITIAL_STATE:
        # kv0 is [B, H, F, V + 1]: value columns, then the key sum z
        p_kv0 = kv0 + i_bh * F * (V + 1) + o_f[:, None] * (V + 1)  # [BF, 1]
        b_s += tl.load(p_kv0 + o_v[None, :], mask=m_f[:, None] & m_v[None, :], other=0.0)
        b_z += tl.load(kv0 + i_bh * F * (V + 1) + o_f * (V + 1) + V, mask=m_f, other=0.0)
    for i_t in range(0, tl.cdiv(T, BT)):
        t = i_t * BT + o_t  # query index
        m_t = t < T
        pos_q = P + t  # key position of each query
        row_q = (i_b * T + t) * H + i_h
        b_q = tl.load(q + row_q[:, None] * D + o_d[None, :], mask=m_t[:, None] & m_d[None, :], other=0.0)
        b_q = b_q.to(tl.float32) * scale  # [BT, BD]
        b_fq = tl.load(fq + row_q[:, None] * F + o_f[None, :], mask=m_t[:, None] & m_f[None, :], other=0.0)
        b_fq = b_fq.to(tl.float32)  # [BT, BF]
        # older keys, through the linear state
        b_lin = tl.dot(b_fq, b_s)  # [BT, BV]
        b_lin_den = tl.sum(b_fq * b_z[None, :], axis=1)  # [BT]
        b_m = tl.full([BT], NEG_LARGE, dtype=tl.float32)
        b_l = tl.zeros([BT], dtype=tl.float32)
        b_acc = tl.zeros([BT, BV], dtype=tl.float32)
        lo = P + i_t * BT - W
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
            in_window = valid & (dist >= 0) & (dist < W)
            is_linear = valid & (dist >= W)
            b_a_lin = tl.where(is_linear, tl.dot(b_fq, tl.trans(b_fk)), 0.0)  # [BT, BT]
            b_lin += tl.dot(b_a_lin, b_v)
            b_lin_den += tl.sum(b_a_lin, axis=1)
            b_score = tl.where(in_window, tl.dot(b_q, tl.trans(b_k)), float("-inf"))  # [BT, BT]
            b_m_new = tl.maximum(b_m, tl.max(b_score, axis=1))
            b_alpha = tl.exp(b_m - b_m_new)
            b_p = tl.exp(b_score - b_m_new[:, None])  # [BT, BT]
            b_l = b_l * b_alpha + tl.sum(b_p, axis=1)
            b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p, b_v)
            b_m = b_m_new
            if i_s == 0:
                # this tile is linear for every later chunk's queries
                b_s += tl.dot(tl.trans(b_fk), b_v)
                b_z += tl.sum(b_fk, axis=0)
        b_num = b_gamma * b_acc + b_lin
        # padded query rows have a zero normalizer: give them 1 so nothing divides by 0
        b_den = tl.where(m_t, b_gamma * b_l + b_lin_den, 1.0)
        tl.store(o + row_q[:, None] * V + o_v[None, :], b_num / b_den[:, None], mask=m_t[:, None] & m_v[None, :])


def _final_state(k_all, v_all, fk_all, kv0, window_size):
    """State after the last key: keys older than the last W join kv; the last W' stay cached.
    k_all `[B, L, H_kv, D]`, v_all `[B, L, H_kv, V]`, fk_all `[B, L, H, F]`, kv0 `[B, H, F, V + 1]`."""
    batch, num_keys, kv_heads, _ = k_all.shape
    heads, feat = fk_all.shape[2], fk_all.shape[3]
    num_old = max(num_keys - window_size, 0)
    fk_old = fk_all[:, :num_old].float().view(batch, num_old, kv_heads, heads // kv_heads, feat)  # [B, n, Hkv, G, F]
    v_old = v_all[:, :num_old].float()
    v1_old = torch.cat([v_old, torch.ones_like(v_old[..., :1])], dim=-1)  # [B, n, H_kv, V + 1]
    added = torch.einsum("bnkgf,bnkv->bkgfv", fk_old, v1_old).flatten(1, 2)  # [B, H, F, V + 1]
    return WindowLinearState(
        kv=kv0 + added,
        k=k_all[:, num_old:].float().transpose(1, 2).clone(),  # [B, H_kv, W', D]
        v=v_all[:, num_old:].float().transpose(1, 2).clone(),  # [B, H_kv, W', V]
        fk=fk_all[:, num_old:].float().transpose(1, 2).clone(),  # [B, H, W', F]
    )


def _forward(q, k, v, fq, fk, window_logit, kv0, cache_k, cache_v, cache_fk, *, window_size, scale,
             output_final_state, chunk_size, has_state):
    """Triton forward; returns `(o, *final_state)` flat (four Nones without a final state)."""
    state = WindowLinearState(kv0, cache_k, cache_v, cache_fk)
    if has_state:
        k_all = torch.cat([cache_k.transpose(1, 2).to(k.dtype), k], dim=1)  # [B, P + T, H_kv, D]
        v_all = torch.cat([cache_v.transpose(1, 2).to(v.dtype), v], dim=1)  # [B, P + T, H_kv, V]
        fk_all = torch.cat([cache_fk.transpose(1, 2).to(fk.dtype), fk], dim=1)  # [B, P + T, H, F]
    else:
        k_all, v_all, fk_all = k, v, fk
    q, fq, k_all, v_all, fk_all = (contiguous(x) for x in (q, fq, k_all, v_all, fk_all))
    batch, seq_len, heads, head_dim = q.shape
    kv_heads, value_dim, feat = k.shape[2], v.shape[-1], fq.shape[-1]
    o = new_output((batch, seq_len, heads, value_dim), q.device)
    gamma = torch.sigmoid(window_logit.float()).contiguous()  # [H]
    bv = block_v(value_dim)
    grid = (triton.cdiv(value_dim, bv), batch * heads)
    _window_linear_fwd_kernel[grid](
        q, k_all, v_all, fq, fk_all, gamma, contiguous(state.kv.float()), o,
        float(scale if scale is not None else head_dim ** -0.5), seq_len, cache_k.shape[2], window_size,
        H=heads, HKV=kv_heads, D=head_dim, F=feat, V=value_dim,
        BT=block_t(chunk_size, MAX_BLOCK_T), BD=block_k(head_dim), BF=block_k(feat), BV=bv,
        USE_INITIAL_STATE=has_state,
    )
    final = _final_state(k_all, v_all, fk_all, state.kv, window_size) if output_final_state else (None,) * 4
    return (o.to(v.dtype), *final)


def _reference(q, k, v, fq, fk, window_logit, kv0, cache_k, cache_v, cache_fk, *, window_size, scale,
               output_final_state, chunk_size, has_state):
    """The torch chunk form with the same flat inputs and outputs as `_forward`."""
    state = WindowLinearState(kv0, cache_k, cache_v, cache_fk) if has_state else None
    o, final = chunk_window_linear_attn_torch(
        q, k, v, fq, fk, window_logit, window_size=window_size, scale=scale, initial_state=state,
        output_final_state=output_final_state, chunk_size=chunk_size,
    )
    return (o, *(final if final is not None else (None,) * 4))


def window_linear_attn_triton(
    q, k, v, fq, fk, window_logit, *, window_size=64, scale=None, initial_state=None,
    output_final_state=False, chunk_size=64,
):
    """Hybrid sliding-window softmax + linear attention, Triton forward; q `[B, T, H, D]`,
    k `[B, T, H_kv, D]`, v `[B, T, H_kv, V]`, fq, fk `[B, T, H, F]`, window_logit `[H]` →
    (o `[B, T, H, V]` in v.dtype, `WindowLinearState` or None). `chunk_size` sets the query/key tile
    (rounded down to a power of two in [16, 64]); the result does not depend on it."""
    _check_inputs(q, k, v, fq, fk, window_logit, window_size)
    has_state = initial_state is not None
    state = _initial_state(q, k, v, fq, initial_state, window_size)
    if has_state:
        # keep the caller's tensors (not fp32 copies) so gradients reach them
        state = WindowLinearState(*initial_state)
    kwargs = dict(
        window_size=window_size, scale=scale, output_final_state=output_final_state,
        chunk_size=chunk_size, has_state=has_state,
    )
    o, *final = apply_with_torch_backward(_forward, _reference, kwargs, q, k, v, fq, fk, window_logit, *state)
    return o, (WindowLinearState(*final) if output_final_state else None)
