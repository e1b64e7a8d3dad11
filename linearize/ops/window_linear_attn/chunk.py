"""The tuned pure-PyTorch chunked form of the LoLCATs hybrid: the CPU training path, never a T×T matrix
(math, shapes and state layout: see `naive.py`, whose forms are its oracles)."""
from __future__ import annotations

import torch

from .._common import append_ones, check_chunk_size, key_lag, masked_exp, sliding_window_mask
from .naive import decay_factor, decay_powers, divide_output, final_state, prepare_inputs


def _window_keys(num_chunks, chunk_size, window_size, front, device, sink_tokens=0):
    """`[N, C, W + C]` bool mask of the softmax keys of each query chunk's key block: query i of a chunk
    sits at block position W + i, and a block key is a softmax key when it lies in that query's sliding
    window, or is a sink (key index < `sink_tokens`) at or before it, and is not front padding."""
    window = sliding_window_mask(chunk_size, window_size + chunk_size, window_size, window_size, device)  # [C, W + C]
    key_idx = torch.arange(window_size + chunk_size, device=device)
    chunk_start = torch.arange(num_chunks, device=device)[:, None, None] * chunk_size  # [N, 1, 1]
    is_key = chunk_start + key_idx >= front  # [N, 1, W + C]: front padding is not a key
    if sink_tokens > 0:
        is_sink = chunk_start + key_idx - front < sink_tokens  # [N, 1, W + C]: key index below N
        causal = key_lag(chunk_size, window_size + chunk_size, window_size, device) >= 0  # [C, W + C]
        window = window | (is_sink & causal)  # [N, C, W + C]
    return window & is_key  # [N, C, W + C]


def _window_part(x, window_size, chunk_size, num_chunks, pad):
    """Softmax numerator/normalizer of every query chunk over its window keys → `[B, H, N, C, V + 1]`.

    Each chunk scores a `[C, W + C]` key block (the previous W keys and its own C). With GQA the G query
    heads of one kv head are stacked in the rows of one matmul: each kv head's key and value blocks are
    gathered once, not once per query head, and the matmuls are G times taller. The mask runs in place
    on the fresh scores (a matmul keeps no output for backward); the exp is floored (`masked_exp`). The
    row max c_t is part of the math (it scales the softmax part against the linear part), so it keeps
    its gradient."""
    block = window_size + chunk_size
    kv_heads = x.k_raw.shape[1]
    group = x.q.shape[1] // kv_heads

    def blocks(t):
        return pad(t).unfold(2, block, chunk_size).transpose(-1, -2)  # [B, H_kv, N, W + C, ·]

    qc = _chunks(x.q, num_chunks, chunk_size).unflatten(1, (kv_heads, group))  # [B, H_kv, G, N, C, D]
    q_rows = qc.transpose(2, 3).flatten(3, 4)  # [B, H_kv, N, G·C, D]: a group's rows stacked (a copy)
    scores = q_rows @ blocks(x.k_raw).transpose(-1, -2)  # [B, H_kv, N, G·C, W + C]
    scores = scores.unflatten(3, (group, chunk_size))  # [B, H_kv, N, G, C, W + C]
    front = window_size - x.prefix
    window = _window_keys(num_chunks, chunk_size, window_size, front, scores.device, x.sink_tokens)
    window = window.unsqueeze(1)  # [N, 1, C, W + C]: the same keys for every head of the group
    scores.masked_fill_(~window, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)  # [B, H_kv, N, G, C, 1]: c_t, finite as s = t is a key
    sinks = _early_sinks(x, q_rows, front, chunk_size, num_chunks) if x.sink_tokens else None
    if sinks is not None:
        sink_scores, sink_keys = sinks
        row_max = torch.maximum(row_max, sink_scores.amax(dim=-1, keepdim=True))
    a_sm = masked_exp(scores - row_max, window)  # exp(score − c_t) on window keys, 0 elsewhere
    num_den = a_sm.flatten(3, 4) @ blocks(append_ones(x.v_raw))  # [B, H_kv, N, G·C, V + 1]
    if sinks is not None:
        a_sink = masked_exp(sink_scores - row_max, sink_keys).flatten(2, 4)  # [B, H_kv, N·G·C, S]
        sink_v1 = append_ones(x.v_raw[:, :, : sink_scores.shape[-1]])  # [B, H_kv, S, V + 1]
        num_den = num_den + (a_sink @ sink_v1).view_as(num_den)  # [B, H_kv, N, G·C, V + 1]
    # γ scales the product, not the [C, W + C] weights: fewer elements, and when q/k/v need no gradient
    # (attention transfer) the whole block product stays outside the autograd graph.
    gamma = x.gamma.view(kv_heads, 1, group, 1, 1)  # [H_kv, 1, G, 1, 1]
    num_den = num_den.unflatten(3, (group, chunk_size)) * gamma  # [B, H_kv, N, G, C, V + 1]
    return num_den.transpose(2, 3).flatten(1, 2)  # [B, H, N, C, V + 1]


def _early_sinks(x, q_rows, front, chunk_size, num_chunks):
    """Scores of the sink keys that lie before a query chunk's key block (those inside it are in the
    block's mask) → (scores `[B, H_kv, N, G, C, S]` with −inf elsewhere, mask `[N, 1, 1, S]`), S the
    number of sinks among the keys; None when no sink lies before any block."""
    num_sinks = min(x.sink_tokens, x.k_raw.shape[2])
    if (num_chunks - 1) * chunk_size - front <= 0:  # the last block starts at key 0 or before: none is early
        return None  # (decided on ints, so torch.compile sees no data-dependent branch)
    block_start = torch.arange(num_chunks, device=q_rows.device) * chunk_size - front  # [N]: first block key
    early = torch.arange(num_sinks, device=q_rows.device)[None, :] < block_start[:, None]  # [N, S]
    # one [N·G·C, D] × [D, S] product per kv head (a broadcast over chunks would batch N small ones)
    scores = q_rows.flatten(2, 3) @ x.k_raw[:, :, :num_sinks].transpose(-1, -2)  # [B, H_kv, N·G·C, S]
    scores = scores.unflatten(2, (num_chunks, x.q.shape[1] // x.k_raw.shape[1], chunk_size))  # [B, H_kv, N, G, C, S]
    early = early[:, None, None, :]  # [N, 1, 1, S]: a key before the block is before every query of the chunk
    return scores.masked_fill(~early, float("-inf")), early


def _linear_part(x, front, chunk_size, num_chunks):
    """Linear-attention numerator/normalizer of every query chunk → `[B, H, N, C, V + 1]`.

    The linear keys of query i in chunk n are the keys up to W before it: in the key block they are
    padded chunk n's keys j <= i (a lower triangle, never the rest of the block), and all keys before
    padded chunk n reach it through the state `kv_n = kv0 + Σ_{m<n} fk_mᵀ [v_m, 1]` (an exclusive
    cumulative sum over chunks). With a decay see `_decayed_linear_part`."""
    fk = _shifted(x.fk, front, num_chunks, chunk_size)  # [B, H, N, C, F]
    v1 = _shifted(x.v1, front, num_chunks, chunk_size)  # [B, H, N, C, V + 1]
    fqc = _chunks(x.fq, num_chunks, chunk_size)  # [B, H, N, C, F]
    if x.decay is not None:
        return _decayed_linear_part(x, fk, v1, fqc, front + x.prefix)
    a_lin = (fqc @ fk.transpose(-1, -2)).tril_()  # [B, H, N, C, C]
    chunk_kv = (fk.transpose(-1, -2) @ v1).flatten(3)  # [B, H, N, F·(V + 1)]: the keys each chunk holds
    # Exclusive prefix sum over chunks as one small matmul (cheaper than cumsum and its flip-backward).
    before = torch.ones(num_chunks, num_chunks, device=fk.device).tril_(diagonal=-1)  # [N, N]: m < n
    kv = (before @ chunk_kv).unflatten(-1, x.kv0.shape[-2:])  # [B, H, N, F, V + 1]
    if x.has_state:  # a fresh sequence's kv0 is zeros: adding it would be a full pass over every state
        kv = x.kv0.unsqueeze(2) + kv
    return a_lin @ v1 + fqc @ kv  # [B, H, N, C, V + 1]


def _decayed_linear_part(x, fk, v1, fqc, window):
    """`_linear_part` with the weights decayed by γ^(t−s), from its shifted keys fk, v1 and query chunks fqc
    (`[B, H, N, C, ·]`). Shifted key c of padded chunk n sits at s = nC + c − W and query i of chunk n at
    t = nC + i, so inside a chunk the weight is γ^(i−c+W) (c ≤ i); each chunk's keys are summed decayed to the
    chunk's last key (γ^(C−1−c)); the chunks before n reach it through a decayed exclusive sum (γ^((n−1−m)C)
    from chunk m), read by query i with γ^(i+1+W); the carried state kv0, decayed to the token before the call,
    reaches query t with γ^(t+1). A per-head γ adds a leading head dim to every power, placed before the chunk dim.
    """
    decay, device = x.decay, fqc.device
    num_chunks, chunk_size = fqc.shape[2], fqc.shape[3]
    pos = torch.arange(chunk_size, device=device)
    inside = decay_powers(decay, pos[:, None] - pos[None, :]) * decay_factor(decay, window, 2)  # [(H,) C, C]: γ^(i−c+W), 0 for c > i
    a_lin = (fqc @ fk.transpose(-1, -2)) * inside.unsqueeze(-3)  # [B, H, N, C, C]
    to_end = decay_powers(decay, chunk_size - 1 - pos)[..., None].unsqueeze(-3)  # [(H,) 1, C, 1]: γ^(C−1−c)
    chunk_kv = ((fk * to_end).transpose(-1, -2) @ v1).flatten(3)  # [B, H, N, F·(V + 1)]
    chunk = torch.arange(num_chunks, device=device)
    before = decay_powers(decay, (chunk[:, None] - 1 - chunk[None, :]) * chunk_size)  # [(H,) N, N]: γ^((n−1−m)C), m < n
    kv = (before @ chunk_kv).unflatten(-1, x.kv0.shape[-2:]) * decay_factor(decay, window, 3)  # [B, H, N, F, V + 1]
    if x.has_state:  # kv0 reaches chunk n's query i with γ^(nC + i + 1): γ^(nC) here, γ^(i + 1) below
        kv = kv + x.kv0.unsqueeze(2) * decay_powers(decay, chunk * chunk_size)[..., None, None]
    fq_aged = fqc * decay_powers(decay, pos + 1)[..., None].unsqueeze(-3)  # [B, H, N, C, F]: γ^(i+1)
    return a_lin @ v1 + fq_aged @ kv  # [B, H, N, C, V + 1]


def _shifted(t, front, num_chunks, chunk_size):
    """`[B, H, P + T, ·]` → `[B, H, N, C, ·]`: the keys moved `front` positions later (zeros before),
    cut or zero-padded to N·C positions; what `F.pad` of the whole front/back padding then slicing
    gives, without materializing the padded tail."""
    span = num_chunks * chunk_size
    zeros_before = min(front, span)  # a window longer than the whole call shifts every key out
    kept = min(span - zeros_before, t.shape[2])
    t = torch.nn.functional.pad(t[:, :, :kept], (0, 0, zeros_before, span - zeros_before - kept))  # [B, H, N·C, ·]
    return t.unflatten(2, (num_chunks, chunk_size))  # [B, H, N, C, ·]


def _chunks(t, num_chunks, chunk_size):
    """`[B, H, T, ·]` → `[B, H, N, C, ·]`, zero-padded at the end to N·C tokens."""
    extra = num_chunks * chunk_size - t.shape[2]
    if extra:
        t = torch.nn.functional.pad(t, (0, 0, 0, extra))  # [B, H, N·C, ·]
    return t.unflatten(2, (num_chunks, chunk_size))  # [B, H, N, C, ·]


def chunk_window_linear_attn_torch(
    q, k, v, fq, fk, window_logit, *, window_size=64, scale=None, initial_state=None,
    output_final_state=False, chunk_size=64, sink_tokens=0, linear_half_life=None,
):
    """Chunked form, never a T×T matrix: each query chunk of C tokens takes its window keys from a
    `[C, W + C]` key block (the previous W keys and its own) and its linear keys from the padded chunk
    W tokens earlier (a `[C, C]` triangle) plus the running linear state of everything older. Sinks inside
    the block join its mask; sinks before it are a `[C, N]` score block sharing the row max."""
    check_chunk_size(chunk_size)
    x = prepare_inputs(q, k, v, fq, fk, window_logit, window_size, scale, initial_state, sink_tokens,
                       linear_half_life)
    seq_len = x.q.shape[2]
    num_chunks = -(-seq_len // chunk_size)
    front, back = window_size - x.prefix, num_chunks * chunk_size - seq_len

    def pad(t):
        return torch.nn.functional.pad(t, (0, 0, front, back))  # [B, H, W + N·C, ·]

    num_den = _window_part(x, window_size, chunk_size, num_chunks, pad)
    num_den = num_den + _linear_part(x, front, chunk_size, num_chunks)  # [B, H, N, C, V + 1]
    num_den = num_den.flatten(2, 3)[:, :, :seq_len]  # [B, H, T, V + 1]
    final = final_state(x, window_size) if output_final_state else None
    return divide_output(num_den, v.dtype), final
