"""The tuned pure-PyTorch chunked form of gated linear attention (GLA form): the CPU training path (math,
shapes, state layout and the stability rules: see `naive.py`, whose forms are its oracles)."""
from __future__ import annotations

import torch

from .._common import check_chunk_size, floored_exp, masked_exp, pad_time
from ..linear_attn.naive import finish_linear_output
from .naive import gated_scores, prepare_gated_inputs

# Largest sub-chunk inside a chunk: the diagonal blocks materialize [sub, sub, K] decay tensors.
MAX_SUB_CHUNK = 16


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
    out = gated_scores(qs, ks, gs, diag_causal) @ vs  # [B, H, N, m, c, V]
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
    qh, kh, vh, gh, state = prepare_gated_inputs(q, k, v, g, scale, normalize, initial_state)
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
