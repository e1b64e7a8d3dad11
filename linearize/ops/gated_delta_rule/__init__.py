"""The gated delta rule (Gated DeltaNet with a per-head decay, KDA with a per-key-channel decay),
`[B, T, H, K]` layout, public entry point.

`chunk_gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
chunk_size=64, backend="auto", form="chunk") -> (o [B, T, H, V], final_state [B, H_kv, K, V] or None)`

- `form`: "chunk" (default; the WY / UT-transform chunked form, `chunk.py`) or "recurrent" (token by
  token, `naive.py`: the oracle, and the decoding step). `FORMS` maps each name to its function, all with
  the same arguments; "recurrent" ignores `chunk_size`.
- `backend` (chunk form only): "auto" uses `triton.chunk_gated_delta_rule_triton` for CUDA tensors when that
  module imports, else torch; "triton" forces it (ImportError if unavailable); "torch" forces the torch chunk
  form; "fla" runs fla's `chunk_gated_delta_rule` (per-head g) or `chunk_kda` (per-channel g) (optional extra
  `linearize[fla]`, CUDA tensors only, never picked by "auto"; same results and state layout, see `.._fla`).

Math, shapes, dtypes and state layout: see `naive.py`; the chunk derivation: see `chunk.py`; the kernels:
`triton.py`.
"""
from __future__ import annotations

from .._common import run_form
from .._fla import chunk_gated_delta_rule_fla
from .chunk import chunk_gated_delta_rule_torch
from .naive import recurrent_gated_delta_rule

FORMS = {
    "chunk": chunk_gated_delta_rule_torch,
    "recurrent": recurrent_gated_delta_rule,
}


def load_triton():
    """The Triton chunk function, imported on first use. A relative import, so an export's flat bundle
    (`models/bundle.py`) ships the kernel file and finds it as a sibling."""
    from .triton import chunk_gated_delta_rule_triton

    return chunk_gated_delta_rule_triton


def chunk_gated_delta_rule(
    q,
    k,
    v,
    g,
    beta,
    *,
    scale=None,
    initial_state=None,
    output_final_state=False,
    chunk_size=64,
    backend="auto",
    form="chunk",
):
    """Gated delta rule; q `[B, T, H, K]`, k `[B, T, H_kv, K]`, v `[B, T, H_kv, V]`, g `[B, T, H_kv]` or
    `[B, T, H_kv, K]` (log-decay ≤ 0), beta `[B, T, H_kv]` → (o `[B, T, H, V]` in q's dtype, state
    `[B, H_kv, K, V]` fp32 or None)."""
    if form not in FORMS:
        # the shared check names every form of every op; this op has no parallel form
        raise ValueError(f"unknown form {form!r} for gated_delta_rule; valid forms: {', '.join(FORMS)}")
    kwargs = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state)
    return run_form(
        FORMS, load_triton, (q, k, v, g, beta), kwargs, form=form, backend=backend, chunk_size=chunk_size,
        fla_fn=chunk_gated_delta_rule_fla,
    )


__all__ = [
    "FORMS",
    "chunk_gated_delta_rule",
    "chunk_gated_delta_rule_torch",
    "recurrent_gated_delta_rule",
]
