"""The gated delta rule (Gated DeltaNet with a per-head decay, KDA with a per-key-channel decay),
`[B, T, H, K]` layout, public entry point.

`chunk_gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
chunk_size=64, backend="auto", form="chunk") -> (o [B, T, H, V], final_state [B, H_kv, K, V] or None)`

- `form`: "chunk" (default; the WY / UT-transform chunked form, `chunk.py`) or "recurrent" (token by
  token, `naive.py`: the oracle, and the decoding step). `FORMS` maps each name to its function, all with
  the same arguments; "recurrent" ignores `chunk_size`.
- `backend`: "auto" and "torch" run the torch forms. There is no Triton kernel and no fla adapter yet:
  "triton" and "fla" raise a UserError.

Math, shapes, dtypes and state layout: see `naive.py`; the chunk derivation: see `chunk.py`.
"""
from __future__ import annotations

from ...errors import UserError
from .._common import FLA_BACKENDS, check_backend, run_form
from .chunk import chunk_gated_delta_rule_torch
from .naive import recurrent_gated_delta_rule

FORMS = {
    "chunk": chunk_gated_delta_rule_torch,
    "recurrent": recurrent_gated_delta_rule,
}

# Backends the other ops have that this one does not have yet.
UNIMPLEMENTED_BACKENDS = ("triton", "fla")


def load_triton():
    """No kernel module exists yet; the public function refuses `backend="triton"` before this is reached."""
    raise UserError(_unimplemented("triton"))


def _unimplemented(backend):
    return f"backend={backend!r} is not implemented yet for gated_delta_rule; use backend='torch' (or 'auto')"


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
        raise ValueError(f"unknown form {form!r} for gated_delta_rule; valid forms: {', '.join(FORMS)}")
    check_backend(backend, FLA_BACKENDS)
    if backend in UNIMPLEMENTED_BACKENDS:
        raise UserError(_unimplemented(backend))
    kwargs = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state)
    # "auto" would look for a Triton kernel on CUDA tensors; with none written yet it means torch
    return run_form(
        FORMS, load_triton, (q, k, v, g, beta), kwargs, form=form, backend="torch", chunk_size=chunk_size
    )


__all__ = [
    "FORMS",
    "chunk_gated_delta_rule",
    "chunk_gated_delta_rule_torch",
    "recurrent_gated_delta_rule",
]
