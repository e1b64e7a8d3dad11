"""Pure-PyTorch causal linear attention in three forms with one signature: `parallel_linear_attn`
(quadratic, masked), `chunk_linear_attn_torch` (chunked, the CPU training path) and
`recurrent_linear_attn` (token by token: the decoding step and an oracle).

Shapes: q `[B, T, H, K]`; k `[B, T, H_kv, K]`; v `[B, T, H_kv, V]` with `H % H_kv == 0` (query head h
reads kv head `h // (H // H_kv)`). Returns `(o [B, T, H, V] in v.dtype, final_state or None)`.

- unnormalized: `o_t = scale · Σ_{s≤t} (q_t·k_s) v_s`, scale defaults to `K^-0.5`;
  state `S = Σ k_s v_sᵀ`, `[B, H, K, V]`.
- normalized: `o_t = Σ (q_t·k_s) v_s / (Σ q_t·k_s + eps)`; scale is ignored (it would cancel);
  state `[B, H, K, V + 1]` whose last column is the key sum `z = Σ k_s`.
Everything is computed in fp32; states are fp32.
"""
from __future__ import annotations

import torch

from .._common import (
    NORMALIZE_EPS,
    append_ones,
    check_chunk_size,
    check_heads,
    check_same_tokens,
    heads_first_fp32,
    pad_time,
)


def prepare_linear_inputs(q, k, v, scale, normalize, initial_state):
    """fp32 heads-first q (already scaled), k, v (ones column appended when normalized) and state S0."""
    check_same_tokens(q=q, k=k, v=v)
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k has {k.shape[2]} heads but v has {v.shape[2]}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k feature widths differ: {q.shape[-1]} vs {k.shape[-1]}")
    num_heads = q.shape[2]
    check_heads(num_heads, k.shape[2])
    qh = heads_first_fp32(q, num_heads)  # [B, H, T, K]
    kh = heads_first_fp32(k, num_heads)  # [B, H, T, K]
    vh = heads_first_fp32(v, num_heads)  # [B, H, T, V]
    if normalize:
        vh = append_ones(vh)  # [B, H, T, V + 1]
    else:
        qh = qh * (scale if scale is not None else q.shape[-1] ** -0.5)
    batch, _, _, key_dim = qh.shape
    state_shape = (batch, num_heads, key_dim, vh.shape[-1])
    if initial_state is None:
        s0 = qh.new_zeros(state_shape)
    else:
        if tuple(initial_state.shape) != state_shape:
            raise ValueError(f"initial_state must have shape {state_shape}, got {tuple(initial_state.shape)}")
        s0 = initial_state.float()
    return qh, kh, vh, s0


def finish_linear_output(out, normalize, dtype):
    """Heads-first fp32 `[B, H, T, V(+1)]` → `[B, T, H, V]` in `dtype`, dividing by the normalizer."""
    if normalize:
        out = out[..., :-1] / (out[..., -1:] + NORMALIZE_EPS)  # [B, H, T, V]
    return out.transpose(1, 2).to(dtype)  # [B, T, H, V]


def parallel_linear_attn(
    q, k, v, *, scale=None, normalize=True, initial_state=None, output_final_state=False, chunk_size=None
):
    """Quadratic masked form: `A = tril(q kᵀ)`, `o = A v + q S0`. `chunk_size` is accepted and ignored."""
    qh, kh, vh, s0 = prepare_linear_inputs(q, k, v, scale, normalize, initial_state)
    seq_len = qh.shape[2]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=qh.device).tril()
    scores = (qh @ kh.transpose(-1, -2)).masked_fill(~causal, 0.0)  # [B, H, T, T]
    out = scores @ vh + qh @ s0  # [B, H, T, V(+1)]
    final = s0 + kh.transpose(-1, -2) @ vh if output_final_state else None  # [B, H, K, V(+1)]
    return finish_linear_output(out, normalize, v.dtype), final


def chunk_linear_attn_torch(
    q, k, v, *, scale=None, normalize=True, initial_state=None, output_final_state=False, chunk_size=64
):
    """Chunked form: within a chunk of `chunk_size` tokens a masked quadratic product, across chunks the
    state `S_n = S0 + Σ_{m<n} K_mᵀ V_m` (an exclusive cumulative sum, no Python loop over chunks)."""
    check_chunk_size(chunk_size)
    qh, kh, vh, s0 = prepare_linear_inputs(q, k, v, scale, normalize, initial_state)
    batch, heads, seq_len, key_dim = qh.shape
    # zero padding at the end adds nothing to the state and only produces trimmed outputs
    qc = pad_time(qh, chunk_size).unflatten(2, (-1, chunk_size))  # [B, H, N, C, K]
    kc = pad_time(kh, chunk_size).unflatten(2, (-1, chunk_size))  # [B, H, N, C, K]
    vc = pad_time(vh, chunk_size).unflatten(2, (-1, chunk_size))  # [B, H, N, C, V(+1)]
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=qh.device).tril()
    intra = (qc @ kc.transpose(-1, -2)).masked_fill(~causal, 0.0) @ vc  # [B, H, N, C, V(+1)]
    chunk_kv = kc.transpose(-1, -2) @ vc  # [B, H, N, K, V(+1)]
    inclusive = chunk_kv.cumsum(dim=2)  # [B, H, N, K, V(+1)]
    states = s0.unsqueeze(2) + inclusive - chunk_kv  # [B, H, N, K, V(+1)] state entering each chunk
    out = intra + qc @ states  # [B, H, N, C, V(+1)]
    out = out.flatten(2, 3)[:, :, :seq_len]  # [B, H, T, V(+1)]
    final = s0 + inclusive[:, :, -1] if output_final_state else None  # [B, H, K, V(+1)]
    return finish_linear_output(out, normalize, v.dtype), final


def recurrent_linear_attn(
    q, k, v, *, scale=None, normalize=True, initial_state=None, output_final_state=False, chunk_size=None
):
    """Token-by-token form `S_t = S_{t-1} + k_t v_tᵀ`, `o_t = q_tᵀ S_t`; a `T = 1` call is one step."""
    qh, kh, vh, state = prepare_linear_inputs(q, k, v, scale, normalize, initial_state)
    outputs = []
    for t in range(qh.shape[2]):
        state = state + kh[:, :, t, :, None] * vh[:, :, t, None, :]  # [B, H, K, V(+1)]
        outputs.append((qh[:, :, t, None, :] @ state).squeeze(-2))  # [B, H, V(+1)]
    out = torch.stack(outputs, dim=2)  # [B, H, T, V(+1)]
    return finish_linear_output(out, normalize, v.dtype), (state if output_final_state else None)
