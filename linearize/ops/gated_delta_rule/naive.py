"""Pure-PyTorch gated delta rule, the obvious form: `recurrent_gated_delta_rule`, token by token (the oracle
of the chunk form, and the decoding step: a `T = 1` call is one cheap step). The tuned CPU path,
`chunk.chunk_gated_delta_rule_torch`, has the same signature.

Shapes: q `[B, T, H, K]`; k `[B, T, H_kv, K]`; v `[B, T, H_kv, V]`, `H % H_kv == 0` (query head h reads
kv head `h // (H // H_kv)`); g the log-decay (≤ 0), `[B, T, H_kv]` (one per head: Gated DeltaNet) or
`[B, T, H_kv, K]` (one per key channel: KDA); beta `[B, T, H_kv]`, in (0, 1] (or (0, 2]: not clamped).
State `[B, H_kv, K, V]`, one per kv head. Returns `(o [B, T, H, V] in q.dtype, final_state or None)`.

  S_t = (I − β_t k_t k_tᵀ) · Diag(exp(g_t)) · S_{t−1} + β_t k_t v_tᵀ,    o_t = scale · S_tᵀ q_t
      = Diag(exp(g_t)) S_{t−1} + β_t k_t (v_t − S_{t−1}ᵀ Diag(exp(g_t)) k_t)ᵀ     (the form computed)

scale defaults to `K^-0.5`; q and k are used as given (the mechanisms normalize them). Compute and state
are fp32, except for float64 inputs, which stay float64 (so the float64 oracle tests are exact checks).
"""
from __future__ import annotations

import torch

from .._common import check_heads, check_same_tokens, floored_exp


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for every input dtype but float64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_delta_shapes(q, k, v, g, beta, initial_state) -> tuple[int, int, int, int]:
    """ValueError naming the first argument whose shape does not fit; else (B, H_kv, K, G). Every form and
    backend calls this one check."""
    check_same_tokens(q=q, k=k, v=v)
    batch, seq_len, heads, key_dim = q.shape
    kv_heads = k.shape[2]
    group = check_heads(heads, kv_heads)
    if k.shape[3] != key_dim or v.shape[2] != kv_heads:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must share kv heads, and k q's width {key_dim}")
    if g.shape not in ((batch, seq_len, kv_heads), (batch, seq_len, kv_heads, key_dim)):
        raise ValueError(
            f"g must be [B, T, H_kv] = {(batch, seq_len, kv_heads)} or [B, T, H_kv, K] = "
            f"{(batch, seq_len, kv_heads, key_dim)}, got {tuple(g.shape)}"
        )
    if beta.shape != (batch, seq_len, kv_heads):
        raise ValueError(f"beta must be [B, T, H_kv] = {(batch, seq_len, kv_heads)}, got {tuple(beta.shape)}")
    state_shape = (batch, kv_heads, key_dim, v.shape[3])
    if initial_state is not None and initial_state.shape != state_shape:
        raise ValueError(f"initial_state must be [B, H_kv, K, V] = {state_shape}, got {tuple(initial_state.shape)}")
    return batch, kv_heads, key_dim, group


def prepare_delta_inputs(q, k, v, g, beta, scale, initial_state):
    """Check shapes; return heads-first tensors in the compute dtype: q `[B, H_kv, G, T, K]` (G query
    heads per kv head), k `[B, H_kv, T, K]`, v `[B, H_kv, T, V]`, g `[B, H_kv, T]` or `[B, H_kv, T, K]`,
    beta `[B, H_kv, T]`, the initial state `[B, H_kv, K, V]` (zeros when None), and the scale."""
    batch, kv_heads, key_dim, group = check_delta_shapes(q, k, v, g, beta, initial_state)
    dtype = compute_dtype(q)
    if initial_state is None:
        s0 = torch.zeros((batch, kv_heads, key_dim, v.shape[3]), dtype=dtype, device=q.device)
    else:
        s0 = initial_state.to(dtype)
    qh = q.to(dtype).transpose(1, 2).unflatten(1, (kv_heads, group))  # [B, H_kv, G, T, K]
    kh = k.to(dtype).transpose(1, 2)  # [B, H_kv, T, K]
    vh = v.to(dtype).transpose(1, 2)  # [B, H_kv, T, V]
    gh = g.to(dtype).transpose(1, 2)  # [B, H_kv, T] or [B, H_kv, T, K]
    bh = beta.to(dtype).transpose(1, 2)  # [B, H_kv, T]
    return qh, kh, vh, gh, bh, s0, key_dim**-0.5 if scale is None else scale


def finish_delta_output(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`[B, H_kv, G, T, V]` → `[B, T, H, V]` in `dtype`."""
    return out.flatten(1, 2).transpose(1, 2).to(dtype)  # [B, T, H, V]


def decay_rows(g_t: torch.Tensor) -> torch.Tensor:
    """exp(g_t) shaped to scale the state's rows: `[B, H_kv]` or `[B, H_kv, K]` → `[B, H_kv, 1 or K, 1]`."""
    decay = floored_exp(g_t)
    return decay[..., None, None] if decay.dim() == 2 else decay[..., None]


def recurrent_gated_delta_rule(
    q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False, chunk_size=None
):
    """Token-by-token form; `chunk_size` is accepted and ignored."""
    qh, kh, vh, gh, bh, state, scale = prepare_delta_inputs(q, k, v, g, beta, scale, initial_state)
    outputs = []
    for t in range(kh.shape[2]):
        state = decay_rows(gh[:, :, t]) * state  # [B, H_kv, K, V]
        k_t = kh[:, :, t]  # [B, H_kv, K]
        predicted = (k_t.unsqueeze(-2) @ state).squeeze(-2)  # [B, H_kv, V]: what the state recalls for k_t
        correction = bh[:, :, t, None] * (vh[:, :, t] - predicted)  # [B, H_kv, V]
        state = state + k_t.unsqueeze(-1) * correction.unsqueeze(-2)  # [B, H_kv, K, V]
        outputs.append(scale * (qh[:, :, :, t] @ state))  # [B, H_kv, G, V]
    out = torch.stack(outputs, dim=3)  # [B, H_kv, G, T, V]
    return finish_delta_output(out, q.dtype), (state if output_final_state else None)
