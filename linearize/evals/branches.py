"""Branch diagnostics of the hybrid mechanisms (window_linear, liger_window, gated_delta_window): per
converted layer, the share of the attention output that comes from the window (softmax) branch and the
share that comes from the linear / delta branch, averaged over every token and head of some held-out
rows. A hybrid that has learned to bypass its linear branch reads as (nearly) 100% window.

The shares are each mechanism's own `branch_shares(p, opts)` (per token and head, summing to one):
- window_linear, one shared normalizer: window = the softmax keys' (window and sinks) share of the
  normalizer's mass, Σ a_sm / (Σ a_sm + Σ a_lin); linear = 1 − window;
- liger_window and gated_delta_window, a sum of two terms: window = ‖window term‖ / (‖window term‖ +
  ‖other term‖) per token and head (L2 over the head dim); linear / delta = 1 − window.
A mechanism without that method (not a hybrid) has no entry."""
from __future__ import annotations

from typing import Optional

import torch

from ..surgery import wrapped_attentions


class _LayerTally:
    """Running sums of one layer's per-token shares."""

    def __init__(self, mechanism: str):
        self.mechanism = mechanism
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, shares: dict[str, torch.Tensor]) -> None:
        for name, share in shares.items():
            self.sums[name] = self.sums.get(name, 0.0) + share.double().sum().item()
        self.count += next(iter(shares.values())).numel()

    def means(self) -> dict[str, float]:
        return {name: total / self.count for name, total in self.sums.items()}


@torch.no_grad()
def branch_shares(model: torch.nn.Module, tokens: torch.Tensor, batch_size: int = 1) -> Optional[dict]:
    """Runs `model` (a converted model, student mode) over `tokens` `[M, L]` and returns
    `{"layers": {layer: {"mechanism": name, "window": s, <other branch>: 1 − s}}, "sequences", "tokens"}`
    with layers as strings in order; None when no converted layer is a hybrid."""
    attentions = [a for a in wrapped_attentions(model) if hasattr(a.mechanism, "branch_shares")]
    if not attentions:
        return None
    tallies = {a.layer_idx: _LayerTally(a.mechanism.name) for a in attentions}

    def collector(attn):
        def hook(mechanism, args):  # a forward pre-hook: args = (p, state, opts)
            tallies[attn.layer_idx].add(mechanism.branch_shares(args[0], attn.opts))

        return hook

    handles = [a.mechanism.register_forward_pre_hook(collector(a)) for a in attentions]
    device = next(model.parameters()).device
    model.eval()
    try:
        for start in range(0, len(tokens), batch_size):
            model(input_ids=tokens[start:start + batch_size].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    layers = {str(idx): {"mechanism": tallies[idx].mechanism, **tallies[idx].means()} for idx in sorted(tallies)}
    return {"layers": layers, "sequences": len(tokens), "tokens": int(tokens.numel())}
