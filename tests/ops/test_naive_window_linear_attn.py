"""Pure-PyTorch LoLCATs window + linear attention: the three forms agree with each other and with an
explicit-loop oracle, the window-only setting is sliding-window softmax, split-and-resume and decode
continue a prefill exactly, and chunk gradients match the parallel form."""
import pytest
import torch

from linearize.ops.window_linear_attn import (
    FORMS,
    WindowLinearState,
    window_linear_attn,
)

from helpers import rel_rms, window_linear_inputs

# fp32 forms differ only by summation order: ~1e-7 observed, 1e-5 leaves room for long sequences
TOL = 1e-5
HEADS, KV_HEADS, HEAD_DIM, FEATURE_DIM, VALUE_DIM = 4, 2, 16, 12, 8


def make_inputs(seq_len, batch=2, seed=0):
    return window_linear_inputs(batch, seq_len, HEADS, KV_HEADS, HEAD_DIM, FEATURE_DIM, VALUE_DIM, seed)


def sliced(inputs, start, stop):
    """The same inputs restricted to tokens [start, stop) (window_logit is per head, kept whole)."""
    *tokens, window_logit = inputs
    return [t[:, start:stop] for t in tokens] + [window_logit]


def oracle(q, k, v, fq, fk, window_logit, window_size, scale, sink_tokens=0, half_life=None):
    """Explicit loops over heads and queries, straight from the LoLCATs formula; the first `sink_tokens`
    keys join every later query's softmax keys and leave its linear keys; with `half_life` a linear key's
    weight is multiplied by 2^(−(t−s)/half_life). Computes in q's dtype."""
    batch, seq_len, heads, _ = q.shape
    group = heads // k.shape[2]
    out = torch.zeros(batch, seq_len, heads, v.shape[-1], dtype=q.dtype)
    for h in range(heads):
        kv_h = h // group
        gamma = torch.sigmoid(window_logit[h])
        for t in range(seq_len):
            window = [s for s in range(t + 1) if t - s < window_size or s < sink_tokens]
            scores = torch.stack([scale * (q[:, t, h] * k[:, s, kv_h]).sum(-1) for s in window], dim=-1)
            a_sm = gamma * (scores - scores.max(dim=-1, keepdim=True).values).exp()  # [B, n_window]
            num = sum(a_sm[:, i, None] * v[:, s, kv_h] for i, s in enumerate(window))
            den = a_sm.sum(-1)
            for s in sorted(set(range(t + 1)) - set(window)):
                a_lin = (fq[:, t, h] * fk[:, s, h]).sum(-1)
                if half_life is not None:  # one half-life, or one per head (a tensor `[H]`)
                    h_life = half_life[h] if isinstance(half_life, torch.Tensor) else half_life
                    a_lin = a_lin * 2.0 ** (-(t - s) / h_life)
                num = num + a_lin[:, None] * v[:, s, kv_h]
                den = den + a_lin
            out[:, t, h] = num / den[:, None]
    return out


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("window_size", [1, 3, 20])
def test_forms_match_explicit_oracle(form, window_size):
    inputs = make_inputs(11, batch=1)
    extra = {"chunk_size": 4} if form == "chunk" else {}
    out, _ = FORMS[form](*inputs, window_size=window_size, scale=0.3, **extra)
    assert rel_rms(out, oracle(*inputs, window_size=window_size, scale=0.3)) <= TOL


@pytest.mark.parametrize(
    "seq_len,window_size,chunk_size",
    [
        (1, 4, 16), (63, 8, 16), (63, 40, 16), (100, 16, 16),
        (100, 1, 24), (257, 64, 64), (257, 30, 50), (50, 80, 16),
    ],
)
def test_three_forms_agree(seq_len, window_size, chunk_size):
    inputs = make_inputs(seq_len)
    kw = dict(window_size=window_size, output_final_state=True)
    ref, ref_state = FORMS["parallel"](*inputs, **kw)
    for form, extra in [("chunk", {"chunk_size": chunk_size}), ("recurrent", {})]:
        out, state = FORMS[form](*inputs, **kw, **extra)
        assert out.shape == (2, seq_len, HEADS, VALUE_DIM)
        assert rel_rms(out, ref) <= TOL, form
        assert_states_close(state, ref_state)


def assert_states_close(state, ref_state):
    for name, got, want in zip(WindowLinearState._fields, state, ref_state):
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        # kv is all zero while every key is still cached: compare absolutely there
        assert (got - want).norm() <= TOL * max(want.norm().item(), 1.0), name


def test_state_caches_the_last_keys():
    inputs = make_inputs(10)
    q, k, v, fq, fk, _ = inputs
    _, short = window_linear_attn(*inputs, window_size=16, output_final_state=True)
    assert short.k.shape == (2, KV_HEADS, 10, HEAD_DIM) and short.fk.shape == (2, HEADS, 10, FEATURE_DIM)
    assert short.kv.abs().max() == 0  # no key has left a 16-token window yet
    _, state = window_linear_attn(*inputs, window_size=4, output_final_state=True)
    assert torch.equal(state.k, k[:, -4:].transpose(1, 2)) and torch.equal(state.v, v[:, -4:].transpose(1, 2))
    assert torch.equal(state.fk, fk[:, -4:].transpose(1, 2))
    assert state.kv.shape == (2, HEADS, FEATURE_DIM, VALUE_DIM + 1)


@pytest.mark.parametrize("split", [1, 5, 37, 64, 99])
@pytest.mark.parametrize("window_size", [8, 48])
def test_split_and_resume_equals_one_call(split, window_size):
    inputs = make_inputs(100)
    kw = dict(window_size=window_size, chunk_size=32, output_final_state=True)
    full, full_state = window_linear_attn(*inputs, **kw)
    head, state = window_linear_attn(*sliced(inputs, 0, split), **kw)
    tail, end_state = window_linear_attn(*sliced(inputs, split, 100), initial_state=state, **kw)
    assert rel_rms(torch.cat([head, tail], dim=1), full) <= TOL
    assert_states_close(end_state, full_state)


def test_decode_steps_continue_prefill():
    inputs = make_inputs(30)
    full, _ = window_linear_attn(*inputs, window_size=6, chunk_size=8)
    _, state = window_linear_attn(*sliced(inputs, 0, 22), window_size=6, chunk_size=8, output_final_state=True)
    steps = []
    for t in range(22, 30):
        out, state = window_linear_attn(
            *sliced(inputs, t, t + 1), window_size=6, initial_state=state, output_final_state=True, form="recurrent"
        )
        steps.append(out)
    assert rel_rms(torch.cat(steps, dim=1), full[:, 22:]) <= TOL


@pytest.mark.parametrize("form", list(FORMS))
def test_zero_features_give_sliding_window_softmax(form):
    q, k, v, fq, fk, window_logit = make_inputs(40)
    window_size = 7
    zeros = torch.zeros_like(fq)
    out, _ = FORMS[form](q, k, v, zeros, zeros, window_logit, window_size=window_size)
    pos = torch.arange(40)
    band = (pos[:, None] - pos[None, :] >= 0) & (pos[:, None] - pos[None, :] < window_size)  # [T, T]
    group = HEADS // KV_HEADS
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2).repeat_interleave(group, dim=1),
        v.transpose(1, 2).repeat_interleave(group, dim=1),
        attn_mask=band,
    ).transpose(1, 2)  # [B, T, H, V]
    assert torch.isfinite(out).all()
    assert rel_rms(out, ref) <= TOL


@pytest.mark.parametrize("options", [{}, {"sink_tokens": 2, "linear_half_life": 6.0}])  # plain; sinks + decay
@pytest.mark.parametrize("window_size,chunk_size", [(8, 16), (40, 16), (3, 4)])
def test_chunk_gradients_match_parallel(window_size, chunk_size, options):
    inputs = make_inputs(45)
    _, state = window_linear_attn(*make_inputs(20, seed=1), window_size=window_size, output_final_state=True,
                                  **options)
    grads = {}
    for form, extra in [("parallel", {}), ("chunk", {"chunk_size": chunk_size})]:
        leaves = [t.clone().requires_grad_() for t in (*inputs, *state)]
        initial_state = WindowLinearState(*leaves[6:])
        out, final = FORMS[form](
            *leaves[:6], window_size=window_size, initial_state=initial_state, output_final_state=True, **extra,
            **options,
        )
        weight = torch.linspace(-1, 1, out.numel()).view_as(out)
        loss = (out * weight).sum() + sum(t.square().sum() for t in final)
        loss.backward()
        grads[form] = [t.grad for t in leaves]
    names = "q k v fq fk window_logit kv k_cache v_cache fk_cache".split()
    for name, got, want in zip(names, grads["chunk"], grads["parallel"]):
        assert torch.isfinite(got).all(), name
        assert rel_rms(got, want) <= TOL, name


def test_bad_arguments_raise():
    inputs = make_inputs(10)
    with pytest.raises(ValueError, match="window_logit"):
        window_linear_attn(*inputs[:5], torch.zeros(3))
    _, state = window_linear_attn(*inputs, window_size=8, output_final_state=True)
    with pytest.raises(ValueError, match="window_size=4"):
        window_linear_attn(*inputs, window_size=4, initial_state=state)
    with pytest.raises(ValueError, match="window_size must be"):
        window_linear_attn(*inputs, window_size=0)


def test_weights_are_the_parallel_forms():
    """`window_linear_attn_weights` is the matrix the parallel form multiplies v by (fresh sequence):
    rows sum to 1, no future keys."""
    from linearize.ops.window_linear_attn import parallel_window_linear_attn, window_linear_attn_weights

    q, k, v, fq, fk, window_logit = make_inputs(21)
    weights = window_linear_attn_weights(q, k, fq, fk, window_logit, window_size=5)  # [B, H, T, T]
    v_heads = v.repeat_interleave(HEADS // KV_HEADS, dim=2).transpose(1, 2)  # [B, H, T, V]
    out, _ = parallel_window_linear_attn(q, k, v, fq, fk, window_logit, window_size=5)
    assert rel_rms((weights @ v_heads).transpose(1, 2), out) <= TOL
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:3]))
    assert torch.count_nonzero(weights.triu(1)) == 0


@pytest.mark.parametrize("offset", [0, 3])
def test_sliding_window_mask_is_the_definition(offset):
    """Query i (at key position i + offset) sees key j iff 0 ≤ i + offset − j < W."""
    from linearize.ops._common import sliding_window_mask

    mask = sliding_window_mask(6, 9, 4, offset)
    want = torch.tensor([[0 <= i + offset - j < 4 for j in range(9)] for i in range(6)])
    assert torch.equal(mask, want)


# ---------------------------------------------------------------------------------------- attention sinks


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize(
    "window_size,sink_tokens",
    # one sink; sinks longer than the window; sinks past the last token (plain causal softmax)
    [(3, 1), (2, 5), (4, 30)],
)
def test_sinks_match_float64_oracle(form, window_size, sink_tokens):
    inputs = make_inputs(13, batch=1)
    ref = oracle(*[t.double() for t in inputs], window_size=window_size, scale=0.3, sink_tokens=sink_tokens)
    for extra in ([{"chunk_size": 3}, {"chunk_size": 16}] if form == "chunk" else [{}]):
        out, _ = FORMS[form](*inputs, window_size=window_size, scale=0.3, sink_tokens=sink_tokens, **extra)
        assert rel_rms(out.double(), ref) <= TOL, extra


def test_sinks_count_in_no_linear_key():
    """With N sinks, fk of the first N tokens is never read: any value there gives the same output."""
    q, k, v, fq, fk, window_logit = make_inputs(20)
    other = fk.clone()
    other[:, :3] = 100.0
    for form in FORMS:
        a, _ = FORMS[form](q, k, v, fq, fk, window_logit, window_size=4, sink_tokens=3)
        b, _ = FORMS[form](q, k, v, fq, other, window_logit, window_size=4, sink_tokens=3)
        assert torch.equal(a, b), form


def test_state_caches_the_sinks_beside_the_window():
    inputs = make_inputs(12)
    q, k, v, fq, fk, _ = inputs
    for form in FORMS:
        _, state = FORMS[form](*inputs, window_size=4, sink_tokens=3, output_final_state=True)
        want_k = torch.cat([k[:, :3], k[:, -4:]], dim=1).transpose(1, 2)  # [B, H_kv, N + W, D]
        assert torch.equal(state.k, want_k), form
        assert torch.equal(state.v, torch.cat([v[:, :3], v[:, -4:]], dim=1).transpose(1, 2)), form
        assert state.fk[:, :, :3].abs().max() == 0, form  # the sinks' features are never read
        assert torch.equal(state.fk[:, :, 3:], fk[:, -4:].transpose(1, 2)), form


@pytest.mark.parametrize("split", [1, 2, 6, 17])
def test_sinks_split_and_resume_equals_one_call(split):
    """A cut before, inside and after the sinks; every form continues every form's state."""
    inputs = make_inputs(30)
    kw = dict(window_size=5, sink_tokens=4, output_final_state=True)
    full, full_state = FORMS["parallel"](*inputs, **kw)
    for first, second in [("chunk", "recurrent"), ("recurrent", "chunk"), ("parallel", "parallel")]:
        head, state = FORMS[first](*sliced(inputs, 0, split), **kw)
        tail, end_state = FORMS[second](*sliced(inputs, split, 30), initial_state=state, **kw)
        assert rel_rms(torch.cat([head, tail], dim=1), full) <= TOL, (first, second)
        assert_states_close(end_state, full_state)


def test_sinks_decode_steps_continue_prefill():
    inputs = make_inputs(30)
    kw = dict(window_size=6, sink_tokens=2, chunk_size=8)
    full, _ = window_linear_attn(*inputs, **kw)
    _, state = window_linear_attn(*sliced(inputs, 0, 12), output_final_state=True, **kw)
    steps = []
    for t in range(12, 30):
        out, state = window_linear_attn(
            *sliced(inputs, t, t + 1), initial_state=state, output_final_state=True, form="recurrent", **kw
        )
        steps.append(out)
        assert state.k.shape[2] <= 6 + 2  # bounded by W + N
    assert rel_rms(torch.cat(steps, dim=1), full[:, 12:]) <= TOL


@pytest.mark.parametrize("window_size,chunk_size", [(3, 4), (8, 16)])
def test_sinks_chunk_gradients_match_parallel(window_size, chunk_size):
    inputs = make_inputs(35)
    kw = dict(window_size=window_size, sink_tokens=5)
    _, state = window_linear_attn(*make_inputs(12, seed=1), output_final_state=True, **kw)
    grads = {}
    for form, extra in [("parallel", {}), ("chunk", {"chunk_size": chunk_size})]:
        leaves = [t.clone().requires_grad_() for t in (*inputs, *state)]
        out, final = FORMS[form](
            *leaves[:6], initial_state=WindowLinearState(*leaves[6:]), output_final_state=True, **kw, **extra
        )
        weight = torch.linspace(-1, 1, out.numel()).view_as(out)
        loss = (out * weight).sum() + sum(t.square().sum() for t in final)
        loss.backward()
        grads[form] = [t.grad for t in leaves]
    names = "q k v fq fk window_logit kv k_cache v_cache fk_cache".split()
    for name, got, want in zip(names, grads["chunk"], grads["parallel"]):
        assert torch.isfinite(got).all(), name
        assert rel_rms(got, want) <= TOL, name


def test_sink_weights_reach_every_row():
    """Every row of the weights gives the sinks softmax weight; rows still sum to 1."""
    from linearize.ops.window_linear_attn import parallel_window_linear_attn, window_linear_attn_weights

    q, k, v, fq, fk, window_logit = make_inputs(16)
    kw = dict(window_size=3, sink_tokens=2)
    weights = window_linear_attn_weights(q, k, fq, fk, window_logit, **kw)  # [B, H, T, T]
    v_heads = v.repeat_interleave(HEADS // KV_HEADS, dim=2).transpose(1, 2)  # [B, H, T, V]
    out, _ = parallel_window_linear_attn(q, k, v, fq, fk, window_logit, **kw)
    assert rel_rms((weights @ v_heads).transpose(1, 2), out) <= TOL
    assert (weights[:, :, 1:, :2] > 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:3]))


def test_bad_sink_arguments_raise():
    inputs = make_inputs(10)
    with pytest.raises(ValueError, match="sink_tokens must be"):
        window_linear_attn(*inputs, window_size=4, sink_tokens=-1)
    _, state = window_linear_attn(*inputs, window_size=4, sink_tokens=3, output_final_state=True)
    with pytest.raises(ValueError, match="window_size=4 \\+ sink_tokens=0"):
        window_linear_attn(*inputs, window_size=4, initial_state=state)  # 7 cached keys, room for 4
