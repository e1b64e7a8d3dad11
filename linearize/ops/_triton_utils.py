"""Shared plumbing of the Triton kernels: block sizes and output allocation (NaN-poisoned under a
debug flag, so a tile a kernel forgets to write shows up in tests)."""
from __future__ import annotations

import os

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
