"""Pure-PyTorch LoLCATs hybrid attention (sliding-window softmax + linear attention over older keys)
in three forms with one signature: `parallel_window_linear_attn` (quadratic), `chunk_window_linear_attn_torch`
(chunked, never a T×T matrix) and `recurrent_window_linear_attn` (token by token: decoding and oracle).

Shapes: q `[B, T, H, D]`; k `[B, T, H_kv, D]`; v `[B, T, H_kv, V]`; fq, fk `[B, T, H, F]` (feature-mapped
queries/keys); window_logit `[H]`. Returns `(o [B, T, H, V] in v.dtype, WindowLinearState or None)`.

For query t, window keys s ∈ (t−W, t] and linear keys s ≤ t−W:
  a_sm(t, s)  = sigmoid(window_logit_h) · exp(scale · q_t·k_s − c_t),  c_t = max window score of row t
  a_lin(t, s) = fq_t · fk_s
  o_t = (Σ a_sm v_s + Σ a_lin v_s) / (Σ a_sm + Σ a_lin)
The window always holds s = t, so c_t is finite and Σ a_sm > 0: fq = fk = 0 gives the pure
sliding-window softmax baseline. Everything is computed in fp32; the state is fp32.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .._common import (
    append_ones, check_chunk_size, check_heads, check_same_tokens, floored_exp, heads_first_fp32,
    masked_exp,
)


class WindowLinearState(NamedTuple):
    """Everything a continuation needs. With W' = min(W, tokens seen):
    kv `[B, H, F, V + 1]`: Σ fk_s [v_s, 1]ᵀ over keys that left the cache;
    k `[B, H_kv, W', D]`, v `[B, H_kv, W', V]`, fk `[B, H, W', F]`: the last W' raw keys, values and key
    features (the oldest is already a linear key for the next query)."""

    kv: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    fk: torch.Tensor


class _Inputs(NamedTuple):
    """fp32 heads-first inputs with the cached prefix of P keys prepended to the keys."""

    q: torch.Tensor  # [B, H, T, D], already scaled
    fq: torch.Tensor  # [B, H, T, F]
    v1: torch.Tensor  # [B, H, P + T, V + 1]
    fk: torch.Tensor  # [B, H, P + T, F]
    kv0: torch.Tensor  # [B, H, F, V + 1]
    gamma: torch.Tensor  # [H, 1, 1]
    prefix: int  # P
    k_raw: torch.Tensor  # [B, H_kv, P + T, D]
    v_raw: torch.Tensor  # [B, H_kv, P + T, V]
    has_state: bool  # False: kv0 is the zero state of a fresh sequence


def _check_inputs(q, k, v, fq, fk, window_logit, window_size):
    check_same_tokens(q=q, k=k, v=v, fq=fq, fk=fk)
    if window_size < 1:
        raise ValueError(f"window_size must be >= 1, got {window_size}")
    if k.shape[2] != v.shape[2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"k {tuple(k.shape)} must match v's heads and q's width (q {tuple(q.shape)}, v {tuple(v.shape)})"
        )
    if fq.shape[2:] != fk.shape[2:] or fq.shape[2] != q.shape[2]:
        raise ValueError(
            f"fq {tuple(fq.shape)} and fk {tuple(fk.shape)} must both have q's {q.shape[2]} heads and one width"
        )
    if tuple(window_logit.shape) != (q.shape[2],):
        raise ValueError(f"window_logit must have shape ({q.shape[2]},), got {tuple(window_logit.shape)}")
    check_heads(q.shape[2], k.shape[2])


def _empty_state(q, k, v, fq):
    """The state of an empty prefix: zero linear state, no cached keys."""
    batch, _, heads, _ = q.shape
    fp32 = dict(dtype=torch.float32, device=q.device)
    return WindowLinearState(
        kv=torch.zeros(batch, heads, fq.shape[-1], v.shape[-1] + 1, **fp32),
        k=torch.zeros(batch, k.shape[2], 0, k.shape[-1], **fp32),
        v=torch.zeros(batch, v.shape[2], 0, v.shape[-1], **fp32),
        fk=torch.zeros(batch, heads, 0, fq.shape[-1], **fp32),
    )


def _initial_state(q, k, v, fq, initial_state, window_size):
    """The validated fp32 starting state (empty when `initial_state` is None)."""
    empty = _empty_state(q, k, v, fq)
    if initial_state is None:
        return empty
    state = WindowLinearState(*(t.float() for t in initial_state))
    for name, got, want in zip(WindowLinearState._fields, state, empty):
        if got.shape[:2] != want.shape[:2] or got.shape[3:] != want.shape[3:]:
            raise ValueError(
                f"initial_state.{name} has shape {tuple(got.shape)}, expected like {tuple(want.shape)}"
            )
    cached = state.k.shape[2]
    if cached > window_size or not cached == state.v.shape[2] == state.fk.shape[2]:
        raise ValueError(f"initial_state caches {cached} keys; expected one count <= window_size={window_size}")
    return state


def _after_prefix(cached, x):
    """The cached prefix `[B, H_x, P, ·]` followed by x `[B, T, H_x, ·]` → fp32 `[B, H_x, P + T, ·]`
    (no concatenation copy when nothing is cached)."""
    x = x.float().transpose(1, 2)  # [B, H_x, T, ·]
    return torch.cat([cached, x], dim=2) if cached.shape[2] else x


def _prepare(q, k, v, fq, fk, window_logit, window_size, scale, initial_state):
    _check_inputs(q, k, v, fq, fk, window_logit, window_size)
    state = _initial_state(q, k, v, fq, initial_state, window_size)
    heads = q.shape[2]
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    k_all = _after_prefix(state.k, k)  # [B, H_kv, P + T, D]
    v_all = _after_prefix(state.v, v)  # [B, H_kv, P + T, V]
    group = heads // k.shape[2]
    return _Inputs(
        q=heads_first_fp32(q, heads) * scale,
        fq=heads_first_fp32(fq, heads),
        v1=append_ones(v_all.repeat_interleave(group, dim=1)),  # [B, H, P + T, V + 1]
        fk=_after_prefix(state.fk, fk),  # [B, H, P + T, F]
        kv0=state.kv,
        gamma=torch.sigmoid(window_logit.float()).view(heads, 1, 1),  # [H, 1, 1]
        prefix=state.k.shape[2],
        k_raw=k_all,
        v_raw=v_all,
        has_state=initial_state is not None,
    )


def _final_state(inputs, window_size):
    """State after the last token: keys older than the last W join kv; the last W' stay cached."""
    num_old = max(inputs.k_raw.shape[2] - window_size, 0)
    old_fk, old_v1 = inputs.fk[:, :, :num_old], inputs.v1[:, :, :num_old]  # [B, H, n_old, F / V + 1]
    return WindowLinearState(
        kv=inputs.kv0 + old_fk.transpose(-1, -2) @ old_v1,  # [B, H, F, V + 1]
        k=inputs.k_raw[:, :, num_old:],
        v=inputs.v_raw[:, :, num_old:],
        fk=inputs.fk[:, :, num_old:],
    )


def _combine(scores, window, linear, fq, fk, v1, kv, gamma):
    """Hybrid numerator and normalizer `[..., Tq, V + 1]` from raw softmax scores `[..., Tq, Tk]`,
    the window / linear key masks `[..., Tq, Tk]` and the linear state `kv` of the older keys."""
    scores = scores.masked_fill(~window, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)  # c_t, finite: every row's window holds s = t
    a_sm = gamma * masked_exp(scores - row_max, window)  # [..., Tq, Tk]
    a_lin = (fq @ fk.transpose(-1, -2)) * linear  # [..., Tq, Tk]
    return (a_sm + a_lin) @ v1 + fq @ kv


def _divide(num_den, dtype):
    """`[B, H, T, V + 1]` → `[B, T, H, V]` in `dtype`."""
    return (num_den[..., :-1] / num_den[..., -1:]).transpose(1, 2).to(dtype)


def parallel_window_linear_attn(
    q, k, v, fq, fk, window_logit, *, window_size=64, scale=None, initial_state=None,
    output_final_state=False, chunk_size=None,
):
    """Quadratic masked form over all `P + T` keys. `chunk_size` is accepted and ignored."""
    x = _prepare(q, k, v, fq, fk, window_logit, window_size, scale, initial_state)
    seq_len = x.q.shape[2]
    query_pos = torch.arange(seq_len, device=x.q.device)
    key_pos = torch.arange(-x.prefix, seq_len, device=x.q.device)
    distance = query_pos[:, None] - key_pos[None, :]  # [T, P + T]
    window = (distance >= 0) & (distance < window_size)
    linear = distance >= window_size
    k = x.k_raw.repeat_interleave(x.q.shape[1] // x.k_raw.shape[1], dim=1)  # [B, H, P + T, D]
    scores = x.q @ k.transpose(-1, -2)  # [B, H, T, P + T]
    num_den = _combine(scores, window, linear, x.fq, x.fk, x.v1, x.kv0, x.gamma)
    final = _final_state(x, window_size) if output_final_state else None
    return _divide(num_den, v.dtype), final


def _window_keys(num_chunks, chunk_size, window_size, front, device):
    """`[N, C, W + C]` bool mask of the window keys of each query chunk's key block: block key j is a
    window key of chunk query i when 0 <= W + i - j < W and it is not front padding."""
    query_idx = torch.arange(chunk_size, device=device)
    key_idx = torch.arange(window_size + chunk_size, device=device)
    distance = (window_size + query_idx)[:, None] - key_idx[None, :]  # [C, W + C]
    chunk_start = torch.arange(num_chunks, device=device)[:, None, None] * chunk_size  # [N, 1, 1]
    is_key = chunk_start + key_idx >= front  # [N, 1, W + C]: front padding is not a key
    return (distance >= 0) & (distance < window_size) & is_key  # [N, C, W + C]


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
    window = _window_keys(num_chunks, chunk_size, window_size, window_size - x.prefix, scores.device)
    window = window.unsqueeze(1)  # [N, 1, C, W + C]: the same keys for every head of the group
    scores.masked_fill_(~window, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)  # [B, H_kv, N, G, C, 1]: c_t, finite as s = t is a key
    a_sm = masked_exp(scores - row_max, window)  # exp(score − c_t) on window keys, 0 elsewhere
    num_den = a_sm.flatten(3, 4) @ blocks(append_ones(x.v_raw))  # [B, H_kv, N, G·C, V + 1]
    # γ scales the product, not the [C, W + C] weights: fewer elements, and when q/k/v need no gradient
    # (attention transfer) the whole block product stays outside the autograd graph.
    gamma = x.gamma.view(kv_heads, 1, group, 1, 1)  # [H_kv, 1, G, 1, 1]
    num_den = num_den.unflatten(3, (group, chunk_size)) * gamma  # [B, H_kv, N, G, C, V + 1]
    return num_den.transpose(2, 3).flatten(1, 2)  # [B, H, N, C, V + 1]


def _linear_part(x, front, chunk_size, num_chunks):
    """Linear-attention numerator/normalizer of every query chunk → `[B, H, N, C, V + 1]`.

    The linear keys of query i in chunk n are the keys up to W before it: in the key block they are
    padded chunk n's keys j <= i (a lower triangle, never the rest of the block), and all keys before
    padded chunk n reach it through the state `kv_n = kv0 + Σ_{m<n} fk_mᵀ [v_m, 1]` (an exclusive
    cumulative sum over chunks)."""
    fk = _shifted(x.fk, front, num_chunks, chunk_size)  # [B, H, N, C, F]
    v1 = _shifted(x.v1, front, num_chunks, chunk_size)  # [B, H, N, C, V + 1]
    fqc = _chunks(x.fq, num_chunks, chunk_size)  # [B, H, N, C, F]
    a_lin = (fqc @ fk.transpose(-1, -2)).tril_()  # [B, H, N, C, C]
    chunk_kv = (fk.transpose(-1, -2) @ v1).flatten(3)  # [B, H, N, F·(V + 1)]: the keys each chunk holds
    # Exclusive prefix sum over chunks as one small matmul (cheaper than cumsum and its flip-backward).
    before = torch.ones(num_chunks, num_chunks, device=fk.device).tril_(diagonal=-1)  # [N, N]: m < n
    kv = (before @ chunk_kv).unflatten(-1, x.kv0.shape[-2:])  # [B, H, N, F, V + 1]
    if x.has_state:  # a fresh sequence's kv0 is zeros: adding it would be a full pass over every state
        kv = x.kv0.unsqueeze(2) + kv
    return a_lin @ v1 + fqc @ kv  # [B, H, N, C, V + 1]


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
    output_final_state=False, chunk_size=64,
):
    """Chunked form, never a T×T matrix: each query chunk of C tokens takes its window keys from a
    `[C, W + C]` key block (the previous W keys and its own) and its linear keys from the padded chunk
    W tokens earlier (a `[C, C]` triangle) plus the running linear state of everything older."""
    check_chunk_size(chunk_size)
    x = _prepare(q, k, v, fq, fk, window_logit, window_size, scale, initial_state)
    seq_len = x.q.shape[2]
    num_chunks = -(-seq_len // chunk_size)
    front, back = window_size - x.prefix, num_chunks * chunk_size - seq_len

    def pad(t):
        return torch.nn.functional.pad(t, (0, 0, front, back))  # [B, H, W + N·C, ·]

    num_den = _window_part(x, window_size, chunk_size, num_chunks, pad)
    num_den = num_den + _linear_part(x, front, chunk_size, num_chunks)  # [B, H, N, C, V + 1]
    num_den = num_den.flatten(2, 3)[:, :, :seq_len]  # [B, H, T, V + 1]
    final = _final_state(x, window_size) if output_final_state else None
    return _divide(num_den, v.dtype), final


def recurrent_window_linear_attn(
    q, k, v, fq, fk, window_logit, *, window_size=64, scale=None, initial_state=None,
    output_final_state=False, chunk_size=None,
):
    """Token-by-token form over a cache of at most W keys; a `T = 1` call is one step."""
    _check_inputs(q, k, v, fq, fk, window_logit, window_size)
    state = _initial_state(q, k, v, fq, initial_state, window_size)
    heads = q.shape[2]
    group = heads // k.shape[2]
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    gamma = torch.sigmoid(window_logit.float()).view(heads, 1)  # [H, 1]
    outputs = []
    for t in range(q.shape[1]):
        state = _push_key(state, k[:, t], v[:, t], fk[:, t], window_size, group)
        q_t = q[:, t].float() * scale  # [B, H, D]
        scores = (state.k.repeat_interleave(group, dim=1) @ q_t.unsqueeze(-1)).squeeze(-1)  # [B, H, W']
        a_sm = gamma * floored_exp(scores - scores.amax(dim=-1, keepdim=True))  # [B, H, W']
        v1 = append_ones(state.v.repeat_interleave(group, dim=1))  # [B, H, W', V + 1]
        fq_t = fq[:, t].float().unsqueeze(-2)  # [B, H, 1, F]
        outputs.append((a_sm.unsqueeze(-2) @ v1 + fq_t @ state.kv).squeeze(-2))  # [B, H, V + 1]
    num_den = torch.stack(outputs, dim=2)  # [B, H, T, V + 1]
    return _divide(num_den, v.dtype), (state if output_final_state else None)


def _push_key(state, k_t, v_t, fk_t, window_size, group):
    """Append one token's key/value/feature (`[B, H_kv, D]`, `[B, H_kv, V]`, `[B, H, F]`) to the cache;
    when the cache exceeds W keys, its oldest key becomes linear and moves into kv."""
    cache_k = torch.cat([state.k, k_t.float().unsqueeze(2)], dim=2)  # [B, H_kv, W' + 1, D]
    cache_v = torch.cat([state.v, v_t.float().unsqueeze(2)], dim=2)  # [B, H_kv, W' + 1, V]
    cache_fk = torch.cat([state.fk, fk_t.float().unsqueeze(2)], dim=2)  # [B, H, W' + 1, F]
    kv = state.kv
    if cache_k.shape[2] > window_size:
        old_v1 = append_ones(cache_v[:, :, 0].repeat_interleave(group, dim=1))  # [B, H, V + 1]
        kv = kv + cache_fk[:, :, 0, :, None] * old_v1[:, :, None, :]  # [B, H, F, V + 1]
        cache_k, cache_v, cache_fk = cache_k[:, :, 1:], cache_v[:, :, 1:], cache_fk[:, :, 1:]
    return WindowLinearState(kv=kv, k=cache_k, v=cache_v, fk=cache_fk)
