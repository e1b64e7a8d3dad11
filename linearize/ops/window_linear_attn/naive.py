"""Pure-PyTorch LoLCATs hybrid attention (sliding-window softmax + linear attention over older keys),
the obvious forms (the oracles of the tuned ones): `parallel_window_linear_attn` (quadratic;
`window_linear_attn_weights` gives its weights) and `recurrent_window_linear_attn` (token by token: also
the decoding step). The tuned CPU path, `chunk.chunk_window_linear_attn_torch` (never a T×T matrix), and
the Triton kernel have the same signature.

Shapes: q `[B, T, H, D]`; k `[B, T, H_kv, D]`; v `[B, T, H_kv, V]`; fq, fk `[B, T, H, F]` (feature-mapped
queries/keys); window_logit `[H]`. Returns `(o [B, T, H, V] in v.dtype, WindowLinearState or None)`.

For query t, softmax keys s ∈ (t−W, t] ∪ {s < N, s ≤ t} (the window plus the first N keys, the
attention sinks, `sink_tokens=N`) and linear keys: every other s ≤ t−W:
  a_sm(t, s)  = sigmoid(window_logit_h) · exp(scale · q_t·k_s − c_t),  c_t = max softmax score of row t
  a_lin(t, s) = fq_t · fk_s
  o_t = (Σ a_sm v_s + Σ a_lin v_s) / (Σ a_sm + Σ a_lin)
With `linear_half_life=H` the linear weights decay with the key's distance: a_lin(t, s) = fq_t · fk_s ·
γ^(t−s), γ = 2^(−1/H), so the linear keys' mass is bounded (by ~H/ln 2 keys' worth) instead of growing with
the context; None (the default) is the undecayed LoLCATs form. H is one number, or a tensor `[H]` of one
half-life per query head (gradients reach it: a learned half-life).
The window always holds s = t, so c_t is finite and Σ a_sm > 0: fq = fk = 0 gives the pure
sliding-window softmax baseline. A sink key is softmax for every later query and never linear: it never
enters the linear state, and every form computes with its key feature set to 0 (a zero fk contributes no
linear weight), so the linear part needs no mask of its own. Everything is computed in fp32; the state is
fp32.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .._common import (
    append_ones, check_heads, check_same_tokens, floored_exp, heads_first_fp32, key_lag, masked_exp,
    sliding_window_sink_mask,
)


class WindowLinearState(NamedTuple):
    """Everything a continuation needs. With C = min(N + W, tokens seen) cached keys:
    kv `[B, H, F, V + 1]`: Σ fk_s [v_s, 1]ᵀ over keys that left the cache (with a half-life, each term
    decayed to the last token seen: γ^(τ−s), τ that token's position);
    k `[B, H_kv, C, D]`, v `[B, H_kv, C, V]`, fk `[B, H, C, F]`: the raw keys, values and key features of
    the first min(N, seen) tokens (the sinks; their fk is 0) followed by the last tokens (at most W; the
    oldest is already a linear key for the next query). As long as no key has left, the cache is every
    token in order; after that it is the N sinks and the last W tokens, so in the key sequence
    [cache, new tokens] a key's index below N marks a sink and every other key's lag to a query is its
    index distance, as in a fresh sequence."""

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
    sink_tokens: int  # N: keys 0..N-1 of the P + T are sinks
    decay: Optional[object] = None  # γ = 2^(−1/H) per token of distance (a float, or `[H]` per head), or None


def linear_decay(half_life):
    """γ = 2^(−1/half_life): a float for one half-life, an fp32 tensor `[H]` for a tensor of one per query
    head (differentiable in it), or None without a half-life."""
    if half_life is None:
        return None
    if isinstance(half_life, torch.Tensor):
        if half_life.dim() != 1 or not bool((half_life > 0).all()):
            raise ValueError(f"linear_half_life must be > 0 tokens, one per head, got {half_life}")
        return torch.exp2(-1.0 / half_life.float())
    if not half_life > 0:
        raise ValueError(f"linear_half_life must be > 0 tokens, got {half_life}")
    return 2.0 ** (-1.0 / half_life)


def decay_powers(decay, exponents: torch.Tensor) -> torch.Tensor:
    """γ^e elementwise, fp32, for integer exponents e ≥ 0 (negative ones, masked out by the caller, give 0):
    `[*e]` for one γ, `[H, *e]` for one per head."""
    e = exponents.float()
    if isinstance(decay, torch.Tensor):
        log2 = torch.log2(decay).view(-1, *([1] * e.dim()))  # [H, 1, ...]
    else:
        log2 = math.log2(decay)
    return torch.where(e >= 0, torch.exp2(e.clamp_min(0) * log2), torch.zeros_like(e))


def decay_factor(decay, exponent: int, trailing: int):
    """γ^exponent scaling a `[B, H, ...]` tensor with `trailing` dims after the heads: a float for one γ,
    `[H, 1 × trailing]` for one per head."""
    if isinstance(decay, torch.Tensor):
        return (decay**exponent).view(-1, *([1] * trailing))
    return decay**exponent


def _check_inputs(q, k, v, fq, fk, window_logit, window_size, sink_tokens=0):
    check_same_tokens(q=q, k=k, v=v, fq=fq, fk=fk)
    if window_size < 1:
        raise ValueError(f"window_size must be >= 1, got {window_size}")
    if sink_tokens < 0:
        raise ValueError(f"sink_tokens must be >= 0, got {sink_tokens}")
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


def _initial_state(q, k, v, fq, initial_state, window_size, sink_tokens=0):
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
    if cached > window_size + sink_tokens or not cached == state.v.shape[2] == state.fk.shape[2]:
        raise ValueError(
            f"initial_state caches {cached} keys; expected one count <= window_size={window_size} + "
            f"sink_tokens={sink_tokens}"
        )
    return state


def cache_split(num_keys, window_size, sink_tokens):
    """Where a key sequence of `num_keys` (cache + new tokens) splits for the next call's state →
    (sinks, old_end): keys [0, sinks) stay cached as sinks, keys [sinks, old_end) join the linear state,
    keys [old_end, num_keys) (at most W) stay cached as the window."""
    sinks = min(sink_tokens, num_keys)
    return sinks, max(num_keys - window_size, sinks)


def zero_sink_features(fk, sink_tokens, dim):
    """fk with its first `sink_tokens` entries along `dim` (the sink keys) set to 0, out of place so
    gradients flow (as zeros) to the caller's fk; fk itself when there are no sinks."""
    if sink_tokens <= 0:
        return fk
    keep = torch.arange(fk.shape[dim], device=fk.device) >= sink_tokens  # [L]
    return fk * keep.view(-1, *([1] * (fk.dim() - dim - 1))).to(fk.dtype)


def _after_prefix(cached, x):
    """The cached prefix `[B, H_x, P, ·]` followed by x `[B, T, H_x, ·]` → fp32 `[B, H_x, P + T, ·]`
    (no concatenation copy when nothing is cached)."""
    x = x.float().transpose(1, 2)  # [B, H_x, T, ·]
    return torch.cat([cached, x], dim=2) if cached.shape[2] else x


def prepare_inputs(q, k, v, fq, fk, window_logit, window_size, scale, initial_state, sink_tokens=0,
                   linear_half_life=None):
    _check_inputs(q, k, v, fq, fk, window_logit, window_size, sink_tokens)
    state = _initial_state(q, k, v, fq, initial_state, window_size, sink_tokens)
    heads = q.shape[2]
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    k_all = _after_prefix(state.k, k)  # [B, H_kv, P + T, D]
    v_all = _after_prefix(state.v, v)  # [B, H_kv, P + T, V]
    group = heads // k.shape[2]
    return _Inputs(
        q=heads_first_fp32(q, heads) * scale,
        fq=heads_first_fp32(fq, heads),
        v1=append_ones(v_all.repeat_interleave(group, dim=1)),  # [B, H, P + T, V + 1]
        fk=zero_sink_features(_after_prefix(state.fk, fk), sink_tokens, dim=2),  # [B, H, P + T, F]
        kv0=state.kv,
        gamma=torch.sigmoid(window_logit.float()).view(heads, 1, 1),  # [H, 1, 1]
        prefix=state.k.shape[2],
        k_raw=k_all,
        v_raw=v_all,
        has_state=initial_state is not None,
        sink_tokens=sink_tokens,
        decay=linear_decay(linear_half_life),
    )


def final_state(inputs, window_size):
    """State after the last token: the sinks and the last W keys stay cached; the keys between join kv."""
    sinks, old_end = cache_split(inputs.k_raw.shape[2], window_size, inputs.sink_tokens)
    old_fk, old_v1 = inputs.fk[:, :, sinks:old_end], inputs.v1[:, :, sinks:old_end]  # [B, H, n_old, F / V + 1]

    def cached(t):  # [B, H_x, P + T, ·] → [B, H_x, C, ·]
        return torch.cat([t[:, :, :sinks], t[:, :, old_end:]], dim=2) if sinks else t[:, :, old_end:]

    if inputs.decay is None:
        kv = inputs.kv0 + old_fk.transpose(-1, -2) @ old_v1  # [B, H, F, V + 1]
    else:  # every term decayed to the last key (index P + T − 1); kv0 was decayed to the prefix's last (P − 1)
        last = inputs.k_raw.shape[2] - 1
        ages = last - torch.arange(sinks, old_end, device=old_fk.device)  # [n_old]
        old_fk = old_fk * decay_powers(inputs.decay, ages)[..., None]  # [B, H, n_old, F]
        tokens = inputs.k_raw.shape[2] - inputs.prefix  # T: steps kv0 decays through
        kv = inputs.kv0 * decay_factor(inputs.decay, tokens, 2) + old_fk.transpose(-1, -2) @ old_v1  # [B, H, F, V + 1]
    return WindowLinearState(
        kv=kv,
        k=cached(inputs.k_raw),
        v=cached(inputs.v_raw),
        fk=cached(inputs.fk),
    )


def _hybrid_weights(scores, window, linear, fq, fk, gamma):
    """Unnormalized hybrid weights `[..., Tq, Tk]`: γ · exp(score − c_t) on window keys plus fq·fk on linear
    keys, from raw softmax scores `[..., Tq, Tk]`, the window key mask `[Tq, Tk]` and the linear keys' weights
    `[Tq, Tk]` (0/1, or their decay γ^(t−s))."""
    scores = scores.masked_fill(~window, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)  # c_t, finite: every row's window holds s = t
    a_sm = gamma * masked_exp(scores - row_max, window)  # [..., Tq, Tk]
    a_lin = (fq @ fk.transpose(-1, -2)) * linear  # [..., Tq, Tk]
    return a_sm + a_lin


def _parallel_weights(x, window_size):
    """The unnormalized hybrid weights of every query over all `P + T` keys → `[B, H, T, P + T]`."""
    seq_len, num_keys = x.q.shape[2], x.k_raw.shape[2]
    lag = key_lag(seq_len, num_keys, x.prefix, x.q.device)  # [T, P + T]
    window = sliding_window_sink_mask(seq_len, num_keys, window_size, x.sink_tokens, x.prefix, x.q.device)
    k = x.k_raw.repeat_interleave(x.q.shape[1] // x.k_raw.shape[1], dim=1)  # [B, H, P + T, D]
    scores = x.q @ k.transpose(-1, -2)  # [B, H, T, P + T]
    linear = (lag >= window_size) & ~window  # a sink is never linear
    if x.decay is not None:
        linear = linear * decay_powers(x.decay, lag)  # [T, P + T] (or [H, T, P + T]): γ^(t−s) on linear keys
    return _hybrid_weights(scores, window, linear, x.fq, x.fk, x.gamma)


def _state_term(x):
    """What the carried state kv0 adds to every query `[B, H, T, V + 1]`; with a decay, query i of the call
    is i + 1 tokens after the state's last one."""
    if x.decay is None:
        return x.fq @ x.kv0
    steps = torch.arange(1, x.q.shape[2] + 1, device=x.q.device)  # [T]
    return (x.fq * decay_powers(x.decay, steps)[..., None]) @ x.kv0


def divide_output(num_den, dtype):
    """`[B, H, T, V + 1]` → `[B, T, H, V]` in `dtype`."""
    return (num_den[..., :-1] / num_den[..., -1:]).transpose(1, 2).to(dtype)


def parallel_window_linear_attn(
    q, k, v, fq, fk, window_logit, *, window_size=64, scale=None, initial_state=None,
    output_final_state=False, chunk_size=None, sink_tokens=0, linear_half_life=None,
):
    """Quadratic masked form over all `P + T` keys. `chunk_size` is accepted and ignored."""
    x = prepare_inputs(q, k, v, fq, fk, window_logit, window_size, scale, initial_state, sink_tokens,
                       linear_half_life)
    num_den = _parallel_weights(x, window_size) @ x.v1 + _state_term(x)  # [B, H, T, V + 1]
    final = final_state(x, window_size) if output_final_state else None
    return divide_output(num_den, v.dtype), final


def window_linear_attn_weights(q, k, fq, fk, window_logit, *, window_size=64, scale=None, sink_tokens=0,
                               linear_half_life=None):
    """The parallel form's attention weights `[B, H, T, T]` on a fresh sequence (`o = A v`), fp32, rows
    summing to 1; same inputs as `parallel_window_linear_attn` without v."""
    v = k.new_zeros(k.shape[:3] + (1,))  # [B, T, H_kv, 1]: only its shape is read
    x = prepare_inputs(q, k, v, fq, fk, window_logit, window_size, scale, None, sink_tokens, linear_half_life)
    weights = _parallel_weights(x, window_size)  # [B, H, T, T]
    return weights / weights.sum(-1, keepdim=True)


def recurrent_window_linear_attn(
    q, k, v, fq, fk, window_logit, *, window_size=64, scale=None, initial_state=None,
    output_final_state=False, chunk_size=None, sink_tokens=0, linear_half_life=None,
):
    """Token-by-token form over a cache of at most N + W keys (every cached key is a softmax key); a
    `T = 1` call is one step."""
    _check_inputs(q, k, v, fq, fk, window_logit, window_size, sink_tokens)
    state = _initial_state(q, k, v, fq, initial_state, window_size, sink_tokens)
    heads = q.shape[2]
    group = heads // k.shape[2]
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    gamma = torch.sigmoid(window_logit.float()).view(heads, 1)  # [H, 1]
    decay = linear_decay(linear_half_life)
    outputs = []
    for t in range(q.shape[1]):
        state = _push_key(state, k[:, t], v[:, t], fk[:, t], window_size, group, sink_tokens, decay)
        q_t = q[:, t].float() * scale  # [B, H, D]
        scores = (state.k.repeat_interleave(group, dim=1) @ q_t.unsqueeze(-1)).squeeze(-1)  # [B, H, W']
        a_sm = gamma * floored_exp(scores - scores.amax(dim=-1, keepdim=True))  # [B, H, W']
        v1 = append_ones(state.v.repeat_interleave(group, dim=1))  # [B, H, W', V + 1]
        fq_t = fq[:, t].float().unsqueeze(-2)  # [B, H, 1, F]
        outputs.append((a_sm.unsqueeze(-2) @ v1 + fq_t @ state.kv).squeeze(-2))  # [B, H, V + 1]
    num_den = torch.stack(outputs, dim=2)  # [B, H, T, V + 1]
    return divide_output(num_den, v.dtype), (state if output_final_state else None)


def _push_key(state, k_t, v_t, fk_t, window_size, group, sink_tokens=0, decay=None):
    """Append one token's key/value/feature (`[B, H_kv, D]`, `[B, H_kv, V]`, `[B, H, F]`) to the cache;
    when the cache exceeds N + W keys, its oldest non-sink key (index N) becomes linear and moves into kv.
    While the cache holds fewer than N keys it holds every token so far, so the new token is a sink.
    With a decay γ, kv first ages one token (×γ), and the key that moves in is W tokens old (×γ^W)."""
    if state.k.shape[2] < sink_tokens:
        fk_t = torch.zeros_like(fk_t)
    cache_k = torch.cat([state.k, k_t.float().unsqueeze(2)], dim=2)  # [B, H_kv, W' + 1, D]
    cache_v = torch.cat([state.v, v_t.float().unsqueeze(2)], dim=2)  # [B, H_kv, W' + 1, V]
    cache_fk = torch.cat([state.fk, fk_t.float().unsqueeze(2)], dim=2)  # [B, H, W' + 1, F]
    kv = state.kv if decay is None else state.kv * decay_factor(decay, 1, 2)
    if cache_k.shape[2] > window_size + sink_tokens:
        n = sink_tokens
        old_v1 = append_ones(cache_v[:, :, n].repeat_interleave(group, dim=1))  # [B, H, V + 1]
        old_fk = cache_fk[:, :, n] if decay is None else cache_fk[:, :, n] * decay_factor(decay, window_size, 1)  # [B, H, F]
        kv = kv + old_fk[:, :, :, None] * old_v1[:, :, None, :]  # [B, H, F, V + 1]
        cache_k, cache_v, cache_fk = (_drop(t, n) for t in (cache_k, cache_v, cache_fk))
    return WindowLinearState(kv=kv, k=cache_k, v=cache_v, fk=cache_fk)


def _drop(t, index):
    """`[B, H_x, C, ·]` without entry `index` of the cache dimension → `[B, H_x, C − 1, ·]`."""
    return torch.cat([t[:, :, :index], t[:, :, index + 1:]], dim=2) if index else t[:, :, 1:]
