"""Helpers shared by the test files (tests/ is on sys.path: `from helpers import rel_rms`)."""
from __future__ import annotations

import os

import pytest
import torch

# GPU kernel tests: fp32 tl.dot runs in TF32 there and the inputs are bf16.
GPU_TOL = 2e-2
# Keeps rel_rms finite when the reference is exactly zero (then any nonzero difference is huge).
REL_RMS_FLOOR = 1e-30


def rel_rms(a: torch.Tensor, b: torch.Tensor, floor: float = REL_RMS_FLOOR) -> float:
    """‖a − b‖ / max(‖b‖, floor) in float64: the relative RMS error of `a` against the reference `b`."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(floor)).item()


def window_linear_inputs(batch, seq_len, heads, kv_heads, head_dim, feature_dim, value_dim, seed=0):
    """q, k, v, fq, fk, window_logit for `window_linear_attn` (positive features, as a feature map gives)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_len, heads, head_dim, generator=gen)
    k = torch.randn(batch, seq_len, kv_heads, head_dim, generator=gen)
    v = torch.randn(batch, seq_len, kv_heads, value_dim, generator=gen)
    fq = torch.rand(batch, seq_len, heads, feature_dim, generator=gen)
    fk = torch.rand(batch, seq_len, heads, feature_dim, generator=gen)
    window_logit = torch.randn(heads, generator=gen)
    return q, k, v, fq, fk, window_logit


def use_triton_interpreter() -> bool:
    """Call before importing a kernel module. CPU tests run the kernels in the interpreter, whose flag is
    read when @triton.jit decorates (`TRITON_INTERPRET=0 pytest -m gpu` runs the compiled GPU tests);
    the debug flag fills kernel outputs with NaN so an unwritten tile fails the comparison. Returns
    whether the interpreter is on."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ["LINEARIZE_TRITON_DEBUG"] = "1"
    return os.environ["TRITON_INTERPRET"] == "1"


@pytest.fixture(autouse=True)
def cpu_tests_need_interpreter(request):
    """Autouse in the module that imports it: a CPU test without the interpreter is skipped."""
    if os.environ.get("TRITON_INTERPRET") != "1" and "gpu" not in request.keywords:
        pytest.skip("CPU tensors need TRITON_INTERPRET=1")
