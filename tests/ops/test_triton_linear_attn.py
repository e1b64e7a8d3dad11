"""Triton chunked linear attention vs the pure-PyTorch parallel form: output, final state and every
gradient (Triton backward kernels), on lengths that do not fit the time tile, GQA, split-and-resume;
CPU via the interpreter."""
from helpers import GPU_TOL, cpu_tests_need_interpreter, rel_rms, use_triton_interpreter  # noqa: F401

INTERPRETED = use_triton_interpreter()  # before the kernel imports below

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
from linearize.ops.linear_attn import chunk_linear_attn  # noqa: E402
from linearize.ops.linear_attn.naive import parallel_linear_attn  # noqa: E402
from linearize.ops.linear_attn.triton import chunk_linear_attn_triton  # noqa: E402

# fp32 everywhere and exact interpreter dots: only summation order differs (~5e-7 observed)
TOL = 1e-4
LENGTHS = [1, 17, 64, 100]




def make_inputs(seq_len, heads=4, kv_heads=2, key_dim=16, value_dim=12, normalize=True, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    # positive features, as a feature map would give, keep the normalizer away from zero
    q = torch.rand(2, seq_len, heads, key_dim, generator=gen)
    k = torch.rand(2, seq_len, kv_heads, key_dim, generator=gen)
    v = torch.randn(2, seq_len, kv_heads, value_dim, generator=gen)
    s0 = torch.rand(2, heads, key_dim, value_dim + int(normalize), generator=gen)
    return [x.to(device).requires_grad_() for x in (q, k, v, s0)]


def assert_matches(fn, ref, inputs, tol, **kwargs):
    """Output, final state and the gradient of every input agree within `tol` (relative RMS)."""
    o, final = fn(*inputs[:3], initial_state=inputs[3], output_final_state=True, **kwargs)
    o_ref, final_ref = ref(*inputs[:3], initial_state=inputs[3], output_final_state=True, **kwargs)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(o.shape, generator=gen).to(o)
    dfinal = torch.randn(final.shape, generator=gen).to(final)
    grads = torch.autograd.grad((o, final), inputs, (do, dfinal))
    grads_ref = torch.autograd.grad((o_ref, final_ref), inputs, (do, dfinal))
    assert not torch.isnan(o).any()
    assert rel_rms(o.float(), o_ref.float()) < tol
    assert rel_rms(final, final_ref) < tol
    for name, g, g_ref in zip(["q", "k", "v", "initial_state"], grads, grads_ref):
        assert rel_rms(g.float(), g_ref.float()) < tol, name


@pytest.mark.parametrize("seq_len", LENGTHS)
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_reference_gqa(seq_len, normalize):
    inputs = make_inputs(seq_len, normalize=normalize, seed=seq_len)
    assert_matches(chunk_linear_attn_triton, parallel_linear_attn, inputs, TOL, normalize=normalize)


def test_mha_and_odd_widths():
    """No GQA, key/value widths that are not powers of two, a chunk_size that is not one either."""
    inputs = make_inputs(37, heads=2, kv_heads=2, key_dim=10, value_dim=20, normalize=False)
    assert_matches(chunk_linear_attn_triton, parallel_linear_attn, inputs, TOL, normalize=False, scale=0.3)
    o, _ = chunk_linear_attn_triton(*inputs[:3], normalize=False, chunk_size=20)
    o_ref, _ = parallel_linear_attn(*inputs[:3], normalize=False)
    assert rel_rms(o, o_ref) < TOL


@pytest.mark.parametrize("normalize", [True, False])
def test_split_and_resume(normalize):
    q, k, v, _ = make_inputs(50, normalize=normalize)
    full, full_state = chunk_linear_attn_triton(q, k, v, normalize=normalize, output_final_state=True)
    first, state = chunk_linear_attn_triton(
        q[:, :19], k[:, :19], v[:, :19], normalize=normalize, output_final_state=True
    )
    second, end_state = chunk_linear_attn_triton(
        q[:, 19:], k[:, 19:], v[:, 19:], normalize=normalize, initial_state=state, output_final_state=True
    )
    assert rel_rms(torch.cat([first, second], dim=1), full) < TOL
    assert rel_rms(end_state, full_state) < TOL


def test_public_dispatch_selects_triton():
    q, k, v, _ = make_inputs(9)
    o, _ = chunk_linear_attn(q, k, v, backend="triton")
    o_ref, _ = parallel_linear_attn(q, k, v)
    assert rel_rms(o, o_ref) < TOL


def test_no_final_state_unless_asked():
    q, k, v, _ = make_inputs(5)
    assert chunk_linear_attn_triton(q, k, v)[1] is None


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(), reason="needs CUDA and TRITON_INTERPRET=0")
@pytest.mark.parametrize("normalize", [True, False])
def test_gpu_bf16(normalize):
    inputs = make_inputs(300, heads=4, kv_heads=2, key_dim=64, value_dim=64, normalize=normalize, device="cuda")
    q, k, v, s0 = (x.detach() for x in inputs)
    low = [x.bfloat16().requires_grad_() for x in (q, k, v)] + [s0.requires_grad_()]
    assert_matches(chunk_linear_attn_triton, parallel_linear_attn, low, GPU_TOL, normalize=normalize)


@pytest.mark.parametrize("normalize", [True, False])
def test_gradients_without_states(normalize):
    """No initial state and no final state: the backward kernels' state-free path."""
    q, k, v, _ = make_inputs(33, normalize=normalize, seed=3)
    o, _ = chunk_linear_attn_triton(q, k, v, normalize=normalize, chunk_size=16)
    o_ref, _ = parallel_linear_attn(q, k, v, normalize=normalize)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad(o, (q, k, v), do)
    grads_ref = torch.autograd.grad(o_ref, (q, k, v), do)
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        assert rel_rms(g, g_ref) < TOL, name


def test_gradient_through_final_state_only():
    q, k, v, s0 = make_inputs(20, normalize=False, seed=4)
    _, final = chunk_linear_attn_triton(q, k, v, normalize=False, initial_state=s0, output_final_state=True)
    _, final_ref = parallel_linear_attn(q, k, v, normalize=False, initial_state=s0, output_final_state=True)
    grads = torch.autograd.grad(final.sum(), (k, v, s0))
    grads_ref = torch.autograd.grad(final_ref.sum(), (k, v, s0))
    for name, g, g_ref in zip(["k", "v", "initial_state"], grads, grads_ref):
        assert rel_rms(g, g_ref) < TOL, name


@pytest.mark.parametrize("normalize", [True, False])
def test_is_the_gated_template_with_a_zero_gate(normalize):
    """Linear attention runs the gated kernels' no-gate branch: it must equal the gated branch at g = 0
    (outputs, states and gradients), though the two branches tile time differently (64 vs 16)."""
    from linearize.ops.gated_linear_attn.triton import chunk_gated_linear_attn_triton

    inputs = make_inputs(70, normalize=normalize)

    def zero_gate(q, k, v, **kwargs):
        return chunk_gated_linear_attn_triton(q, k, v, torch.zeros_like(k), **kwargs)

    assert_matches(chunk_linear_attn_triton, zero_gate, inputs, TOL, normalize=normalize)
