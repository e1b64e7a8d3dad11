"""Pure-PyTorch causal gated linear attention (GLA form), the obvious forms (the oracles of the tuned
ones): `parallel_gated_linear_attn` (quadratic) and `recurrent_gated_linear_attn` (token by token: also
the decoding step). The tuned CPU path, `chunk.chunk_gated_linear_attn_torch`, and the Triton kernel
have the same signature.

Shapes: q `[B, T, H, K]`; k, g `[B, T, H_kv, K]`; v `[B, T, H_kv, V]`, `H % H_kv == 0`. g is the
per-key-dimension log-decay (≤ 0). Returns `(o [B, T, H, V] in v.dtype, final_state or None)`.

  S_t = diag(exp(g_t)) S_{t-1} + k_t v_tᵀ
- unnormalized (default): `o_t = scale · q_tᵀ S_t`, scale defaults to `K^-0.5`; state `[B, H, K, V]`.
- normalized: `z_t = diag(exp(g_t)) z_{t-1} + k_t`, `o_t = q_tᵀ S_t / (q_tᵀ z_t + eps)`, scale ignored;
  state `[B, H, K, V + 1]` (last column z).

Stability: decays are only ever exponentiated as exp(G_a − G_b) with a later than b (a cumulative
log-decay difference ≤ 0), masked before the exp, so nothing overflows however strong the decay; and
floored at EXP_FLOOR (`floored_exp`), so nothing takes CPU exp's slow underflow path either.
"""
from __future__ import annotations

import torch

from .._common import check_same_tokens, floored_exp, heads_first_fp32, masked_exp
from ..linear_attn.naive import finish_linear_output, prepare_linear_inputs

def prepare_gated_inputs(q, k, v, g, scale, normalize, initial_state):
    check_same_tokens(q=q, k=k, v=v, g=g)
    if g.shape[2:] != k.shape[2:]:
        raise ValueError(f"g must match k's heads and width {tuple(k.shape[2:])}, got {tuple(g.shape[2:])}")
    qh, kh, vh, s0 = prepare_linear_inputs(q, k, v, scale, normalize, initial_state)
    gh = heads_first_fp32(g, q.shape[2])  # [B, H, T, K]
    return qh, kh, vh, gh, s0


def _decay_matrix(g_cum_q, g_cum_k, causal):
    """exp(G_t − G_s) for s ≤ t else 0: `[..., Tq, K]`, `[..., Tk, K]` → `[..., Tq, Tk, K]`."""
    diff = g_cum_q.unsqueeze(-2) - g_cum_k.unsqueeze(-3)  # [..., Tq, Tk, K]
    return masked_exp(diff, causal.unsqueeze(-1))


def gated_scores(qh, kh, g_cum, causal):
    """Σ_k q_tk k_sk exp(G_tk − G_sk), masked to `causal`: `[..., T, K]` → `[..., T, T]`."""
    decay = _decay_matrix(g_cum, g_cum, causal)  # [..., T, T, K]
    return (qh.unsqueeze(-2) * kh.unsqueeze(-3) * decay).sum(-1)


def parallel_gated_linear_attn(
    q, k, v, g, *, scale=None, normalize=False, initial_state=None, output_final_state=False, chunk_size=None
):
    """Quadratic form with an explicit `[B, H, T, T, K]` decay tensor (memory T²K: a reference only).
    `chunk_size` is accepted and ignored."""
    qh, kh, vh, gh, s0 = prepare_gated_inputs(q, k, v, g, scale, normalize, initial_state)
    seq_len = qh.shape[2]
    g_cum = gh.cumsum(dim=2)  # [B, H, T, K]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=qh.device).tril()
    scores = gated_scores(qh, kh, g_cum, causal)  # [B, H, T, T]
    out = scores @ vh + (qh * floored_exp(g_cum)) @ s0  # [B, H, T, V(+1)]
    final = None
    if output_final_state:
        g_total = g_cum[:, :, -1:]  # [B, H, 1, K]
        k_to_end = kh * floored_exp(g_total - g_cum)  # [B, H, T, K]
        final = floored_exp(g_total.transpose(-1, -2)) * s0 + k_to_end.transpose(-1, -2) @ vh  # [B, H, K, V(+1)]
    return finish_linear_output(out, normalize, v.dtype), final


def recurrent_gated_linear_attn(
    q, k, v, g, *, scale=None, normalize=False, initial_state=None, output_final_state=False, chunk_size=None
):
    """Token-by-token form `S_t = diag(exp(g_t)) S_{t-1} + k_t v_tᵀ`; a `T = 1` call is one step."""
    qh, kh, vh, gh, state = prepare_gated_inputs(q, k, v, g, scale, normalize, initial_state)
    outputs = []
    for t in range(qh.shape[2]):
        decay = floored_exp(gh[:, :, t]).unsqueeze(-1)  # [B, H, K, 1]
        state = decay * state + kh[:, :, t, :, None] * vh[:, :, t, None, :]  # [B, H, K, V(+1)]
        outputs.append((qh[:, :, t, None, :] @ state).squeeze(-2))  # [B, H, V(+1)]
    out = torch.stack(outputs, dim=2)  # [B, H, T, V(+1)]
    return finish_linear_output(out, normalize, v.dtype), (state if output_final_state else None)
