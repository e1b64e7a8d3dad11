"""The gated delta rule: both forms against a float64 token loop written here from the recurrence, in
outputs, final states and every gradient; split-and-resume; fp32 agreement (the Triton and fla backends: test_triton_gated_delta_rule.py, test_fla_backend.py)."""
import pytest
import torch
import torch.nn.functional as F

from linearize.ops import chunk_gated_delta_rule
from linearize.ops.gated_delta_rule import FORMS

from helpers import rel_rms

# float64 forms differ from the loop only by summation order and the triangular solve: ~1e-15 observed
F64_TOL = 1e-10
# fp32 chunk vs recurrent: the chunk form's solve and exp(Γa)·exp(Γb) products round differently from
# the loop's step-by-step updates: ~2e-7 observed at T = 200
F32_TOL = 1e-5
MILD_DECAY_DIVISOR = 8  # g = logsigmoid(x) / 8: per-step decays around 0.9, so the state keeps a long memory


def make_inputs(seq_len, per_channel, heads=4, kv_heads=2, key_dim=8, value_dim=6, batch=2, beta_max=1.0,
                dtype=torch.float64, seed=0):
    """q, k, v, g, beta, s0 with L2-normalized keys (as the mechanisms give) and beta in (0, beta_max]."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_len, heads, key_dim, generator=gen, dtype=torch.float64)
    k = F.normalize(torch.randn(batch, seq_len, kv_heads, key_dim, generator=gen, dtype=torch.float64), dim=-1)
    v = torch.randn(batch, seq_len, kv_heads, value_dim, generator=gen, dtype=torch.float64)
    g_shape = (batch, seq_len, kv_heads) + ((key_dim,) if per_channel else ())
    g = F.logsigmoid(torch.randn(g_shape, generator=gen, dtype=torch.float64)) / MILD_DECAY_DIVISOR
    beta = beta_max * (1 - torch.rand(batch, seq_len, kv_heads, generator=gen, dtype=torch.float64))
    s0 = torch.randn(batch, kv_heads, key_dim, value_dim, generator=gen, dtype=torch.float64)
    return [x.to(dtype) for x in (q, k, v, g, beta, s0)]


def oracle(q, k, v, g, beta, s0, scale):
    """The literal recurrence, one token, batch row and query head at a time, in float64:
    S_t = (I − β k kᵀ) Diag(exp(g)) S_{t−1} + β k vᵀ,  o_t = scale · S_tᵀ q_t."""
    batch, seq_len, heads, key_dim = q.shape
    group = heads // k.shape[2]
    eye = torch.eye(key_dim, dtype=torch.float64)
    out = []
    final = s0.clone()
    for b in range(batch):
        out_b = []
        for h in range(heads):
            kv_h = h // group
            state = s0[b, kv_h]
            out_h = []
            for t in range(seq_len):
                k_t, beta_t = k[b, t, kv_h], beta[b, t, kv_h]
                decay = torch.diag(g[b, t, kv_h].exp().expand(key_dim))
                state = (eye - beta_t * torch.outer(k_t, k_t)) @ decay @ state + beta_t * torch.outer(k_t, v[b, t, kv_h])
                out_h.append(scale * state.T @ q[b, t, h])
            out_b.append(torch.stack(out_h))
            final = final.index_put((torch.tensor(b), torch.tensor(kv_h)), state)
        out.append(torch.stack(out_b, dim=1))
    return torch.stack(out), final


def run(form, inputs, chunk_size=16, scale=0.4):
    q, k, v, g, beta, s0 = inputs
    return chunk_gated_delta_rule(
        q, k, v, g, beta, scale=scale, initial_state=s0, output_final_state=True, form=form, chunk_size=chunk_size
    )


def grads(outputs, inputs):
    """Gradients of a fixed random projection of (o, final_state) with respect to every input."""
    gen = torch.Generator().manual_seed(1)
    loss = sum((x * torch.randn(x.shape, generator=gen, dtype=x.dtype)).sum() for x in outputs)
    return torch.autograd.grad(loss, inputs)


CASES = [  # (seq_len, per_channel, chunk_size, beta_max)
    (1, False, 16, 1.0),
    (37, False, 16, 1.0),
    (37, True, 32, 2.0),
    (100, False, 64, 2.0),
    (100, True, 16, 1.0),
    (70, True, 64, 1.0),
]


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("seq_len,per_channel,chunk_size,beta_max", CASES)
def test_forms_match_float64_loop_in_outputs_and_gradients(form, seq_len, per_channel, chunk_size, beta_max):
    inputs = [x.requires_grad_() for x in make_inputs(seq_len, per_channel, beta_max=beta_max)]
    out, state = run(form, inputs, chunk_size)
    ref_out, ref_state = oracle(*inputs, scale=0.4)
    assert out.shape == ref_out.shape == (2, seq_len, 4, 6) and state.shape == (2, 2, 8, 6)
    assert rel_rms(out, ref_out) <= F64_TOL
    assert rel_rms(state, ref_state) <= F64_TOL
    names = ["q", "k", "v", "g", "beta", "initial_state"]
    for name, grad, ref_grad in zip(names, grads((out, state), inputs), grads((ref_out, ref_state), inputs)):
        assert rel_rms(grad, ref_grad) <= F64_TOL, name


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("per_channel", [False, True])
def test_split_and_resume_equals_one_call(form, per_channel):
    q, k, v, g, beta, s0 = make_inputs(50, per_channel)
    full, full_state = run(form, (q, k, v, g, beta, s0))
    cut = 23  # inside the second 16-token chunk
    first, mid_state = run(form, [x[:, :cut] for x in (q, k, v, g, beta)] + [s0])
    second, end_state = run(form, [x[:, cut:] for x in (q, k, v, g, beta)] + [mid_state])
    assert rel_rms(torch.cat([first, second], dim=1), full) <= F64_TOL
    assert rel_rms(end_state, full_state) <= F64_TOL


@pytest.mark.parametrize("per_channel", [False, True])
def test_fp32_chunk_matches_recurrent(per_channel):
    inputs = make_inputs(200, per_channel, heads=4, kv_heads=1, key_dim=32, value_dim=32, dtype=torch.float32)
    out, state = run("chunk", inputs, chunk_size=64)
    ref, ref_state = run("recurrent", inputs)
    assert out.dtype == state.dtype == torch.float32
    assert rel_rms(out, ref) <= F32_TOL
    assert rel_rms(state, ref_state) <= F32_TOL


@pytest.mark.parametrize("per_channel", [False, True])
def test_strong_decay_stays_finite(per_channel):
    # log-decays scaled per head (or channel) up to 40 × logsigmoid, about -130 at worst: cumulative sums
    # reach thousands below 0 inside a 64-token chunk, where any exp(-Γ) (a positive exponent) would
    # overflow; the chunk form must only exponentiate differences ≤ 0
    q, k, v, g, beta, s0 = make_inputs(150, per_channel, dtype=torch.float32)
    g = g * torch.linspace(0, 40 * MILD_DECAY_DIVISOR, g.shape[-1])  # last dim: kv heads or key channels
    out, state = run("chunk", (q, k, v, g, beta, s0), chunk_size=64)
    ref, ref_state = run("recurrent", (q, k, v, g, beta, s0))
    assert out.isfinite().all() and state.isfinite().all()
    assert rel_rms(out, ref) <= F32_TOL
    assert rel_rms(state, ref_state) <= F32_TOL


def test_defaults_no_state_and_bf16_output():
    q, k, v, g, beta, _ = make_inputs(20, False, dtype=torch.bfloat16)
    out, state = chunk_gated_delta_rule(q, k, v, g, beta)
    ref, _ = chunk_gated_delta_rule(q, k, v, g, beta, scale=8**-0.5, form="recurrent")
    assert out.dtype == torch.bfloat16 and state is None
    assert rel_rms(out, ref) <= 1e-2  # bf16 output rounding (8 mantissa bits)


def test_bad_names_and_shapes_raise():
    q, k, v, g, beta, _ = make_inputs(4, False)
    with pytest.raises(ValueError, match="valid forms: chunk, recurrent"):
        chunk_gated_delta_rule(q, k, v, g, beta, form="parallel")
    with pytest.raises(ValueError, match="valid backends"):
        chunk_gated_delta_rule(q, k, v, g, beta, backend="cuda")
    with pytest.raises(ValueError, match="beta must be"):
        chunk_gated_delta_rule(q, k, v, g, beta[..., None])
    with pytest.raises(ValueError, match="g must be"):
        chunk_gated_delta_rule(q, k, v, g[:, :, :1], beta)
