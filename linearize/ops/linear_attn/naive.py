"""Pure-PyTorch causal linear attention, the obvious forms (the oracles of the tuned ones):
`parallel_linear_attn` (quadratic, masked; `linear_attn_weights` gives its weights) and
`recurrent_linear_attn` (token by token: also the decoding step). The tuned CPU path,
`chunk.chunk_linear_attn_torch`, and the Triton kernel have the same signature.

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
    check_heads,
    check_same_tokens,
    heads_first_fp32,
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


def causal_scores(qh: torch.Tensor, kh: torch.Tensor) -> torch.Tensor:
    """`tril(q kᵀ)`: heads-first `[B, H, T, K]` q and k → `[B, H, T, T]`."""
    seq_len = qh.shape[2]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=qh.device).tril()
    return (qh @ kh.transpose(-1, -2)).masked_fill(~causal, 0.0)  # [B, H, T, T]


def linear_attn_weights(q, k, *, scale=None, normalize=True):
    """The parallel form's attention weights `[B, H, T, T]` on a fresh sequence (`o = A v`), fp32:
    normalized, `tril(q kᵀ)` with each row divided by its sum (+ eps, as the output is); unnormalized,
    `scale · tril(q kᵀ)`. q `[B, T, H, K]`, k `[B, T, H_kv, K]`."""
    check_same_tokens(q=q, k=k)
    qh = heads_first_fp32(q, q.shape[2])  # [B, H, T, K]
    kh = heads_first_fp32(k, q.shape[2])  # [B, H, T, K]
    scores = causal_scores(qh, kh)  # [B, H, T, T]
    if normalize:
        return scores / (scores.sum(-1, keepdim=True) + NORMALIZE_EPS)
    return scores * (scale if scale is not None else q.shape[-1] ** -0.5)


def parallel_linear_attn(
    q, k, v, *, scale=None, normalize=True, initial_state=None, output_final_state=False, chunk_size=None
):
    """Quadratic masked form: `A = tril(q kᵀ)`, `o = A v + q S0`. `chunk_size` is accepted and ignored."""
    qh, kh, vh, s0 = prepare_linear_inputs(q, k, v, scale, normalize, initial_state)
    scores = causal_scores(qh, kh)  # [B, H, T, T]
    out = scores @ vh + qh @ s0  # [B, H, T, V(+1)]
    final = s0 + kh.transpose(-1, -2) @ vh if output_final_state else None  # [B, H, K, V(+1)]
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
