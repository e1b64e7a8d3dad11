"""Initializations of the gated delta family's new parameters (`attention.init`).

| name | what |
|---|---|
| calibrated | `zero_gate`, then set per head from the teacher's attention on a few calibration tokens |
| copy | the teacher projections are reused; β, decay and output gate at a random init (hybrid-distillation) |
| zero_gate | deterministic: zero projection weights, β = 0.5, half-lives 128–512 tokens, output gate open |
"""
from __future__ import annotations

INITS = {
    "calibrated": "zero_gate, then β, decay, output scale and gate from the teacher's attention statistics",
    "copy": "β, decay and output gate projections at a random init, as the anchors leave them",
    "zero_gate": "zero projection weights, β = 0.5, half-lives 128-512 tokens, output gate open",
}
