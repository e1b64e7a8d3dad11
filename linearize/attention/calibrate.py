"""Initializations of the gated delta family's new parameters (`attention.init`), and the statistics
the calibrated one reads from the teacher's attention.

| name | what |
|---|---|
| calibrated | `zero_gate`, then set per head from the teacher's attention on a few calibration tokens |
| copy | the teacher projections are reused; β, decay and output gate at a random init (the anchors' start) |
| zero_gate | deterministic: zero projection weights, β = 0.5, half-lives 128–512 tokens, output gate open |

`calibrated`, per head, from the teacher's softmax weights A on `attention.calibration_tokens` tokens:
- **decay**: the mean attention distance d = Σ_j A_ij (i − j). A decay γ per token spreads a geometric
  weight γ^(i−j) over the past, whose mean distance is γ / (1 − γ); setting that to d gives
  γ = d / (1 + d), so log γ = −log(1 + 1/d) is the start log decay g.
- **β** from the attention entropy: a head that looks at one key (normalized entropy h̄ ≈ 0) is a recall
  head, and the delta rule serves it by overwriting that key's slot (β → 1); a head that spreads its
  attention (h̄ ≈ 1) averages, which a state that accumulates with small writes does (β → 0). So
  β = 1 − h̄, kept inside [BETA_MIN, BETA_MAX] where sigmoid still has slope.
- **output scale and gate**: with that β and decay, the layer's normalized output ô is fitted to the
  teacher's output y by least squares per head and channel, c = Σ ô·y / Σ ô² (over tokens), and c is
  split between the RMSNorm weight (per channel, shared by heads: the largest c over heads) and the
  output gate's bias (per head and channel: sigmoid(b) = c / weight). The layer then starts at the
  best channel-wise rescaling of its own output, instead of a unit-RMS output against a teacher whose
  attention outputs are much smaller.

The statistics skip the first SINK_KEYS keys (most heads park attention there as a no-op: it is not a
distance a decay should model) and read only the second half of the queries (the first ones cannot look
far, and would pull every half-life down).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

INITS = {
    "calibrated": "zero_gate, then β, decay, output scale and gate from the teacher's attention statistics",
    "copy": "β, decay and output gate projections at a random init, as the anchors leave them",
    "zero_gate": "zero projection weights, β = 0.5, half-lives 128-512 tokens, output gate open",
}
SINK_KEYS = 4
BETA_MIN, BETA_MAX = 0.05, 0.95
# The gate takes c / weight ≤ GATE_MAX, not 1: sigmoid⁻¹(1) is infinite and a saturated gate learns nothing.
GATE_MAX = 0.95
GATE_MIN = 1e-4  # a channel whose fit is ≤ 0 (anti-correlated or dead) starts nearly closed
MIN_DISTANCE = 1.0  # a head that looks only at its own token still gets a decay a step can learn from


def attention_statistics(weights: torch.Tensor, group: int, outside_window: Optional[int] = None) -> dict:
    """Per kv head statistics of the teacher's softmax weights `[B, H, T, T]` (rows sum to 1), averaged over
    the heads of a GQA group: `distance` (mean attention distance in tokens), `entropy` (normalized to
    [0, 1] by the log of the keys visible) and `window_mass` (the mass on the last `outside_window` keys,
    the query's own included; only when `outside_window` is given, which also restricts distance and entropy
    to the older keys). All `[H_kv]` float64."""
    b, h, t, _ = weights.shape
    pos = torch.arange(t, device=weights.device)
    lag = pos[:, None] - pos[None, :]  # [T, T]: i − j
    keep = (lag >= 0) & (pos[None, :] >= SINK_KEYS)
    stats = {}
    w = weights.double()
    if outside_window is not None:
        in_window = (lag >= 0) & (lag < outside_window)
        stats["window_mass"] = (w * in_window).sum(-1)
        keep = keep & ~in_window
    queries = slice(t // 2, t)
    w = (w * keep)[..., queries, :]  # [B, H, Tq, T]
    mass = w.sum(-1, keepdim=True)
    has_mass = mass[..., 0] > 0  # [B, H, Tq]: rows with some mass on the keys read
    w = w / mass.clamp_min(1e-30)
    distance = (w * lag[queries].clamp_min(0)).sum(-1)  # [B, H, Tq]
    entropy = -(w * w.clamp_min(1e-30).log()).sum(-1)
    visible = keep[queries].sum(-1).clamp_min(2).double()  # [Tq]
    entropy = entropy / visible.log()

    def per_kv_head(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        total = (x * rows).sum((0, 2)).view(h // group, group).sum(-1)  # [H_kv]
        count = rows.sum((0, 2)).view(h // group, group).sum(-1).clamp_min(1)
        return total / count

    stats["distance"] = per_kv_head(distance, has_mass)
    stats["entropy"] = per_kv_head(entropy, has_mass)
    if outside_window is not None:
        stats["window_mass"] = per_kv_head(stats["window_mass"][..., queries], torch.ones_like(has_mass))
    return stats


def window_mass_per_head(weights: torch.Tensor, window: int) -> torch.Tensor:
    """The mean softmax mass `[H]` (float64) on each query's last `window` keys, over the second half of the
    queries (the first `window` queries see nothing else)."""
    t = weights.shape[-1]
    pos = torch.arange(t, device=weights.device)
    lag = pos[:, None] - pos[None, :]  # [T, T]
    in_window = (lag >= 0) & (lag < window)
    return (weights.double() * in_window).sum(-1)[..., t // 2:].mean((0, 2))


def log_decay_for_distance(distance: torch.Tensor) -> torch.Tensor:
    """The per-token log decay g whose geometric weighting has mean distance `distance`: −log(1 + 1/d)."""
    return -torch.log1p(1.0 / distance.clamp_min(MIN_DISTANCE))


def beta_for_entropy(entropy: torch.Tensor) -> torch.Tensor:
    return (1.0 - entropy).clamp(BETA_MIN, BETA_MAX)


def logit(p: torch.Tensor) -> torch.Tensor:
    return torch.log(p) - torch.log1p(-p)


def inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    """x with softplus(x) = y > 0 (log(expm1(y)), in float64 so small y keep their precision)."""
    return torch.log(torch.expm1(y.double()))


def channel_scale(output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The least-squares scale c `[H, D]` of `output` onto `target` (both `[B, T, H, D]`) per head and
    channel, split as (norm weight `[D]`, gate `[H, D]` in [GATE_MIN, GATE_MAX]) with weight·gate ≈ c, and
    the relative error per head `[H]` of the fitted output, ‖y − weight·gate·ô‖ / ‖y‖."""
    o, y = output.double(), target.double()
    c = (o * y).sum((0, 1)) / (o * o).sum((0, 1)).clamp_min(1e-30)  # [H, D]
    weight = (c.max(0).values / GATE_MAX).clamp_min(1e-6)  # [D]
    gate = (c / weight).clamp(GATE_MIN, GATE_MAX)
    fitted = o * (weight * gate)
    error = (y - fitted).pow(2).sum((0, 1, 3)).sqrt() / y.pow(2).sum((0, 1, 3)).sqrt().clamp_min(1e-30)
    return weight, gate, error


def half_life(log_decay: torch.Tensor) -> torch.Tensor:
    return math.log(0.5) / log_decay
