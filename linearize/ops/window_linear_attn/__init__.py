"""LoLCATs hybrid attention: sliding-window softmax over the last W keys + linear attention over older
keys, one shared normalizer (`[B, T, H, D]` layout). Public entry points.

`window_linear_attn(q, k, v, fq, fk, window_logit, *, window_size=64, scale=None, initial_state=None,
output_final_state=False, chunk_size=64, backend="auto", form="chunk", sink_tokens=0,
linear_half_life=None) -> (o, WindowLinearState | None)`

- q `[B, T, H, D]`, k `[B, T, H_kv, D]`, v `[B, T, H_kv, V]`, fq/fk `[B, T, H, F]`, window_logit `[H]`.
- Sliding-window-only baseline: pass fq = fk = zeros (the linear branch then contributes nothing).
- `sink_tokens=N`: the first N keys of the sequence are attention sinks, softmax keys of every later
  query (never linear); the state keeps them beside the window (at most N + W cached keys). Pass the
  same N to every call of one sequence.
- `linear_half_life=H`: the linear weights decay as 2^(−(t−s)/H) with the key's distance (naive.py), so the
  linear mass stays bounded at any context length. Every form and the Triton kernel compute it. H is a number
  or a tensor `[H]` (one per query head); a tensor needing its gradient (a learned half-life) runs the torch
  forms (`auto`), the kernel refuses it.
- `form` selects the computation: "chunk" (default; `[C, W + C]` blocks, the only form with a Triton
  kernel), "parallel" (quadratic; the reference) or "recurrent" (token by token). `FORMS` maps each
  name to its pure-PyTorch function, all with the same arguments. For forms other than "chunk",
  `chunk_size` is ignored and `backend` must be "auto" or "torch".
- `backend`: "auto" uses `triton.window_linear_attn_triton` for CUDA tensors when that module imports,
  else torch; "triton" forces it (ImportError if unavailable); "torch" forces the torch chunk form.
  There is no "fla" backend here: fla has no sliding-window + linear hybrid op.

Files: `naive.py` the obvious forms (parallel, recurrent: the oracles; recurrent is also the decoding
step), `chunk.py` the tuned CPU chunk form, `triton.py` the fused kernel.
Math, shapes and the state layout: see `naive.py`.
"""
from __future__ import annotations

import torch

from .._common import BACKENDS, run_form
from .chunk import chunk_window_linear_attn_torch
from .naive import (
    WindowLinearState,
    parallel_window_linear_attn,
    recurrent_window_linear_attn,
    window_linear_attn_weights,
)

FORMS = {
    "chunk": chunk_window_linear_attn_torch,
    "parallel": parallel_window_linear_attn,
    "recurrent": recurrent_window_linear_attn,
}


def load_triton():
    """The Triton chunk function, imported on first use. A relative import, so an export's flat bundle
    (`models/bundle.py`) ships the kernel file and finds it as a sibling."""
    from .triton import window_linear_attn_triton

    return window_linear_attn_triton


def window_linear_attn(
    q,
    k,
    v,
    fq,
    fk,
    window_logit,
    *,
    window_size=64,
    scale=None,
    initial_state=None,
    output_final_state=False,
    chunk_size=64,
    backend="auto",
    form="chunk",
    sink_tokens=0,
    linear_half_life=None,
):
    """Hybrid window + linear attention → (o `[B, T, H, V]`, `WindowLinearState` or None)."""
    if backend == "fla":
        raise ValueError(
            "backend='fla' is not available for window_linear_attn (fla has no sliding-window + linear "
            f"hybrid op); valid backends: {', '.join(BACKENDS)}"
        )
    kwargs = dict(
        window_size=window_size, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
    )
    if sink_tokens:  # only when set, so every form and backend without sinks sees the arguments it always did
        kwargs["sink_tokens"] = sink_tokens
    if linear_half_life is not None:  # likewise only when set
        kwargs["linear_half_life"] = linear_half_life
        if isinstance(linear_half_life, torch.Tensor) and linear_half_life.requires_grad and backend == "auto":
            backend = "torch"  # a learned half-life: the kernel computes no gradient for it
    return run_form(
        FORMS, load_triton, (q, k, v, fq, fk, window_logit), kwargs, form=form, backend=backend,
        chunk_size=chunk_size,
    )


__all__ = [
    "FORMS",
    "WindowLinearState",
    "chunk_window_linear_attn_torch",
    "parallel_window_linear_attn",
    "recurrent_window_linear_attn",
    "window_linear_attn",
    "window_linear_attn_weights",
]
