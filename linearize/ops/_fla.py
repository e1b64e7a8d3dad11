"""`backend="fla"`: run `chunk_linear_attn` / `chunk_gated_linear_attn` / `chunk_gated_delta_rule` on the
Triton kernels of fla (flash-linear-attention, `pip install 'linearize[fla]'`; written against 0.6.0, whose
source the mappings below were read from). fla is imported only when a call asks for it, and it needs CUDA
tensors.

Mapping onto fla 0.6.0 (the linear ops take `[B, T, H, D]` inputs with equal heads and keep states `[B, H, K, V]`
in fp32, `initial_state` must be fp32):
- linear: `fla.ops.linear_attn.chunk_linear_attn(q, k, v, scale, initial_state, output_final_state,
  normalize=False)`, i.e. `o_t = scale · Σ_{s≤t} (q_t·k_s) v_s`, state `S = S0 + Σ k_s v_sᵀ`.
- gated: `fla.ops.gla.chunk_gla(q, k, v, g, scale, initial_state, output_final_state)` with g the
  per-key log-decay: `S_t = diag(exp(g_t)) S_{t-1} + k_t v_tᵀ`, `o_t = scale · q_tᵀ S_t` (our GLA form).
- normalize=True (both ops): v gets a ones column and fla runs unnormalized with scale 1, so the last
  output column is the normalizer `Σ q_t·k_s` (decayed, for the gated op) and the state is our
  `[B, H, K, V + 1]` layout (last column the key sum z); then o = numerator / (normalizer + NORMALIZE_EPS).
  fla's own `normalize=True` (linear op only) is not used: it divides by `scale · q·z + 1e-10`, an
  effective eps of 1e-10 / scale instead of our unscaled 1e-6, and keeps the key sum in a separate
  `(kv, z [B, 1, H, K])` state tuple.
- GQA: fla wants as many k/v/g heads as query heads, so they are expanded with `repeat_interleave`
  (query head h reads kv head h // group), which copies them; our torch and Triton kernels index the
  shared heads instead.
- gated delta rule (`chunk_gated_delta_rule`): fla's `fla.ops.gated_delta_rule.chunk_gated_delta_rule(q, k, v,
  g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel)` for a per-head g `[B, T, H]`,
  `fla.ops.kda.chunk_kda(...)` with the same arguments for a per-channel g `[B, T, H, K]`; both take g as the
  natural-log decay (they convert to base 2 inside), beta after the sigmoid (`use_beta_sigmoid_in_kernel`
  left False, so β ∈ (0, 2] passes as given), states `[B, H, K, V]` (`state_v_first` left False), and compute
  `S_t = (I − β_t k_t k_tᵀ) Diag(exp(g_t)) S_{t−1} + β_t k_t v_tᵀ`, `o_t = scale · S_tᵀ q_t`, as ours (checked
  against their `naive_recurrent_gated_delta_rule` / `naive_recurrent_kda`). `use_qk_l2norm_in_kernel=False`:
  our mechanisms normalize q and k themselves. fla's own grouping (GVA) goes the other way (more value heads
  than q/k heads), so our GQA expands k, v, g, beta and the initial state to the query heads; the group's
  copies of the state stay identical, and the final state is the first copy of each group. `chunk_kda`
  asserts an fp32 initial state; both keep the state in fp32 and return o in q's dtype.
- q, k, v are brought to one dtype (fla's dots need matching operands); fla accumulates in fp32 but
  writes o (and so the normalizer column) in that dtype, whereas the torch backend stays fp32 until the
  final cast. The output is returned in v's dtype, the final state in fp32. `chunk_size` is ignored
  (fla picks its own).
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch

from ._common import NORMALIZE_EPS, append_ones, check_heads, check_same_tokens

FLA_REQUIREMENT = "flash-linear-attention==0.6.0"
INSTALL_HINT = "pip install 'linearize[fla]'"


def load_fla_function(module_name: str, function_name: str) -> Callable:
    """`function_name` from fla's `module_name`; ImportError with the install command if fla is missing."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(
            f"backend='fla' needs flash-linear-attention: {INSTALL_HINT} (or pip install {FLA_REQUIREMENT}); "
            f"importing {module_name} failed: {err}"
        ) from err
    function = getattr(module, function_name, None)
    if function is None:
        raise ImportError(
            f"backend='fla': {module_name} has no {function_name}; this adapter targets {FLA_REQUIREMENT}"
        )
    return function


def check_device(*tensors: torch.Tensor) -> None:
    """Raise unless every tensor is on CUDA: fla's kernels are GPU Triton kernels, and on CPU they fail
    deep inside triton. (A module-level function so tests can swap it out to drive a plain-torch fake fla.)"""
    devices = sorted({str(t.device) for t in tensors if t is not None and not t.is_cuda})
    if devices:
        raise ValueError(
            f"backend='fla' needs CUDA tensors (fla's kernels are GPU Triton kernels), got {', '.join(devices)}; "
            "use backend='torch' (or 'auto') on CPU"
        )


def _prepare(q, k, v, g, scale, normalize, initial_state):
    """Checks shapes like the torch forms, expands k/v/g to the query heads, appends the ones column when
    normalized and returns `(q, k, v, g, fla_scale, s0)` ready for fla."""
    tensors = dict(q=q, k=k, v=v) if g is None else dict(q=q, k=k, v=v, g=g)
    check_same_tokens(**tensors)
    check_device(*tensors.values(), initial_state)
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k has {k.shape[2]} heads but v has {v.shape[2]}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k feature widths differ: {q.shape[-1]} vs {k.shape[-1]}")
    if g is not None and g.shape[2:] != k.shape[2:]:
        raise ValueError(f"g must match k's heads and width {tuple(k.shape[2:])}, got {tuple(g.shape[2:])}")
    num_heads = q.shape[2]
    group = check_heads(num_heads, k.shape[2])
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if group > 1:
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)  # [B, T, H, ·] copies
        g = None if g is None else g.repeat_interleave(group, dim=2)  # [B, T, H, K]
    if normalize:
        v = append_ones(v)  # [B, T, H, V + 1]; scale cancels in the normalized form, so fla runs with 1
        fla_scale = 1.0
    else:
        fla_scale = scale if scale is not None else q.shape[-1] ** -0.5
    state_shape = (q.shape[0], num_heads, q.shape[-1], v.shape[-1])
    s0 = None
    if initial_state is not None:
        if tuple(initial_state.shape) != state_shape:
            raise ValueError(f"initial_state must have shape {state_shape}, got {tuple(initial_state.shape)}")
        s0 = initial_state.float().contiguous()  # fla asserts an fp32 state
    return q, k, v, g, fla_scale, s0


def _finish(o, final, normalize, dtype, output_final_state):
    if normalize:
        o = o.float()
        o = o[..., :-1] / (o[..., -1:] + NORMALIZE_EPS)  # [B, T, H, V]
    return o.to(dtype), (final if output_final_state else None)


def chunk_linear_attn_fla(
    q, k, v, *, scale=None, normalize=True, initial_state=None, output_final_state=False, chunk_size=None
):
    """`chunk_linear_attn` semantics on fla's `chunk_linear_attn` (see the module docstring)."""
    qf, kf, vf, _, fla_scale, s0 = _prepare(q, k, v, None, scale, normalize, initial_state)
    fla_linear = load_fla_function("fla.ops.linear_attn", "chunk_linear_attn")
    o, final = fla_linear(
        qf, kf, vf, scale=fla_scale, initial_state=s0, output_final_state=output_final_state, normalize=False
    )
    return _finish(o, final, normalize, v.dtype, output_final_state)


def chunk_gated_linear_attn_fla(
    q, k, v, g, *, scale=None, normalize=False, initial_state=None, output_final_state=False, chunk_size=None
):
    """`chunk_gated_linear_attn` semantics on fla's `chunk_gla` (see the module docstring)."""
    qf, kf, vf, gf, fla_scale, s0 = _prepare(q, k, v, g, scale, normalize, initial_state)
    fla_gla = load_fla_function("fla.ops.gla", "chunk_gla")
    o, final = fla_gla(qf, kf, vf, gf, scale=fla_scale, initial_state=s0, output_final_state=output_final_state)
    return _finish(o, final, normalize, v.dtype, output_final_state)


# fla 0.6.0's gated delta rule functions by the rank of g: per head `[B, T, H]`, per key channel `[B, T, H, K]`.
FLA_DELTA_FUNCTIONS = {
    3: ("fla.ops.gated_delta_rule", "chunk_gated_delta_rule"),
    4: ("fla.ops.kda", "chunk_kda"),
}


def chunk_gated_delta_rule_fla(
    q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False, chunk_size=None
):
    """`chunk_gated_delta_rule` semantics on fla's `chunk_gated_delta_rule` (per-head g) or `chunk_kda`
    (per-channel g); see the module docstring. `chunk_size` is ignored (fla's default, 64)."""
    from .gated_delta_rule.naive import check_delta_shapes  # here: the op package imports this module

    check_delta_shapes(q, k, v, g, beta, initial_state)
    check_device(q, k, v, g, beta, initial_state)
    kv_heads = k.shape[2]
    group = q.shape[2] // kv_heads
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    qf, kf, vf = q.to(dtype), k.to(dtype), v.to(dtype)
    s0 = None if initial_state is None else initial_state.float()  # fla asserts an fp32 state
    if group > 1:
        kf, vf, g, beta = (x.repeat_interleave(group, dim=2) for x in (kf, vf, g, beta))  # [B, T, H, ...] copies
        s0 = None if s0 is None else s0.repeat_interleave(group, dim=1)  # [B, H, K, V]
    fla_delta = load_fla_function(*FLA_DELTA_FUNCTIONS[g.dim()])
    o, final = fla_delta(
        qf, kf, vf, g, beta, scale=q.shape[-1] ** -0.5 if scale is None else scale,
        initial_state=None if s0 is None else s0.contiguous(), output_final_state=output_final_state,
        use_qk_l2norm_in_kernel=False,
    )
    if output_final_state:
        final = final.unflatten(1, (kv_heads, group))[:, :, 0]  # [B, H_kv, K, V]: the group's copies are equal
    return o.to(q.dtype), (final if output_final_state else None)
