"""Pure-PyTorch gated linear attention: the three forms agree with each other and with an
explicit-loop oracle, stay finite under strong decay, resume exactly and match in gradients."""
import pytest
import torch
import torch.nn.functional as F

from linearize.ops.gated_linear_attn import FORMS, chunk_gated_linear_attn

from helpers import rel_rms

# fp32 forms differ only by summation order and exp(a)·exp(b) vs exp(a + b): ~1e-7 observed
TOL = 1e-5
EPS = 1e-6  # the op's documented normalizer epsilon
LIGER_GATE_DIVISOR = 16  # Liger's g = logsigmoid(k) / 16: realistic, mild decays



def make_inputs(
    seq_len, heads=4, kv_heads=2, key_dim=16, value_dim=12, batch=2, seed=0, gate_divisor=LIGER_GATE_DIVISOR
):
    gen = torch.Generator().manual_seed(seed)
    q = torch.rand(batch, seq_len, heads, key_dim, generator=gen)
    k = torch.rand(batch, seq_len, kv_heads, key_dim, generator=gen)
    v = torch.randn(batch, seq_len, kv_heads, value_dim, generator=gen)
    g = F.logsigmoid(torch.randn(batch, seq_len, kv_heads, key_dim, generator=gen)) / gate_divisor
    return q, k, v, g


def oracle(q, k, v, g, normalize, scale):
    """Explicit loops: weight(t, s) = Σ_d q_td k_sd Π_{s<j≤t} exp(g_jd)."""
    batch, seq_len, heads, key_dim = q.shape
    group = heads // k.shape[2]
    out = torch.zeros(batch, seq_len, heads, v.shape[-1])
    for h in range(heads):
        kv_h = h // group
        for t in range(seq_len):
            num = torch.zeros(batch, v.shape[-1])
            den = torch.zeros(batch)
            for s in range(t + 1):
                decay = torch.ones(batch, key_dim)
                for j in range(s + 1, t + 1):
                    decay = decay * g[:, j, kv_h].exp()
                weight = (q[:, t, h] * k[:, s, kv_h] * decay).sum(-1)
                num += weight[:, None] * v[:, s, kv_h]
                den += weight
            out[:, t, h] = num / (den[:, None] + EPS) if normalize else scale * num
    return out


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("form", list(FORMS))
def test_forms_match_explicit_oracle(form, normalize):
    q, k, v, g = make_inputs(seq_len=9, key_dim=5, value_dim=3, batch=1, gate_divisor=1)
    extra = {"chunk_size": 4} if form == "chunk" else {}
    out, _ = FORMS[form](q, k, v, g, normalize=normalize, scale=0.3, **extra)
    assert rel_rms(out, oracle(q, k, v, g, normalize, scale=0.3)) <= TOL


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("seq_len,chunk_size", [(1, 16), (63, 16), (100, 24), (257, 64), (70, 17)])
def test_three_forms_agree(seq_len, chunk_size, normalize):
    q, k, v, g = make_inputs(seq_len)
    s0 = torch.rand(2, 4, 16, 12 + normalize)
    ref, ref_state = FORMS["parallel"](q, k, v, g, normalize=normalize, initial_state=s0, output_final_state=True)
    for form, extra in [("chunk", {"chunk_size": chunk_size}), ("recurrent", {})]:
        out, state = FORMS[form](
            q, k, v, g, normalize=normalize, initial_state=s0, output_final_state=True, **extra
        )
        assert out.shape == (2, seq_len, 4, 12) and state.dtype == torch.float32
        assert rel_rms(out, ref) <= TOL, form
        assert rel_rms(state, ref_state) <= TOL, form


def test_strong_decay_stays_finite_and_exact():
    # log-decays down to -40 per step: cumulative sums reach -2500 inside a chunk, where any
    # exp(-G) (positive exponent) would overflow; the chunk form must never form one
    q, k, v, g = make_inputs(150, gate_divisor=1)
    g = g * torch.linspace(0, 40, g.shape[-1])
    out, state = chunk_gated_linear_attn(q, k, v, g, chunk_size=64, output_final_state=True)
    ref, ref_state = FORMS["recurrent"](q, k, v, g, output_final_state=True)
    assert torch.isfinite(out).all() and torch.isfinite(state).all()
    assert rel_rms(out, ref) <= TOL
    assert rel_rms(state, ref_state) <= TOL


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("split", [1, 37, 64, 99])
def test_split_and_resume_equals_one_call(split, normalize):
    q, k, v, g = make_inputs(100)
    kw = dict(normalize=normalize, chunk_size=32, output_final_state=True)
    full, full_state = chunk_gated_linear_attn(q, k, v, g, **kw)
    head, state = chunk_gated_linear_attn(q[:, :split], k[:, :split], v[:, :split], g[:, :split], **kw)
    tail, end_state = chunk_gated_linear_attn(
        q[:, split:], k[:, split:], v[:, split:], g[:, split:], initial_state=state, **kw
    )
    assert rel_rms(torch.cat([head, tail], dim=1), full) <= TOL
    assert rel_rms(end_state, full_state) <= TOL


def test_decode_steps_continue_prefill():
    q, k, v, g = make_inputs(20)
    full, _ = chunk_gated_linear_attn(q, k, v, g, chunk_size=8)
    prefill = slice(0, 15)
    _, state = chunk_gated_linear_attn(
        q[:, prefill], k[:, prefill], v[:, prefill], g[:, prefill], chunk_size=8, output_final_state=True
    )
    steps = []
    for t in range(15, 20):
        step = slice(t, t + 1)
        out, state = chunk_gated_linear_attn(
            q[:, step], k[:, step], v[:, step], g[:, step], initial_state=state, output_final_state=True,
            form="recurrent",
        )
        steps.append(out)
    assert rel_rms(torch.cat(steps, dim=1), full[:, 15:]) <= TOL


@pytest.mark.parametrize("normalize", [True, False])
def test_chunk_gradients_match_parallel(normalize):
    q, k, v, g = make_inputs(45, gate_divisor=2)
    s0 = torch.rand(2, 4, 16, 12 + normalize)
    grads = {}
    for form, extra in [("parallel", {}), ("chunk", {"chunk_size": 32})]:
        leaves = [t.clone().requires_grad_() for t in (q, k, v, g, s0)]
        out, state = FORMS[form](
            *leaves[:4], normalize=normalize, initial_state=leaves[4], output_final_state=True, **extra
        )
        weight = torch.linspace(-1, 1, out.numel()).view_as(out)
        ((out * weight).sum() + state.square().sum()).backward()
        grads[form] = [t.grad for t in leaves]
    for name, got, want in zip("q k v g initial_state".split(), grads["chunk"], grads["parallel"]):
        assert torch.isfinite(got).all(), name
        assert rel_rms(got, want) <= TOL, name


def test_g_must_match_k():
    q, k, v, g = make_inputs(8)
    with pytest.raises(ValueError, match="g must match"):
        chunk_gated_linear_attn(q, k, v, g[..., :4])
