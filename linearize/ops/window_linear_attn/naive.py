"""Pure-PyTorch LoLCATs hybrid attention (sliding-window softmax + linear attention over older keys),
the obvious forms (the oracles of the tuned ones): `parallel_window_linear_attn` (quadratic;
`window_linear_attn_weights` gives its weights) and `recurrent_window_linear_attn` (token by token: also
the decoding step). The tuned CPU path, `chunk.chunk_window_linear_attn_torch` (never a T×T matrix), and
the Triton kernel have the same signature.

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
    append_ones, check_heads, check_same_tokens, floored_exp, heads_first_fp32, key_lag, masked_exp,
    sliding_window_mask,
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


def prepare_inputs(q, k, v, fq, fk, window_logit, window_size, scale, initial_state):
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


def final_state(inputs, window_size):
    """State after the last token: keys older than the last W join kv; the last W' stay cached."""
    num_old = max(inputs.k_raw.shape[2] - window_size, 0)
    old_fk, old_v1 = inputs.fk[:, :, :num_old], inputs.v1[:, :, :num_old]  # [B, H, n_old, F / V + 1]
    return WindowLinearState(
        kv=inputs.kv0 + old_fk.transpose(-1, -2) @ old_v1,  # [B, H, F, V + 1]
        k=inputs.k_raw[:, :, num_old:],
        v=inputs.v_raw[:, :, num_old:],
        fk=inputs.fk[:, :, num_old:],
    )


def _hybrid_weights(scores, window, linear, fq, fk, gamma):
    """Unnormalized hybrid weights `[..., Tq, Tk]`: γ · exp(score − c_t) on window keys plus fq·fk on linear
    keys, from raw softmax scores `[..., Tq, Tk]` and the window / linear key masks `[Tq, Tk]`."""
    scores = scores.masked_fill(~window, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)  # c_t, finite: every row's window holds s = t
    a_sm = gamma * masked_exp(scores - row_max, window)  # [..., Tq, Tk]
    a_lin = (fq @ fk.transpose(-1, -2)) * linear  # [..., Tq, Tk]
    return a_sm + a_lin


def _parallel_weights(x, window_size):
    """The unnormalized hybrid weights of every query over all `P + T` keys → `[B, H, T, P + T]`."""
    seq_len, num_keys = x.q.shape[2], x.k_raw.shape[2]
    lag = key_lag(seq_len, num_keys, x.prefix, x.q.device)  # [T, P + T]
    window = sliding_window_mask(seq_len, num_keys, window_size, x.prefix, x.q.device)
    k = x.k_raw.repeat_interleave(x.q.shape[1] // x.k_raw.shape[1], dim=1)  # [B, H, P + T, D]
    scores = x.q @ k.transpose(-1, -2)  # [B, H, T, P + T]
    return _hybrid_weights(scores, window, lag >= window_size, x.fq, x.fk, x.gamma)


def divide_output(num_den, dtype):
    """`[B, H, T, V + 1]` → `[B, T, H, V]` in `dtype`."""
    return (num_den[..., :-1] / num_den[..., -1:]).transpose(1, 2).to(dtype)


def parallel_window_linear_attn(
    q, k, v, fq, fk, window_logit, *, window_size=64, scale=None, initial_state=None,
    output_final_state=False, chunk_size=None,
):
    """Quadratic masked form over all `P + T` keys. `chunk_size` is accepted and ignored."""
    x = prepare_inputs(q, k, v, fq, fk, window_logit, window_size, scale, initial_state)
    num_den = _parallel_weights(x, window_size) @ x.v1 + x.fq @ x.kv0  # [B, H, T, V + 1]
    final = final_state(x, window_size) if output_final_state else None
    return divide_output(num_den, v.dtype), final


def window_linear_attn_weights(q, k, fq, fk, window_logit, *, window_size=64, scale=None):
    """The parallel form's attention weights `[B, H, T, T]` on a fresh sequence (`o = A v`), fp32, rows
    summing to 1; same inputs as `parallel_window_linear_attn` without v."""
    v = k.new_zeros(k.shape[:3] + (1,))  # [B, T, H_kv, 1]: only its shape is read
    x = prepare_inputs(q, k, v, fq, fk, window_logit, window_size, scale, None)
    weights = _parallel_weights(x, window_size)  # [B, H, T, T]
    return weights / weights.sum(-1, keepdim=True)


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
    return divide_output(num_den, v.dtype), (state if output_final_state else None)


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
