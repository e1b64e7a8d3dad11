"""Causal gated linear attention (GLA form, `[B, T, H, K]` layout), public entry points.

`chunk_gated_linear_attn(q, k, v, g, *, scale=None, normalize=False, initial_state=None,
output_final_state=False, chunk_size=64, backend="auto", form="chunk") -> (o, final_state)`

- g `[B, T, H_kv, K]` is the per-key-dimension log-decay (≤ 0), with k's heads.
- `form` selects the computation: "chunk" (default; the only form with a Triton kernel),
  "parallel" (quadratic, T²K memory; the reference) or "recurrent" (token by token). `FORMS` maps each
  name to its pure-PyTorch function, all with the same arguments. For forms other than "chunk",
  `chunk_size` is ignored and `backend` must be "auto" or "torch".
- `backend`: "auto" uses `triton.chunk_gated_linear_attn_triton` for CUDA tensors when that module
  imports, else torch; "triton" forces it (ImportError if unavailable); "torch" forces the torch chunk form;
  "fla" runs fla's `chunk_gla` (optional extra `linearize[fla]`, CUDA tensors only, never picked by
  "auto"; same results and state layout, see `.._fla`).

Files: `naive.py` the obvious forms (parallel, recurrent: the oracles; recurrent is also the decoding
step), `chunk.py` the tuned CPU chunk form, `triton.py` the kernel template (linear attention runs it
without a gate). Math, shapes and state layout: see `naive.py`.
"""
from __future__ import annotations

from .._common import run_form
from .._fla import chunk_gated_linear_attn_fla
from .chunk import chunk_gated_linear_attn_torch
from .naive import parallel_gated_linear_attn, recurrent_gated_linear_attn

FORMS = {
    "chunk": chunk_gated_linear_attn_torch,
    "parallel": parallel_gated_linear_attn,
    "recurrent": recurrent_gated_linear_attn,
}


def load_triton():
    """The Triton chunk function, imported on first use. A relative import, so an export's flat bundle
    (`models/bundle.py`) ships the kernel file and finds it as a sibling."""
    from .triton import chunk_gated_linear_attn_triton

    return chunk_gated_linear_attn_triton


def chunk_gated_linear_attn(
    q,
    k,
    v,
    g,
    *,
    scale=None,
    normalize=False,
    initial_state=None,
    output_final_state=False,
    chunk_size=64,
    backend="auto",
    form="chunk",
):
    """Gated linear attention; q `[B, T, H, K]`, k and g `[B, T, H_kv, K]`, v `[B, T, H_kv, V]` →
    (o `[B, T, H, V]`, state `[B, H, K, V(+1)]` or None)."""
    kwargs = dict(
        scale=scale, normalize=normalize, initial_state=initial_state, output_final_state=output_final_state
    )
    return run_form(
        FORMS, load_triton, (q, k, v, g), kwargs, form=form, backend=backend, chunk_size=chunk_size,
        fla_fn=chunk_gated_linear_attn_fla,
    )


__all__ = [
    "FORMS",
    "chunk_gated_linear_attn",
    "chunk_gated_linear_attn_torch",
    "parallel_gated_linear_attn",
    "recurrent_gated_linear_attn",
]
