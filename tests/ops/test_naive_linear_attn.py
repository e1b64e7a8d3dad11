"""Pure-PyTorch linear attention: the three forms agree with each other and with an explicit-loop
oracle, split-and-resume equals one call, gradients match, and the public dispatch behaves."""
import sys
import types

import pytest
import torch

from linearize.ops.gated_linear_attn import chunk_gated_linear_attn
from linearize.ops.linear_attn import FORMS, chunk_linear_attn
from linearize.ops.window_linear_attn import window_linear_attn

from helpers import rel_rms

# fp32 forms differ only by summation order: ~1e-7 observed, 1e-5 leaves room for long sequences
TOL = 1e-5
EPS = 1e-6  # the op's documented normalizer epsilon



def make_inputs(seq_len, heads=4, kv_heads=2, key_dim=16, value_dim=12, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # positive features, as a feature map would give, keep the normalizer away from zero
    q = torch.rand(batch, seq_len, heads, key_dim, generator=gen)
    k = torch.rand(batch, seq_len, kv_heads, key_dim, generator=gen)
    v = torch.randn(batch, seq_len, kv_heads, value_dim, generator=gen)
    return q, k, v


def oracle(q, k, v, normalize, scale):
    """Explicit loops over heads, queries and keys, straight from the formula."""
    batch, seq_len, heads, key_dim = q.shape
    group = heads // k.shape[2]
    out = torch.zeros(batch, seq_len, heads, v.shape[-1])
    for h in range(heads):
        for t in range(seq_len):
            num = torch.zeros(batch, v.shape[-1])
            den = torch.zeros(batch)
            for s in range(t + 1):
                weight = (q[:, t, h] * k[:, s, h // group]).sum(-1)
                num += weight[:, None] * v[:, s, h // group]
                den += weight
            out[:, t, h] = num / (den[:, None] + EPS) if normalize else scale * num
    return out


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("form", list(FORMS))
def test_forms_match_explicit_oracle(form, normalize):
    q, k, v = make_inputs(seq_len=9, heads=4, kv_heads=2, key_dim=5, value_dim=3, batch=1)
    extra = {"chunk_size": 4} if form == "chunk" else {}
    out, _ = FORMS[form](q, k, v, normalize=normalize, scale=0.3, **extra)
    assert rel_rms(out, oracle(q, k, v, normalize, scale=0.3)) <= TOL


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("seq_len,chunk_size", [(1, 16), (63, 16), (100, 24), (257, 64)])
def test_three_forms_agree(seq_len, chunk_size, normalize):
    q, k, v = make_inputs(seq_len)
    s0 = torch.rand(2, 4, 16, 12 + normalize)
    ref, ref_state = FORMS["parallel"](q, k, v, normalize=normalize, initial_state=s0, output_final_state=True)
    for form, extra in [("chunk", {"chunk_size": chunk_size}), ("recurrent", {})]:
        out, state = FORMS[form](q, k, v, normalize=normalize, initial_state=s0, output_final_state=True, **extra)
        assert out.shape == (2, seq_len, 4, 12)
        assert state.dtype == torch.float32 and state.shape == ref_state.shape
        assert rel_rms(out, ref) <= TOL, form
        assert rel_rms(state, ref_state) <= TOL, form


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("split", [1, 37, 64, 99])
def test_split_and_resume_equals_one_call(split, normalize):
    q, k, v = make_inputs(100)
    full, full_state = chunk_linear_attn(q, k, v, normalize=normalize, chunk_size=32, output_final_state=True)
    head, state = chunk_linear_attn(
        q[:, :split], k[:, :split], v[:, :split], normalize=normalize, chunk_size=32, output_final_state=True
    )
    tail, end_state = chunk_linear_attn(
        q[:, split:], k[:, split:], v[:, split:], normalize=normalize, chunk_size=32,
        initial_state=state, output_final_state=True,
    )
    assert rel_rms(torch.cat([head, tail], dim=1), full) <= TOL
    assert rel_rms(end_state, full_state) <= TOL


def test_decode_steps_continue_prefill():
    q, k, v = make_inputs(20)
    full, _ = chunk_linear_attn(q, k, v, chunk_size=8)
    _, state = chunk_linear_attn(q[:, :15], k[:, :15], v[:, :15], chunk_size=8, output_final_state=True)
    steps = []
    for t in range(15, 20):
        out, state = chunk_linear_attn(
            q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], initial_state=state, output_final_state=True,
            form="recurrent",
        )
        steps.append(out)
    assert rel_rms(torch.cat(steps, dim=1), full[:, 15:]) <= TOL


@pytest.mark.parametrize("normalize", [True, False])
def test_chunk_gradients_match_parallel(normalize):
    q, k, v = make_inputs(45)
    s0 = torch.rand(2, 4, 16, 12 + normalize)
    grads = {}
    for form, extra in [("parallel", {}), ("chunk", {"chunk_size": 16})]:
        leaves = [t.clone().requires_grad_() for t in (q, k, v, s0)]
        out, state = FORMS[form](
            *leaves[:3], normalize=normalize, initial_state=leaves[3], output_final_state=True, **extra
        )
        weight = torch.linspace(-1, 1, out.numel()).view_as(out)
        ((out * weight).sum() + state.square().sum()).backward()
        grads[form] = [t.grad for t in leaves]
    for name, got, want in zip("q k v initial_state".split(), grads["chunk"], grads["parallel"]):
        assert rel_rms(got, want) <= TOL, name


def test_output_dtype_follows_v_and_state_is_fp32():
    q, k, v = make_inputs(10)
    out, state = chunk_linear_attn(q.bfloat16(), k.bfloat16(), v.bfloat16(), chunk_size=4, output_final_state=True)
    assert out.dtype == torch.bfloat16 and state.dtype == torch.float32
    assert chunk_linear_attn(q, k, v)[1] is None


def test_bad_shapes_raise():
    q, k, v = make_inputs(10, heads=3, kv_heads=2)
    with pytest.raises(ValueError, match="multiple"):
        chunk_linear_attn(q, k, v)


# The public dispatch, checked for the three ops.

def _linear_call(fn, **kw):
    q, k, v = make_inputs(6)
    return fn(q, k, v, **kw)


def _gated_call(fn, **kw):
    q, k, v = make_inputs(6)
    return fn(q, k, v, -torch.rand_like(k), **kw)


def _window_call(fn, **kw):
    q, k, v = make_inputs(6)
    return fn(q, k, v, q, q, torch.zeros(4), window_size=2, **kw)


OPS = {
    "linear_attn": (chunk_linear_attn, _linear_call, "chunk_linear_attn_triton"),
    "gated_linear_attn": (chunk_gated_linear_attn, _gated_call, "chunk_gated_linear_attn_triton"),
    "window_linear_attn": (window_linear_attn, _window_call, "window_linear_attn_triton"),
}


@pytest.mark.parametrize("op", list(OPS))
def test_unknown_backend_and_form_list_valid_names(op):
    fn, call, _ = OPS[op]
    with pytest.raises(ValueError, match="auto, torch, triton"):
        call(fn, backend="cuda")
    with pytest.raises(ValueError, match="chunk, parallel, recurrent"):
        call(fn, form="flash")
    with pytest.raises(ValueError, match="only form='chunk'"):
        call(fn, form="parallel", backend="triton")


@pytest.mark.parametrize("op", list(OPS))
def test_backend_selection(op, monkeypatch):
    fn, call, triton_name = OPS[op]
    calls = []
    fake = types.ModuleType(f"linearize.ops.{op}.triton")
    setattr(fake, triton_name, lambda *args, **kw: calls.append(kw) or ("triton", None))
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    assert call(fn, backend="triton", chunk_size=4)[0] == "triton"
    assert "backend" not in calls[0] and calls[0]["chunk_size"] == 4
    assert call(fn, backend="auto")[0].shape[1] == 6  # CPU tensors: auto stays on torch
    assert call(fn, backend="torch")[0].shape[1] == 6
    assert len(calls) == 1
    monkeypatch.setitem(sys.modules, fake.__name__, None)  # makes the import fail
    with pytest.raises(ImportError, match="Triton backend unavailable"):
        call(fn, backend="triton")


@pytest.mark.parametrize("normalize", [True, False])
def test_weights_are_the_parallel_forms(normalize):
    """`linear_attn_weights` is the matrix the parallel form multiplies v by (fresh sequence)."""
    from linearize.ops.linear_attn import linear_attn_weights, parallel_linear_attn

    q, k, v = make_inputs(23)
    weights = linear_attn_weights(q, k, normalize=normalize, scale=0.7)  # [B, H, T, T]
    v_heads = v.repeat_interleave(2, dim=2).transpose(1, 2)  # [B, H, T, V]
    out, _ = parallel_linear_attn(q, k, v, normalize=normalize, scale=0.7)
    assert rel_rms((weights @ v_heads).transpose(1, 2), out) <= TOL
    assert torch.count_nonzero(weights.triu(1)) == 0  # causal
