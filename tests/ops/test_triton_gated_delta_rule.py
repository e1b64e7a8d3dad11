"""Triton gated delta rule (forward and backward kernels) against the token loop in float64: output, final
state and all six gradients, on lengths that do not fit the time tile, GQA, both decay shapes, a carried
initial state, chunk sizes 16/32/64, several value tiles, strong decay, split-and-resume; CPU via the
interpreter (tiny shapes: it is slow), and a `gpu` test on CUDA."""
from helpers import GPU_TOL, cpu_tests_need_interpreter, rel_rms, use_triton_interpreter  # noqa: F401

INTERPRETED = use_triton_interpreter()  # before the kernel imports below

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
from test_gated_delta_rule import MILD_DECAY_DIVISOR, grads, make_inputs  # noqa: E402

import linearize.ops.gated_delta_rule.triton as gdr_triton  # noqa: E402
from linearize.ops.gated_delta_rule import chunk_gated_delta_rule  # noqa: E402
from linearize.ops.gated_delta_rule.naive import recurrent_gated_delta_rule  # noqa: E402
from linearize.ops.gated_delta_rule.triton import chunk_gated_delta_rule_triton  # noqa: E402

# fp32 kernels (exact fp32 dots in the interpreter) against a float64 loop: only fp32 rounding through the
# chunk's solve and the state walk differs, ~5e-7 observed
TOL = 1e-5
NAMES = ["q", "k", "v", "g", "beta", "initial_state"]
SCALE = 0.4


def float64_reference(inputs, **kwargs):
    """The token loop (`naive.py`) on float64 copies of the fp32 inputs, and those copies (for gradients)."""
    copies = [x.detach().double().requires_grad_() for x in inputs]
    q, k, v, g, beta, s0 = copies
    return recurrent_gated_delta_rule(q, k, v, g, beta, scale=SCALE, initial_state=s0, **kwargs), copies


def assert_matches_reference(inputs, chunk_size):
    """Output, final state and the gradients of all six inputs within TOL of the float64 loop."""
    q, k, v, g, beta, s0 = inputs
    o, state = chunk_gated_delta_rule_triton(
        q, k, v, g, beta, scale=SCALE, initial_state=s0, output_final_state=True, chunk_size=chunk_size
    )
    (o_ref, state_ref), copies = float64_reference(inputs, output_final_state=True)
    assert o.dtype == torch.float32 and state.dtype == torch.float32
    assert rel_rms(o, o_ref) <= TOL
    assert rel_rms(state, state_ref) <= TOL
    for name, grad, grad_ref in zip(NAMES, grads(as_double(o, state), inputs), grads((o_ref, state_ref), copies)):
        assert rel_rms(grad, grad_ref) <= TOL, name


def as_double(*outputs):
    """`grads` draws its projection in each output's dtype: float64 outputs get the reference's draws."""
    return [x.double() for x in outputs]


def fp32_leaves(seq_len, per_channel, **kwargs):
    return [x.requires_grad_() for x in make_inputs(seq_len, per_channel, dtype=torch.float32, **kwargs)]


CASES = [  # (seq_len, per_channel, chunk_size, kv_heads, beta_max, batch); the interpreter runs programs one by one
    (1, False, 16, 2, 1.0, 2),
    (37, False, 16, 2, 2.0, 2),  # odd length; β up to 2 (negative eigenvalues of I − β k kᵀ)
    (37, True, 32, 1, 1.0, 2),  # per channel (its time tile stays 16), one kv head for all four query heads
    (33, False, 32, 4, 1.0, 1),  # no GQA
    (70, False, 64, 2, 1.0, 1),
    (50, True, 64, 2, 2.0, 1),
]


@pytest.mark.parametrize("seq_len,per_channel,chunk_size,kv_heads,beta_max,batch", CASES)
def test_matches_float64_loop_in_outputs_and_gradients(seq_len, per_channel, chunk_size, kv_heads, beta_max, batch):
    inputs = fp32_leaves(seq_len, per_channel, kv_heads=kv_heads, beta_max=beta_max, batch=batch, seed=seq_len)
    assert_matches_reference(inputs, chunk_size)


@pytest.mark.parametrize("per_channel", [False, True])
def test_several_value_tiles_and_unpadded_widths(per_channel):
    """V = 70 spans two value tiles (the dq, dk, dβ, dg shares are summed); K = 20 leaves the key tile part
    empty."""
    inputs = fp32_leaves(20, per_channel, heads=2, kv_heads=1, key_dim=20, value_dim=70, batch=1)
    assert_matches_reference(inputs, chunk_size=16)


@pytest.mark.parametrize("per_channel", [False, True])
def test_strong_decay_stays_finite_and_exact(per_channel):
    # log-decays up to 40 × logsigmoid, cumulative sums thousands below 0 inside a chunk: any exp(−Γ) (a
    # positive exponent) would overflow; the kernels must only exponentiate differences ≤ 0
    q, k, v, g, beta, s0 = make_inputs(40, per_channel, batch=1, dtype=torch.float32, seed=3)
    g = g * torch.linspace(0, 40 * MILD_DECAY_DIVISOR, g.shape[-1])  # last dim: kv heads or key channels
    inputs = [x.requires_grad_() for x in (q, k, v, g, beta, s0)]
    assert_matches_reference(inputs, chunk_size=32)


@pytest.mark.parametrize("per_channel", [False, True])
def test_gradients_without_states(per_channel):
    """No initial state and no final state: the kernels' state-free paths."""
    q, k, v, g, beta, _ = fp32_leaves(21, per_channel, seed=5)
    o, state = chunk_gated_delta_rule_triton(q, k, v, g, beta, scale=SCALE, chunk_size=16)
    o_ref, _ = recurrent_gated_delta_rule(*(x.double() for x in (q, k, v, g, beta)), scale=SCALE)
    assert state is None
    assert rel_rms(o, o_ref) <= TOL
    inputs = [q, k, v, g, beta]
    for name, grad, grad_ref in zip(NAMES, grads(as_double(o), inputs), grads([o_ref], inputs)):
        assert rel_rms(grad, grad_ref) <= TOL, name


def test_gradient_through_final_state_only():
    """Only the final state is used: the backward receives no output gradient."""
    inputs = fp32_leaves(20, True, seed=4)
    q, k, v, g, beta, s0 = inputs
    _, state = chunk_gated_delta_rule_triton(
        q, k, v, g, beta, scale=SCALE, initial_state=s0, output_final_state=True, chunk_size=16
    )
    (_, state_ref), copies = float64_reference(inputs, output_final_state=True)
    # q does not reach the state
    got = torch.autograd.grad(state.square().sum(), inputs[1:])
    want = torch.autograd.grad(state_ref.square().sum(), copies[1:])
    for name, grad, grad_ref in zip(NAMES[1:], got, want):
        assert rel_rms(grad, grad_ref) <= TOL, name


@pytest.mark.parametrize("per_channel", [False, True])
def test_split_and_resume_equals_one_call(per_channel):
    q, k, v, g, beta, s0 = make_inputs(45, per_channel, dtype=torch.float32)
    kwargs = dict(scale=SCALE, output_final_state=True, chunk_size=16)
    full, full_state = chunk_gated_delta_rule_triton(q, k, v, g, beta, initial_state=s0, **kwargs)
    cut = 21  # inside the second chunk
    first, mid = chunk_gated_delta_rule_triton(*(x[:, :cut] for x in (q, k, v, g, beta)), initial_state=s0, **kwargs)
    second, end = chunk_gated_delta_rule_triton(*(x[:, cut:] for x in (q, k, v, g, beta)), initial_state=mid, **kwargs)
    assert rel_rms(torch.cat([first, second], dim=1), full) <= TOL
    assert rel_rms(end, full_state) <= TOL


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts calls of the Triton function as the public op's lazy import finds it."""
    calls = []
    kernel = gdr_triton.chunk_gated_delta_rule_triton

    def spy(*args, **kwargs):
        calls.append(kwargs["chunk_size"])
        return kernel(*args, **kwargs)

    monkeypatch.setattr(gdr_triton, "chunk_gated_delta_rule_triton", spy)
    return calls


def test_public_dispatch_selects_triton(kernel_calls):
    q, k, v, g, beta, s0 = make_inputs(9, False, dtype=torch.float32)
    o, state = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True,
                                      chunk_size=32, backend="triton")
    o_ref, state_ref = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True,
                                              form="recurrent")
    assert kernel_calls == [32]
    assert rel_rms(o, o_ref) <= TOL and rel_rms(state, state_ref) <= TOL


def test_auto_runs_torch_on_cpu_tensors(kernel_calls):
    q, k, v, g, beta, _ = make_inputs(9, True, dtype=torch.float32)
    chunk_gated_delta_rule(q, k, v, g, beta, backend="auto")
    assert kernel_calls == []


def test_bf16_inputs_give_bf16_output():
    q, k, v, g, beta, s0 = make_inputs(17, False, dtype=torch.bfloat16)
    o, state = chunk_gated_delta_rule_triton(q, k, v, g, beta, initial_state=s0, output_final_state=True)
    o_ref, _ = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=s0)
    assert o.dtype == torch.bfloat16 and state.dtype == torch.float32
    assert rel_rms(o, o_ref) <= 1e-2  # both round the fp32 result to bf16 (8 mantissa bits)


def test_bad_shapes_raise():
    q, k, v, g, beta, s0 = make_inputs(4, False, dtype=torch.float32)
    with pytest.raises(ValueError, match="beta must be"):
        chunk_gated_delta_rule_triton(q, k, v, g, beta[..., None])
    with pytest.raises(ValueError, match="g must be"):
        chunk_gated_delta_rule_triton(q, k, v, g[:, :, :1], beta)
    with pytest.raises(ValueError, match="initial_state must be"):
        chunk_gated_delta_rule_triton(q, k, v, g, beta, initial_state=s0[:, :1])


# Compiles both kernels for an sm_90 target in a fresh interpreter without TRITON_INTERPRET (here the kernels are
# interpreted functions) and prints the larger shared-memory need; triton compiles without a GPU.
COMPILE_SCRIPT = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from linearize.ops.gated_delta_rule import triton as kernels

key_dim, per_channel, chunk_size = int(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
meta = kernels.launch_meta(key_dim, 128, 8, 2, per_channel, chunk_size)
flags = {
    kernels._gdr_fwd_kernel: dict(USE_INITIAL_STATE=True, STORE_FINAL_STATE=True, WRITE_OUTPUT=True,
                                  STORE_STATES=False, states=None),
    kernels._gdr_bwd_kernel: dict(USE_FINAL_GRAD=True),
}
types = dict(scale="fp32", T="i32", q="*bf16", k="*bf16", v="*bf16")
shared = 0
for kernel, kernel_flags in flags.items():
    constants = dict(meta, **kernel_flags)
    signature = {name: "constexpr" if name in constants else types.get(name, "*fp32") for name in kernel.arg_names}
    positions = {(kernel.arg_names.index(name),): value for name, value in constants.items()}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=positions), target=GPUTarget("cuda", 90, 32))
    shared = max(shared, compiled.metadata.shared)
print(meta["BT"], shared)
"""
HOPPER_SHARED_BYTES = 227 * 1024  # the most shared memory one block may use on an H100 / H200


@pytest.mark.slow
@pytest.mark.parametrize("key_dim,per_channel,tile", [(64, False, 64), (128, False, 32), (128, True, 16)])
def test_kernels_compile_for_hopper_within_shared_memory(key_dim, per_channel, tile):
    """The interpreter checks neither compilation nor resources: compile for sm_90 (no GPU needed, ~15 s per
    case) at chunk_size 64 and check the time tile the wrapper picks fits in shared memory."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = [str(key_dim), str(int(per_channel)), "64"]
    result = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT, *args], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    picked, shared = map(int, result.stdout.split())
    assert picked == tile
    assert shared <= HOPPER_SHARED_BYTES


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(), reason="needs CUDA and TRITON_INTERPRET=0")
@pytest.mark.parametrize("per_channel,chunk_size", [(False, 64), (False, 16), (True, 64)])
def test_gpu_bf16_against_float64_loop(per_channel, chunk_size):
    """Compiled kernels, bf16 q/k/v, head width 64, T = 300 (not a multiple of any tile)."""
    q, k, v, g, beta, s0 = make_inputs(300, per_channel, key_dim=64, value_dim=64, dtype=torch.float32)
    inputs = [x.cuda().bfloat16() for x in (q, k, v)] + [x.cuda() for x in (g, beta, s0)]
    inputs = [x.requires_grad_() for x in inputs]
    q, k, v, g, beta, s0 = inputs
    o, state = chunk_gated_delta_rule_triton(
        q, k, v, g, beta, scale=SCALE, initial_state=s0, output_final_state=True, chunk_size=chunk_size
    )
    (o_ref, state_ref), copies = float64_reference(inputs, output_final_state=True)
    # GPU_TOL: bf16 output rounding and TF32 dots in the kernels
    assert rel_rms(o, o_ref) <= GPU_TOL
    assert rel_rms(state, state_ref) <= GPU_TOL
    for name, grad, grad_ref in zip(NAMES, grads(as_double(o, state), inputs), grads((o_ref, state_ref), copies)):
        assert rel_rms(grad, grad_ref) <= GPU_TOL, name
