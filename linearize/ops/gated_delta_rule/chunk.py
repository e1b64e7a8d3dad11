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

Memory is O(T·C) (O(T·C·K) for per-channel decay, whose pair decays are `[C, C, K]` per chunk); no
T × T matrix. Every exponent is a decay difference Γ_later − Γ_earlier ≤ 0, masked before the exp, so
nothing overflows under strong decay.
"""
from __future__ import annotations

import torch

from .._common import check_chunk_size, floored_exp, masked_exp, pad_time
from .naive import finish_delta_output, prepare_delta_inputs


def decayed_scores(a, b, g_a, g_b, keep):
    """`Σ_d a_rd b_id e^{Γa_rd − Γb_id}` where `keep[r, i]`, else 0: a `[..., C, K]`, b `[..., C, K]`,
    Γ `[..., C, 1]` (one decay per head) or `[..., C, K]` (per channel), leading dims broadcast →
    `[..., C, C]`."""
    if g_a.shape[-1] == 1:
        decay = masked_exp(g_a - g_b.transpose(-1, -2), keep)  # [..., C, C]
        return (a @ b.transpose(-1, -2)) * decay
    decay = masked_exp(g_a.unsqueeze(-2) - g_b.unsqueeze(-3), keep.unsqueeze(-1))  # [..., C(r), C(i), K]
    b_decayed = b.unsqueeze(-3) * decay  # [..., C(r), C(i), K]
    return (a.unsqueeze(-2) @ b_decayed.transpose(-1, -2)).squeeze(-2)  # [..., C, C]


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
    a_lower = bc * decayed_scores(kc, kc, g_cum, g_cum, ones.tril(-1))  # [B, H_kv, N, C, C]
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
    intra = decayed_scores(qc, kc.unsqueeze(2), g_q, g_q, ones.tril()) @ u  # [B, H_kv, G, N, C, V]
    out = (scale * (inter + intra)).flatten(3, 4)[:, :, :, :seq_len]  # [B, H_kv, G, T, V]
    return finish_delta_output(out, q.dtype), (state if output_final_state else None)
