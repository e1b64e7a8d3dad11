"""The chunked (WY / UT-transform) form of the gated delta rule: the CPU training path. Math, shapes and
state layout: see `naive.py`, whose token loop is its oracle.

Derivation. Write one step as `S_r = D_r S_{r−1} + k_r u_rᵀ` with `D_r = Diag(exp(g_r))` and the new value
`u_r = β_r (v_r − S_{r−1}ᵀ D_r k_r)`. Inside a chunk that starts from state S, with Γ_r the cumulative
log-decay from the chunk start (vector over K, or a scalar),

  S_r = Diag(e^{Γ_r}) S + Σ_{i≤r} Diag(e^{Γ_r − Γ_i}) k_i u_iᵀ.

Substituting S_{r−1} into u_r gives a unit lower-triangular C × C system for the rows u_r:

  u_r + Σ_{i<r} A_ri u_i = β_r v_r − β_r (k_r ⊙ e^{Γ_r})ᵀ S,    A_ri = β_r Σ_d k_rd k_id e^{Γ_rd − Γ_id},

so with T = (I + A)⁻¹: U = T diag(β) V − T diag(β) (K ⊙ e^Γ) S = Ū − W S. W and Ū do not depend on S:
they are solved for every chunk at once; only `U = Ū − W S` and the state update
`S ← Diag(e^{Γ_C}) S + (K ⊙ e^{Γ_C − Γ})ᵀ U` run chunk after chunk. Outputs, again for every chunk at once:

  o_r = scale · ((q_r ⊙ e^{Γ_r})ᵀ S + Σ_{i≤r} (Σ_d q_rd k_id e^{Γ_rd − Γ_id}) u_i).

Memory is O(T·C) (per-channel decay adds O(T·c·K) pair decays, c ≤ MAX_SUB_CHUNK); no T × T matrix. Every exponent is a decay difference Γ_later − Γ_earlier ≤ 0, masked before the exp, so
nothing overflows under strong decay.
"""
from __future__ import annotations

import torch

from .._common import check_chunk_size, floored_exp, masked_exp, pad_time
from .naive import finish_delta_output, prepare_delta_inputs


# Largest sub-chunk for the per-channel pair decays: only the diagonal sub-blocks materialize them,
# as [c, c, K] tensors.
MAX_SUB_CHUNK = 16


def _sub_chunk_size(chunk_size):
    """Largest divisor of `chunk_size` that is at most MAX_SUB_CHUNK."""
    return max(d for d in range(1, min(chunk_size, MAX_SUB_CHUNK) + 1) if chunk_size % d == 0)


def _explicit_scores(a, b, g_cum, keep):
    """Per-channel scores with the explicit masked `[..., C, C, K]` pair-decay tensor."""
    decay = masked_exp(g_cum.unsqueeze(-2) - g_cum.unsqueeze(-3), keep.unsqueeze(-1))  # [..., C(r), C(i), K]
    b_decayed = b.unsqueeze(-3) * decay  # [..., C(r), C(i), K]
    return (a.unsqueeze(-2) @ b_decayed.transpose(-1, -2)).squeeze(-2)  # [..., C, C]


def _per_channel_scores(a, b, g_cum, keep):
    """Per-channel scores, the chunk split into m sub-chunks of c tokens. Diagonal sub-blocks use the
    explicit decay tensor `[c, c, K]`; for sub-chunk i and an earlier one j the decay is factored through
    R_i, the cumulative log-decay just before sub-chunk i: e^{Γ_r − R_i} · e^{R_i − Γ_s}, both exponents ≤ 0,
    which turns the block into one matmul."""
    chunk_size = a.shape[-2]
    sub = _sub_chunk_size(chunk_size)
    a_s = a.unflatten(-2, (-1, sub))  # [..., m, c, K]
    b_s = b.unflatten(-2, (-1, sub))  # [..., m, c, K]
    g_s = g_cum.unflatten(-2, (-1, sub))  # [..., m, c, K]
    num_sub = a_s.shape[-3]
    diag = _explicit_scores(a_s, b_s, g_s, keep[:sub, :sub])  # [..., m, c, c]
    if num_sub == 1:
        return diag.squeeze(-3)  # [..., C, C]
    ref = torch.cat([torch.zeros_like(g_s[..., :1, -1, :]), g_s[..., :-1, -1, :]], dim=-2)  # [..., m, K]
    a_rel = a_s * floored_exp(g_s - ref.unsqueeze(-2))  # [..., m, c, K]
    earlier = torch.ones(num_sub, num_sub, dtype=torch.bool, device=a.device).tril(-1)  # [m(i), m(j)]
    b_log = ref[..., :, None, None, :] - g_s[..., None, :, :, :]  # [..., m(i), m(j), c, K]
    b_rel = b_s.unsqueeze(-4) * masked_exp(b_log, earlier[:, :, None, None])  # [..., m(i), m(j), c, K]
    blocks = a_rel.unsqueeze(-3) @ b_rel.transpose(-1, -2)  # [..., m(i), m(j), c, c]
    on_diag = torch.eye(num_sub, dtype=torch.bool, device=a.device)[:, :, None, None]  # [m, m, 1, 1]
    blocks = torch.where(on_diag, diag.unsqueeze(-3), blocks)  # [..., m(i), m(j), c, c]
    return blocks.transpose(-3, -2).flatten(-4, -3).flatten(-2, -1)  # [..., C, C]


def decayed_scores(a, b, g_cum, keep):
    """`Σ_d a_rd b_id e^{Γ_rd − Γ_id}` where `keep[r, i]` (a lower-triangular `[C, C]` mask), else 0:
    a, b `[..., C, K]`, Γ `[..., C, 1]` (one decay per head) or `[..., C, K]` (per channel), leading
    dims broadcast → `[..., C, C]`."""
    if g_cum.shape[-1] == 1:
        decay = masked_exp(g_cum - g_cum.transpose(-1, -2), keep)  # [..., C, C]
        return (a @ b.transpose(-1, -2)) * decay
    return _per_channel_scores(a, b, g_cum, keep)


def chunk_gated_delta_rule_torch(
    q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False, chunk_size=64
):
    """Chunked form (see the module docstring); same arguments and results as the recurrent form."""
    check_chunk_size(chunk_size)
    qh, kh, vh, gh, bh, state, scale = prepare_delta_inputs(q, k, v, g, beta, scale, initial_state)
    seq_len, key_dim = kh.shape[2], kh.shape[3]
    gh = gh if gh.dim() == 4 else gh.unsqueeze(-1)  # [B, H_kv, T, 1 or K]
    # zero padding at the end: β = 0 and k = 0 write nothing and g = 0 decays nothing, so the state is
    # unchanged; the padded outputs are cut off
    qc = pad_time(qh, chunk_size, dim=3).unflatten(3, (-1, chunk_size))  # [B, H_kv, G, N, C, K]
    kc = pad_time(kh, chunk_size).unflatten(2, (-1, chunk_size))  # [B, H_kv, N, C, K]
    vc = pad_time(vh, chunk_size).unflatten(2, (-1, chunk_size))  # [B, H_kv, N, C, V]
    bc = pad_time(bh.unsqueeze(-1), chunk_size).unflatten(2, (-1, chunk_size))  # [B, H_kv, N, C, 1]
    g_cum = pad_time(gh, chunk_size).unflatten(2, (-1, chunk_size)).cumsum(dim=3)  # [B, H_kv, N, C, 1 or K]

    ones = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=kc.device)
    # A is strictly lower; the solve takes the unit diagonal as given (unitriangular), so I + A is never built
    a_lower = bc * decayed_scores(kc, kc, g_cum, ones.tril(-1))  # [B, H_kv, N, C, C]
    rhs = bc * torch.cat([kc * floored_exp(g_cum), vc], dim=-1)  # [B, H_kv, N, C, K + V]
    w, u_bar = torch.linalg.solve_triangular(a_lower, rhs, upper=False, unitriangular=True).split(
        [key_dim, vc.shape[-1]], dim=-1
    )  # [B, H_kv, N, C, K], [B, H_kv, N, C, V]

    g_last = g_cum[:, :, :, -1:]  # [B, H_kv, N, 1, 1 or K]
    k_to_end = kc * floored_exp(g_last - g_cum)  # [B, H_kv, N, C, K]
    chunk_decay = floored_exp(g_last).transpose(-1, -2)  # [B, H_kv, N, 1 or K, 1]
    starts, new_values = [], []
    for n in range(kc.shape[2]):
        starts.append(state)
        u = u_bar[:, :, n] - w[:, :, n] @ state  # [B, H_kv, C, V]
        new_values.append(u)
        state = chunk_decay[:, :, n] * state + k_to_end[:, :, n].transpose(-1, -2) @ u  # [B, H_kv, K, V]
    start_states = torch.stack(starts, dim=2).unsqueeze(2)  # [B, H_kv, 1, N, K, V]
    u = torch.stack(new_values, dim=2).unsqueeze(2)  # [B, H_kv, 1, N, C, V]

    g_q = g_cum.unsqueeze(2)  # [B, H_kv, 1, N, C, 1 or K]
    inter = (qc * floored_exp(g_q)) @ start_states  # [B, H_kv, G, N, C, V]
    intra = decayed_scores(qc, kc.unsqueeze(2), g_q, ones.tril()) @ u  # [B, H_kv, G, N, C, V]
    out = (scale * (inter + intra)).flatten(3, 4)[:, :, :, :seq_len]  # [B, H_kv, G, T, V]
    return finish_delta_output(out, q.dtype), (state if output_final_state else None)
