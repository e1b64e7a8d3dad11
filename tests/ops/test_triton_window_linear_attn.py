"""Triton fused window + linear attention vs the pure-PyTorch parallel form: output, final state and
every gradient (Triton backward kernels), on lengths that do not fit the tiles, windows smaller and
larger than a tile, GQA, split-and-resume through `WindowLinearState`, attention sinks, the decayed linear
branch (`linear_half_life`); CPU via the interpreter."""
from helpers import (  # noqa: F401  (cpu_tests_need_interpreter: an autouse fixture)
    GPU_TOL, cpu_tests_need_interpreter, rel_rms, use_triton_interpreter, window_linear_inputs,
)

INTERPRETED = use_triton_interpreter()  # before the kernel imports below

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
from linearize.ops.window_linear_attn import window_linear_attn  # noqa: E402
from linearize.ops.window_linear_attn.naive import parallel_window_linear_attn  # noqa: E402
from linearize.ops.window_linear_attn.triton import window_linear_attn_triton  # noqa: E402

# fp32 everywhere and exact interpreter dots: only summation order and the online-softmax rescale differ
TOL = 1e-4
LENGTHS = [1, 17, 64, 100]
# one sequence: the interpreter runs every program in Python, and batch adds nothing the heads don't test
BATCH, HEADS, KV_HEADS, HEAD_DIM, FEATURE_DIM, VALUE_DIM = 1, 4, 2, 16, 12, 8


# window_logit's gradient is analytically 0 when no query has linear keys (gamma cancels), so its
# reference is pure fp32 rounding noise (~3e-7); real window_logit gradients here have norm ~0.1-1
GRAD_NORM_FLOOR = 1e-2


def make_inputs(seq_len, seed=0, head_dim=HEAD_DIM, feature_dim=FEATURE_DIM, value_dim=VALUE_DIM, device="cpu"):
    inputs = window_linear_inputs(BATCH, seq_len, HEADS, KV_HEADS, head_dim, feature_dim, value_dim, seed)
    return [x.to(device).requires_grad_() for x in inputs]


def grads_of(outputs, inputs, seed=1):
    """Gradients of a fixed random projection of every output tensor (state tensors included)."""
    outputs = [o for o in outputs if o.numel() > 0 and o.requires_grad]
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(o.shape, generator=gen).to(o) for o in outputs]
    return torch.autograd.grad(outputs, inputs, weights, allow_unused=True)


def assert_matches(inputs, tol, initial_state=None, **kwargs):
    """Output, every final-state tensor and every input gradient agree within `tol` (relative RMS)."""
    state_inputs = [] if initial_state is None else [t for t in initial_state if t.requires_grad]
    o, final = window_linear_attn_triton(*inputs, initial_state=initial_state, output_final_state=True, **kwargs)
    o_ref, final_ref = parallel_window_linear_attn(
        *inputs, initial_state=initial_state, output_final_state=True, **kwargs
    )
    assert torch.isfinite(o).all()
    assert rel_rms(o.float(), o_ref.float()) < tol
    for name, got, want in zip(final._fields, final, final_ref):
        assert got.shape == want.shape, name
        if want.numel():
            assert rel_rms(got, want) < tol, name
    every = list(inputs) + state_inputs
    grads = grads_of([o, *final], every)
    grads_ref = grads_of([o_ref, *final_ref], every)
    for i, (g, g_ref) in enumerate(zip(grads, grads_ref)):
        assert (g is None) == (g_ref is None), i
        if g is not None:
            assert rel_rms(g.float(), g_ref.float(), GRAD_NORM_FLOOR) < tol, i


@pytest.mark.parametrize("seq_len", LENGTHS)
@pytest.mark.parametrize("window_size", [5, 24])
def test_matches_reference_gqa(seq_len, window_size):
    assert_matches(make_inputs(seq_len, seed=seq_len), TOL, window_size=window_size, chunk_size=16)


def test_window_spans_several_tiles_and_odd_widths():
    inputs = make_inputs(70, head_dim=10, feature_dim=20, value_dim=6)
    assert_matches(inputs, TOL, window_size=40, chunk_size=16, scale=0.2)


@pytest.mark.parametrize("split", [3, 30])
def test_split_and_resume(split):
    """A first call's WindowLinearState continues exactly, with a prefix shorter and longer than W."""
    window_size = 12
    inputs = make_inputs(50)
    *tokens, logit = inputs
    full, full_state = window_linear_attn_triton(*inputs, window_size=window_size, output_final_state=True)
    first, state = window_linear_attn_triton(
        *[t[:, :split] for t in tokens], logit, window_size=window_size, output_final_state=True
    )
    second, end_state = window_linear_attn_triton(
        *[t[:, split:] for t in tokens], logit, window_size=window_size, initial_state=state,
        output_final_state=True,
    )
    assert rel_rms(torch.cat([first, second], dim=1), full) < TOL
    for name, got, want in zip(full_state._fields, end_state, full_state):
        assert rel_rms(got, want) < TOL, name


def test_gradients_reach_initial_state():
    *tokens, logit = make_inputs(30)
    _, state = parallel_window_linear_attn(
        *[t[:, :20].detach() for t in tokens], logit.detach(), window_size=8, output_final_state=True
    )
    state = type(state)(*(t.detach().requires_grad_() for t in state))
    rest = [t[:, 20:].detach().requires_grad_() for t in tokens] + [logit.detach().requires_grad_()]
    assert_matches(rest, TOL, initial_state=state, window_size=8)


@pytest.mark.parametrize(
    "seq_len,window_size,sink_tokens",
    # sinks inside the first tile only; sinks spanning two tiles with a window shorter than a tile; more
    # sinks than tokens (plain causal softmax)
    [(40, 5, 3), (45, 6, 20), (12, 4, 20)],
)
def test_sinks_match_reference(seq_len, window_size, sink_tokens):
    assert_matches(make_inputs(seq_len, seed=seq_len), TOL, window_size=window_size, chunk_size=16,
                   sink_tokens=sink_tokens)


def test_sinks_split_and_resume_with_gradients_to_the_state():
    """A state that caches sinks beside the window continues exactly, gradients included."""
    *tokens, logit = make_inputs(40)
    kw = dict(window_size=6, sink_tokens=4)
    _, state = parallel_window_linear_attn(
        *[t[:, :25].detach() for t in tokens], logit.detach(), output_final_state=True, **kw
    )
    assert state.k.shape[2] == 10  # the 4 sinks and the last 6 keys
    state = type(state)(*(t.detach().requires_grad_() for t in state))
    rest = [t[:, 25:].detach().requires_grad_() for t in tokens] + [logit.detach().requires_grad_()]
    assert_matches(rest, TOL, initial_state=state, chunk_size=16, **kw)


@pytest.mark.parametrize(
    "seq_len,window_size,sink_tokens,half_life",
    # several tiles of linear keys with a window shorter than a tile; a window spanning two tiles with sinks;
    # sinks spanning two tiles and a decay of 2^-1 per token (faster decays leave window_logit's gradient
    # below fp32 rounding: both this kernel and the reference then sit ~1e-4 from a float64 oracle)
    [(100, 5, 0, 3.0), (70, 24, 3, 10.0), (45, 3, 20, 1.0)],
)
def test_half_life_matches_reference(seq_len, window_size, sink_tokens, half_life):
    assert_matches(make_inputs(seq_len, seed=seq_len), TOL, window_size=window_size, chunk_size=16,
                   sink_tokens=sink_tokens, linear_half_life=half_life)


def test_per_head_half_lives_match_reference():
    """One half-life per query head (a tensor `[H]`, as a learned one is at inference): each head decays by its own."""
    half_lives = torch.tensor([1.5, 40.0, 4.0, 9.0])
    assert_matches(make_inputs(90, seed=9), TOL, window_size=7, chunk_size=16, sink_tokens=2,
                   linear_half_life=half_lives)
    with pytest.raises(ValueError, match="no Triton backward"):
        window_linear_attn_triton(*make_inputs(9), window_size=4, linear_half_life=half_lives.requires_grad_())


def test_half_life_split_and_resume_with_gradients_to_the_state():
    """A decayed state (kv decayed to the prefix's last token) continues exactly, gradients included."""
    *tokens, logit = make_inputs(60)
    kw = dict(window_size=6, sink_tokens=2, linear_half_life=5.0)
    _, state = parallel_window_linear_attn(
        *[t[:, :33].detach() for t in tokens], logit.detach(), output_final_state=True, **kw
    )
    state = type(state)(*(t.detach().requires_grad_() for t in state))
    rest = [t[:, 33:].detach().requires_grad_() for t in tokens] + [logit.detach().requires_grad_()]
    assert_matches(rest, TOL, initial_state=state, chunk_size=16, **kw)


def test_public_dispatch_selects_triton():
    inputs = make_inputs(9)
    o, _ = window_linear_attn(*inputs, window_size=4, backend="triton")
    o_ref, _ = parallel_window_linear_attn(*inputs, window_size=4)
    assert rel_rms(o, o_ref) < TOL
    o, _ = window_linear_attn(*inputs, window_size=4, linear_half_life=2.0, backend="triton")
    o_ref, _ = parallel_window_linear_attn(*inputs, window_size=4, linear_half_life=2.0)
    assert rel_rms(o, o_ref) < TOL


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(), reason="needs CUDA and TRITON_INTERPRET=0")
# the plain LoLCATs form, and the demo's attention (32 sinks, linear half-life 64)
@pytest.mark.parametrize("extra", [{}, {"sink_tokens": 32, "linear_half_life": 64.0}])
def test_gpu_bf16(extra):
    inputs = make_inputs(300, head_dim=64, feature_dim=64, value_dim=64, device="cuda")
    low = [x.detach().bfloat16().requires_grad_() for x in inputs[:5]] + [inputs[5]]
    assert_matches(low, GPU_TOL, window_size=64, **extra)
