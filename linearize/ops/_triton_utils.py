"""Shared plumbing of the Triton kernels: block sizes, output allocation (NaN-poisoned under a debug
flag), and the autograd bridge "Triton forward, torch-recompute backward".

Backward honesty: the kernels here implement the forward pass only. Gradients come from
`TritonForwardTorchBackward`, which recomputes the op with the op's pure-PyTorch chunk form inside
`backward` and differentiates that (same math, fp32), so training works on the Triton path but its
backward costs a torch chunk forward + backward.
"""
from __future__ import annotations

import os
from typing import Callable

import torch
import triton

# Set to "1" to allocate kernel outputs filled with NaN, so a tile the kernel forgets to write shows up.
DEBUG_ENV = "LINEARIZE_TRITON_DEBUG"
# tl.dot needs every dimension of a tile to be at least 16 on GPU.
MIN_BLOCK = 16
# Largest value tile: keeps the [BK, BV] fp32 state of one program in registers.
MAX_BLOCK_V = 64


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "0") == "1"


def new_output(shape, device) -> torch.Tensor:
    """fp32 output buffer: NaN-filled under the debug flag (catches unwritten tiles), else empty."""
    if debug_enabled():
        return torch.full(shape, float("nan"), dtype=torch.float32, device=device)
    return torch.empty(shape, dtype=torch.float32, device=device)


def block_k(width: int) -> int:
    """One tile covers the whole key/feature width (a power of two, at least MIN_BLOCK)."""
    return max(MIN_BLOCK, triton.next_power_of_2(width))


def block_v(width: int) -> int:
    """Value tile: the width rounded to a power of two, between MIN_BLOCK and MAX_BLOCK_V."""
    return min(MAX_BLOCK_V, max(MIN_BLOCK, triton.next_power_of_2(width)))


def block_t(chunk_size: int, cap: int) -> int:
    """Time tile from the caller's `chunk_size`: the largest power of two ≤ chunk_size, clamped to
    [MIN_BLOCK, cap] (Triton tiles must be powers of two; the result does not depend on it)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    power = 1 << (chunk_size.bit_length() - 1)
    return min(cap, max(MIN_BLOCK, power))


def contiguous(x: torch.Tensor | None) -> torch.Tensor | None:
    """Kernels compute offsets from shapes, never from strides: hand them contiguous tensors."""
    return None if x is None else x.contiguous()


class TritonForwardTorchBackward(torch.autograd.Function):
    """`forward_fn(*tensors, **kwargs)` (Triton) in the forward pass; the gradient of
    `reference_fn(*tensors, **kwargs)` (pure torch, same outputs) in the backward pass.

    Both functions return a tuple of tensors or None; `tensors` may contain None (absent inputs)."""

    @staticmethod
    def forward(ctx, forward_fn: Callable, reference_fn: Callable, kwargs: dict, *tensors):
        ctx.reference_fn = reference_fn
        ctx.kwargs = kwargs
        ctx.save_for_backward(*tensors)
        ctx.set_materialize_grads(False)
        return tuple(forward_fn(*tensors, **kwargs))

    @staticmethod
    def backward(ctx, *output_grads):
        saved = ctx.saved_tensors
        wants = ctx.needs_input_grad[3:]
        inputs = [
            None if t is None else t.detach().requires_grad_(bool(want)) for t, want in zip(saved, wants)
        ]
        with torch.enable_grad():
            outputs = ctx.reference_fn(*inputs, **ctx.kwargs)
        pairs = [(o, g) for o, g in zip(outputs, output_grads) if o is not None and g is not None]
        targets = [t for t, want in zip(inputs, wants) if t is not None and want]
        grads = iter(())
        if pairs and targets:
            outs, out_grads = zip(*pairs)
            grads = iter(torch.autograd.grad(outs, targets, out_grads, allow_unused=True))
        result = [next(grads) if (t is not None and want) else None for t, want in zip(inputs, wants)]
        return (None, None, None, *result)


def apply_with_torch_backward(forward_fn: Callable, reference_fn: Callable, kwargs: dict, *tensors):
    """Run `forward_fn` under autograd with `reference_fn`'s gradient (see the class docstring)."""
    return TritonForwardTorchBackward.apply(forward_fn, reference_fn, kwargs, *tensors)
