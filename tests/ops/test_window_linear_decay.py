"""The LoLCATs hybrid with a decayed linear branch (`linear_half_life`): every form is the float64 formula
with a_lin(t, s)·2^(−(t−s)/H), states continue across forms and into decode steps, and the linear mass stays
bounded where the undecayed one grows with the context. (Chunk gradients with a half-life: the gradient test
of test_naive_window_linear_attn.py; the Triton kernel with one: test_triton_window_linear_attn.py.)"""
import pytest
import torch

from linearize.ops.window_linear_attn import FORMS, window_linear_attn

from helpers import rel_rms
from test_naive_window_linear_attn import HEADS, TOL, assert_states_close, make_inputs, oracle, sliced


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("window_size,sink_tokens,half_life", [(3, 0, 2.0), (2, 3, 5.0), (5, 1, 0.5)])
def test_forms_match_float64_oracle(form, window_size, sink_tokens, half_life):
    inputs = make_inputs(17, batch=1)
    ref = oracle(*[t.double() for t in inputs], window_size=window_size, scale=0.3, sink_tokens=sink_tokens,
                 half_life=half_life)
    for extra in ([{"chunk_size": 4}, {"chunk_size": 16}] if form == "chunk" else [{}]):
        out, _ = FORMS[form](*inputs, window_size=window_size, scale=0.3, sink_tokens=sink_tokens,
                             linear_half_life=half_life, **extra)
        assert rel_rms(out.double(), ref) <= TOL, extra


def test_the_decay_changes_the_output_and_a_long_half_life_is_none():
    """A decay that is never felt (half-life far beyond the sequence) is the undecayed form; a short one is not."""
    inputs = make_inputs(40)
    plain, _ = window_linear_attn(*inputs, window_size=4, chunk_size=8)
    far, _ = window_linear_attn(*inputs, window_size=4, chunk_size=8, linear_half_life=1e9)
    near, _ = window_linear_attn(*inputs, window_size=4, chunk_size=8, linear_half_life=3.0)
    assert rel_rms(far, plain) <= TOL
    assert rel_rms(near, plain) > 1e-2


@pytest.mark.parametrize("split", [1, 5, 37, 70])
def test_split_and_resume_equals_one_call(split):
    """Every form continues every form's decayed state (cuts before and after the first key turns linear)."""
    inputs = make_inputs(90)
    kw = dict(window_size=6, sink_tokens=2, linear_half_life=7.0, output_final_state=True)
    full, full_state = FORMS["parallel"](*inputs, **kw)
    for first, second in [("chunk", "recurrent"), ("recurrent", "chunk"), ("parallel", "chunk"), ("chunk", "parallel")]:
        extra = lambda form: {"chunk_size": 16} if form == "chunk" else {}  # noqa: E731
        head, state = FORMS[first](*sliced(inputs, 0, split), **kw, **extra(first))
        tail, end_state = FORMS[second](*sliced(inputs, split, 90), initial_state=state, **kw, **extra(second))
        assert rel_rms(torch.cat([head, tail], dim=1), full) <= TOL, (first, second)
        assert_states_close(end_state, full_state)


def test_decode_steps_continue_prefill():
    inputs = make_inputs(40)
    kw = dict(window_size=5, sink_tokens=2, chunk_size=8, linear_half_life=4.0)
    full, _ = window_linear_attn(*inputs, **kw)
    _, state = window_linear_attn(*sliced(inputs, 0, 25), output_final_state=True, **kw)
    steps = []
    for t in range(25, 40):
        out, state = window_linear_attn(*sliced(inputs, t, t + 1), initial_state=state, output_final_state=True,
                                        form="recurrent", **kw)
        steps.append(out)
    assert rel_rms(torch.cat(steps, dim=1), full[:, 25:]) <= TOL


def test_the_decayed_state_stays_bounded():
    """Constant features and values: the undecayed state's mass grows with the tokens that left the window,
    the decayed one's converges to Σ_{d ≥ W} γ^d = γ^W / (1 − γ)."""
    tokens, window, half_life = 400, 4, 8.0
    q, k, v, fq, fk, window_logit = make_inputs(tokens, batch=1)
    ones = torch.ones_like(fq)
    gamma = 2 ** (-1 / half_life)
    masses = {}
    for name, h in (("plain", None), ("decayed", half_life)):
        _, state = window_linear_attn(q, k, v, ones, ones, window_logit, window_size=window, linear_half_life=h,
                                      output_final_state=True)
        masses[name] = state.kv[..., -1]  # [B, H, F]: the normalizer column, Σ over left keys of fk·decay
    # stored decayed to the last token τ; the keys that left are τ − W and older (ages W, W + 1, ...)
    bound = gamma ** window / (1 - gamma)
    assert torch.allclose(masses["decayed"], torch.full_like(masses["decayed"], bound), rtol=1e-4)
    assert torch.allclose(masses["plain"], torch.full_like(masses["plain"], tokens - window), rtol=1e-6)


def test_bad_half_lives_raise():
    inputs = make_inputs(10)
    for form in FORMS:
        with pytest.raises(ValueError, match="linear_half_life must be > 0"):
            FORMS[form](*inputs, window_size=4, linear_half_life=0.0)


# one half-life per query head (HEADS = 4): fast, slow, and two in between
PER_HEAD = [1.5, 40.0, 4.0, 9.0]


@pytest.mark.parametrize("form", list(FORMS))
def test_per_head_half_lives_match_the_float64_oracle(form):
    inputs = make_inputs(23, batch=1)
    half_lives = torch.tensor(PER_HEAD)
    ref = oracle(*[t.double() for t in inputs], window_size=3, scale=0.3, sink_tokens=2,
                 half_life=half_lives.double())
    for extra in ([{"chunk_size": 4}, {"chunk_size": 16}] if form == "chunk" else [{}]):
        out, _ = FORMS[form](*inputs, window_size=3, scale=0.3, sink_tokens=2, linear_half_life=half_lives, **extra)
        assert rel_rms(out.double(), ref) <= TOL, extra


def test_per_head_half_lives_are_each_heads_own_half_life():
    """Head h of a per-head call equals a one-half-life call with head h's half-life, outputs and state."""
    inputs = make_inputs(50)
    kw = dict(window_size=5, sink_tokens=2, chunk_size=8, output_final_state=True)
    out, state = window_linear_attn(*inputs, linear_half_life=torch.tensor(PER_HEAD), **kw)
    for h, half_life in enumerate(PER_HEAD):
        one, one_state = window_linear_attn(*inputs, linear_half_life=half_life, **kw)
        assert rel_rms(out[:, :, h], one[:, :, h]) <= TOL, h
        assert rel_rms(state.kv[:, h], one_state.kv[:, h]) <= TOL, h


def test_per_head_split_resume_and_decode():
    """A per-head decayed state continues across forms and into decode steps."""
    inputs = make_inputs(60)
    half_lives = torch.tensor(PER_HEAD)
    kw = dict(window_size=6, sink_tokens=2, linear_half_life=half_lives, output_final_state=True)
    full, full_state = FORMS["parallel"](*inputs, **kw)
    head, state = FORMS["chunk"](*sliced(inputs, 0, 37), chunk_size=16, **kw)
    steps = [head]
    for t in range(37, 60):
        out, state = FORMS["recurrent"](*sliced(inputs, t, t + 1), initial_state=state, **kw)
        steps.append(out)
    assert rel_rms(torch.cat(steps, dim=1), full) <= TOL
    assert_states_close(state, full_state)


@pytest.mark.parametrize("form", list(FORMS))
def test_a_learned_half_life_gets_the_float64_gradient(form):
    """Gradients reach a per-head half-life tensor through the output, equal to the float64 oracle's."""
    inputs = make_inputs(21, batch=1)
    weights = torch.randn(1, 21, HEADS, inputs[2].shape[-1], generator=torch.Generator().manual_seed(3))
    ref_lives = torch.tensor(PER_HEAD, dtype=torch.float64, requires_grad=True)
    ref = oracle(*[t.double() for t in inputs], window_size=3, scale=0.3, sink_tokens=1, half_life=ref_lives)
    (ref_grad,) = torch.autograd.grad((ref * weights.double()).sum(), ref_lives)
    lives = torch.tensor(PER_HEAD, requires_grad=True)
    extra = {"chunk_size": 8} if form == "chunk" else {}
    out, _ = FORMS[form](*inputs, window_size=3, scale=0.3, sink_tokens=1, linear_half_life=lives, **extra)
    (grad,) = torch.autograd.grad((out * weights).sum(), lives)
    assert ref_grad.abs().min() > 1e-4  # every head's half-life matters here
    assert rel_rms(grad.double(), ref_grad) <= 1e-4  # fp32 forms against float64: summation order over 21² terms


def test_a_learned_half_life_runs_the_torch_forms_not_the_kernel():
    inputs = make_inputs(12)
    lives = torch.tensor(PER_HEAD, requires_grad=True)
    out, _ = window_linear_attn(*inputs, window_size=3, linear_half_life=lives)  # auto: torch on any device
    assert out.requires_grad
    with pytest.raises(ValueError, match="per head"):
        window_linear_attn(*inputs, window_size=3, linear_half_life=torch.tensor([4.0, -1.0, 2.0, 3.0]))
