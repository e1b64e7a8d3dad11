"""The tuned pure-PyTorch chunked form of causal linear attention: the CPU training path (math, shapes and
state layout: see `naive.py`, whose forms are its oracles)."""
from __future__ import annotations

import torch

from .._common import check_chunk_size, pad_time
from .naive import finish_linear_output, prepare_linear_inputs


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
