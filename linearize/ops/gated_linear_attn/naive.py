"""Pure-PyTorch causal gated linear attention (GLA form) in three forms with one signature:
`parallel_gated_linear_attn` (quadratic), `chunk_gated_linear_attn_torch` (chunked, the CPU training
path) and `recurrent_gated_linear_attn` (token by token: the decoding step and an oracle).

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

from .._common import check_chunk_size, check_same_tokens, floored_exp, heads_first_fp32, masked_exp, pad_time
from ..linear_attn.naive import finish_linear_output, prepare_linear_inputs

# Largest sub-chunk inside a chunk: the diagonal blocks materialize [sub, sub, K] decay tensors.
MAX_SUB_CHUNK = 16


def _prepare_gated(q, k, v, g, scale, normalize, initial_state):
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


def _gated_scores(qh, kh, g_cum, causal):
    """Σ_k q_tk k_sk exp(G_tk − G_sk), masked to `causal`: `[..., T, K]` → `[..., T, T]`."""
    decay = _decay_matrix(g_cum, g_cum, causal)  # [..., T, T, K]
    return (qh.unsqueeze(-2) * kh.unsqueeze(-3) * decay).sum(-1)


def parallel_gated_linear_attn(
    q, k, v, g, *, scale=None, normalize=False, initial_state=None, output_final_state=False, chunk_size=None
):
    """Quadratic form with an explicit `[B, H, T, T, K]` decay tensor (memory T²K: a reference only).
    `chunk_size` is accepted and ignored."""
    qh, kh, vh, gh, s0 = _prepare_gated(q, k, v, g, scale, normalize, initial_state)
    seq_len = qh.shape[2]
    g_cum = gh.cumsum(dim=2)  # [B, H, T, K]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=qh.device).tril()
    scores = _gated_scores(qh, kh, g_cum, causal)  # [B, H, T, T]
    out = scores @ vh + (qh * floored_exp(g_cum)) @ s0  # [B, H, T, V(+1)]
    final = None
    if output_final_state:
        g_total = g_cum[:, :, -1:]  # [B, H, 1, K]
        k_to_end = kh * floored_exp(g_total - g_cum)  # [B, H, T, K]
        final = floored_exp(g_total.transpose(-1, -2)) * s0 + k_to_end.transpose(-1, -2) @ vh  # [B, H, K, V(+1)]
    return finish_linear_output(out, normalize, v.dtype), final


def _sub_chunk_size(chunk_size):
    """Largest divisor of `chunk_size` that is at most MAX_SUB_CHUNK."""
    return max(d for d in range(1, min(chunk_size, MAX_SUB_CHUNK) + 1) if chunk_size % d == 0)


def _intra_chunk(qc, kc, vc, g_cum):
    """Within-chunk outputs Σ_{s≤t in chunk} (q_t ⊙ exp(G_t − G_s))·k_s v_s on `[B, H, N, C, ·]` chunks.

    Each chunk is split into m sub-chunks of c tokens. Diagonal sub-blocks use the explicit masked decay
    tensor `[c, c, K]`. For sub-chunk i and an earlier one j, the decay is factored through R_i, the
    cumulative log-decay just before sub-chunk i: exp(G_t − R_i) · exp(R_i − G_s), both exponents ≤ 0.
    """
    chunk_size = qc.shape[-2]
    sub = _sub_chunk_size(chunk_size)
    qs = qc.unflatten(-2, (-1, sub))  # [B, H, N, m, c, K]
    ks = kc.unflatten(-2, (-1, sub))  # [B, H, N, m, c, K]
    vs = vc.unflatten(-2, (-1, sub))  # [B, H, N, m, c, V]
    gs = g_cum.unflatten(-2, (-1, sub))  # [B, H, N, m, c, K]
    num_sub = qs.shape[-3]
    diag_causal = torch.ones(sub, sub, dtype=torch.bool, device=qc.device).tril()
    out = _gated_scores(qs, ks, gs, diag_causal) @ vs  # [B, H, N, m, c, V]
    if num_sub > 1:
        ref = torch.cat([torch.zeros_like(gs[..., :1, -1, :]), gs[..., :-1, -1, :]], dim=-2)  # [B, H, N, m, K]
        q_rel = qs * floored_exp(gs - ref.unsqueeze(-2))  # [B, H, N, m, c, K]
        earlier = torch.ones(num_sub, num_sub, dtype=torch.bool, device=qc.device).tril(-1)  # [m(i), m(j)]
        k_log = ref[..., :, None, None, :] - gs[..., None, :, :, :]  # [B, H, N, m(i), m(j), c, K]
        k_rel = ks.unsqueeze(-4) * masked_exp(k_log, earlier[:, :, None, None])  # [B, H, N, m(i), m(j), c, K]
        scores = torch.einsum("...itk,...ijsk->...ijts", q_rel, k_rel)  # [B, H, N, m(i), m(j), c, c]
        out = out + torch.einsum("...ijts,...jsv->...itv", scores, vs)  # [B, H, N, m, c, V]
    return out.flatten(-3, -2)  # [B, H, N, C, V]


def chunk_gated_linear_attn_torch(
    q, k, v, g, *, scale=None, normalize=False, initial_state=None, output_final_state=False, chunk_size=64
):
    """Chunked form: per chunk, cumulative log-decays G relative to the chunk start (fp32); the
    within-chunk part in `_intra_chunk`; across chunks `o += (q ⊙ exp(G)) S_n` and
    `S_{n+1} = diag(exp(G_last)) S_n + Σ_s (k_s ⊙ exp(G_last − G_s)) v_sᵀ` (one small step per chunk)."""
    check_chunk_size(chunk_size)
    qh, kh, vh, gh, state = _prepare_gated(q, k, v, g, scale, normalize, initial_state)
    seq_len = qh.shape[2]
    # zero padding at the end: k = 0 adds nothing and g = 0 decays nothing, so the state is unchanged
    qc = pad_time(qh, chunk_size).unflatten(2, (-1, chunk_size))  # [B, H, N, C, K]
    kc = pad_time(kh, chunk_size).unflatten(2, (-1, chunk_size))  # [B, H, N, C, K]
    vc = pad_time(vh, chunk_size).unflatten(2, (-1, chunk_size))  # [B, H, N, C, V(+1)]
    g_cum = pad_time(gh, chunk_size).unflatten(2, (-1, chunk_size)).cumsum(dim=3)  # [B, H, N, C, K]
    g_last = g_cum[:, :, :, -1]  # [B, H, N, K]
    q_decayed = qc * floored_exp(g_cum)  # [B, H, N, C, K]
    k_to_end = kc * floored_exp(g_last.unsqueeze(-2) - g_cum)  # [B, H, N, C, K]
    chunk_kv = k_to_end.transpose(-1, -2) @ vc  # [B, H, N, K, V(+1)]
    chunk_decay = floored_exp(g_last).unsqueeze(-1)  # [B, H, N, K, 1]
    states = []
    for n in range(qc.shape[2]):
        states.append(state)
        state = chunk_decay[:, :, n] * state + chunk_kv[:, :, n]  # [B, H, K, V(+1)]
    inter = q_decayed @ torch.stack(states, dim=2)  # [B, H, N, C, V(+1)]
    out = (inter + _intra_chunk(qc, kc, vc, g_cum)).flatten(2, 3)[:, :, :seq_len]  # [B, H, T, V(+1)]
    return finish_linear_output(out, normalize, v.dtype), (state if output_final_state else None)


def recurrent_gated_linear_attn(
    q, k, v, g, *, scale=None, normalize=False, initial_state=None, output_final_state=False, chunk_size=None
):
    """Token-by-token form `S_t = diag(exp(g_t)) S_{t-1} + k_t v_tᵀ`; a `T = 1` call is one step."""
    qh, kh, vh, gh, state = _prepare_gated(q, k, v, g, scale, normalize, initial_state)
    outputs = []
    for t in range(qh.shape[2]):
        decay = floored_exp(gh[:, :, t]).unsqueeze(-1)  # [B, H, K, 1]
        state = decay * state + kh[:, :, t, :, None] * vh[:, :, t, None, :]  # [B, H, K, V(+1)]
        outputs.append((qh[:, :, t, None, :] @ state).squeeze(-2))  # [B, H, V(+1)]
    out = torch.stack(outputs, dim=2)  # [B, H, T, V(+1)]
    return finish_linear_output(out, normalize, v.dtype), (state if output_final_state else None)
