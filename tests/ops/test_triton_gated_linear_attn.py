"""Triton chunked gated linear attention vs the pure-PyTorch parallel form: output, final state and
every gradient (Triton backward kernels), on lengths that do not fit the time tile, GQA, strong decay,
split-and-resume; CPU via the interpreter."""
from helpers import GPU_TOL, cpu_tests_need_interpreter, rel_rms, use_triton_interpreter  # noqa: F401

INTERPRETED = use_triton_interpreter()  # before the kernel imports below

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")
from linearize.ops.gated_linear_attn import chunk_gated_linear_attn  # noqa: E402
from linearize.ops.gated_linear_attn.naive import parallel_gated_linear_attn  # noqa: E402
from linearize.ops.gated_linear_attn.triton import chunk_gated_linear_attn_triton  # noqa: E402

# fp32 everywhere and exact interpreter dots: only summation order and exp(a)·exp(b) vs exp(a + b) differ
TOL = 1e-4
LENGTHS = [1, 17, 64, 100]
MILD_GATE_DIVISOR = 16  # Liger's g = logsigmoid(k) / 16: realistic, mild decays
STRONG_GATE_SCALE = 30.0  # log-decays down to about -60 per token: exp(±cumulative G) would overflow




def make_inputs(seq_len, heads=4, kv_heads=2, key_dim=16, value_dim=12, normalize=False, seed=0,
                gate_scale=1.0 / MILD_GATE_DIVISOR, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    q = torch.rand(2, seq_len, heads, key_dim, generator=gen)
    k = torch.rand(2, seq_len, kv_heads, key_dim, generator=gen)
    v = torch.randn(2, seq_len, kv_heads, value_dim, generator=gen)
    g = F.logsigmoid(torch.randn(2, seq_len, kv_heads, key_dim, generator=gen)) * gate_scale
    s0 = torch.rand(2, heads, key_dim, value_dim + int(normalize), generator=gen)
    return [x.to(device).requires_grad_() for x in (q, k, v, g, s0)]


def assert_matches(fn, ref, inputs, tol, **kwargs):
    """Output, final state and the gradient of every input agree within `tol` (relative RMS)."""
    o, final = fn(*inputs[:4], initial_state=inputs[4], output_final_state=True, **kwargs)
    o_ref, final_ref = ref(*inputs[:4], initial_state=inputs[4], output_final_state=True, **kwargs)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(o.shape, generator=gen).to(o)
    dfinal = torch.randn(final.shape, generator=gen).to(final)
    grads = torch.autograd.grad((o, final), inputs, (do, dfinal))
    grads_ref = torch.autograd.grad((o_ref, final_ref), inputs, (do, dfinal))
    assert torch.isfinite(o).all()
    assert rel_rms(o.float(), o_ref.float()) < tol
    assert rel_rms(final, final_ref) < tol
    for name, grad, grad_ref in zip(["q", "k", "v", "g", "initial_state"], grads, grads_ref):
        assert rel_rms(grad.float(), grad_ref.float()) < tol, name


@pytest.mark.parametrize("seq_len", LENGTHS)
@pytest.mark.parametrize("normalize", [False, True])
def test_matches_reference_gqa(seq_len, normalize):
    inputs = make_inputs(seq_len, normalize=normalize, seed=seq_len)
    assert_matches(chunk_gated_linear_attn_triton, parallel_gated_linear_attn, inputs, TOL, normalize=normalize)


def test_strong_decay_stays_finite_and_exact():
    inputs = make_inputs(40, gate_scale=STRONG_GATE_SCALE, key_dim=10, value_dim=20)
    assert_matches(chunk_gated_linear_attn_triton, parallel_gated_linear_attn, inputs, TOL, scale=0.5)


@pytest.mark.parametrize("normalize", [False, True])
def test_split_and_resume(normalize):
    q, k, v, g, _ = make_inputs(45, normalize=normalize)
    kwargs = dict(normalize=normalize, output_final_state=True)
    full, full_state = chunk_gated_linear_attn_triton(q, k, v, g, **kwargs)
    first, state = chunk_gated_linear_attn_triton(q[:, :21], k[:, :21], v[:, :21], g[:, :21], **kwargs)
    second, end_state = chunk_gated_linear_attn_triton(
        q[:, 21:], k[:, 21:], v[:, 21:], g[:, 21:], initial_state=state, **kwargs
    )
    assert rel_rms(torch.cat([first, second], dim=1), full) < TOL
    assert rel_rms(end_state, full_state) < TOL


def test_public_dispatch_selects_triton():
    q, k, v, g, _ = make_inputs(9)
    o, _ = chunk_gated_linear_attn(q, k, v, g, backend="triton")
    o_ref, _ = parallel_gated_linear_attn(q, k, v, g)
    assert rel_rms(o, o_ref) < TOL


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(), reason="needs CUDA and TRITON_INTERPRET=0")
@pytest.mark.parametrize("normalize", [False, True])
def test_gpu_bf16(normalize):
    inputs = make_inputs(300, key_dim=64, value_dim=64, normalize=normalize, device="cuda")
    q, k, v, g, s0 = (x.detach() for x in inputs)
    low = [x.bfloat16().requires_grad_() for x in (q, k, v)] + [g.requires_grad_(), s0.requires_grad_()]
    assert_matches(chunk_gated_linear_attn_triton, parallel_gated_linear_attn, low, GPU_TOL, normalize=normalize)


@pytest.mark.parametrize("normalize", [False, True])
def test_gradients_without_states(normalize):
    """No initial state and no final state: the backward kernels' state-free path."""
    q, k, v, g, _ = make_inputs(33, normalize=normalize, seed=3)
    o, _ = chunk_gated_linear_attn_triton(q, k, v, g, normalize=normalize)
    o_ref, _ = parallel_gated_linear_attn(q, k, v, g, normalize=normalize)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad(o, (q, k, v, g), do)
    grads_ref = torch.autograd.grad(o_ref, (q, k, v, g), do)
    for name, grad, grad_ref in zip("qkvg", grads, grads_ref):
        assert rel_rms(grad, grad_ref) < TOL, name


def test_gradient_through_final_state_only():
    q, k, v, g, s0 = make_inputs(20, seed=4)
    kwargs = dict(initial_state=s0, output_final_state=True)
    _, final = chunk_gated_linear_attn_triton(q, k, v, g, **kwargs)
    _, final_ref = parallel_gated_linear_attn(q, k, v, g, **kwargs)
    grads = torch.autograd.grad(final.square().sum(), (k, v, g, s0))
    grads_ref = torch.autograd.grad(final_ref.square().sum(), (k, v, g, s0))
    for name, grad, grad_ref in zip(["k", "v", "g", "initial_state"], grads, grads_ref):
        assert rel_rms(grad, grad_ref) < TOL, name
