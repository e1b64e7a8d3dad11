"""`window_linear`: the LoLCATs hybrid. Softmax over the last W keys plus linear attention over older
keys, one shared normalizer, a learned per-head window weight sigmoid(w_h) (init 0.1).

`window_only=True` drops the linear branch (zero features): the sliding-window softmax baseline.
`linear_half_life=H` decays the linear keys' weights by 2^(−distance/H) (the op's `linear_half_life`): without
it the linear mass grows with the context and outweighs the window past the training length
(docs/quality.md, "The linear branch is what loses the chat frame past the window"). With
`linear_half_life_learned` each head has its own half-life, starting at H and trained with the feature maps.
`sink_tokens=N` keeps the first N tokens in every query's softmax part (attention sinks; they never enter
the linear state), here and in every mechanism that uses `sliding_window`."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..ops._common import sliding_window_sink_mask
from ..ops.window_linear_attn import window_linear_attn, window_linear_attn_weights
from .base import Mechanism, Projected, repeat_heads
from .linear import FEATURE_MAP_KEYS, FeatureMaps


def zero_features(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """`[B, T, H, 1]` zeros: a linear branch that contributes nothing."""
    return x.new_zeros(x.shape[0], x.shape[1], num_heads, 1, dtype=torch.float32)


# A learned half-life is 2^(GAIN·θ) per head: one optimizer step of size lr moves it by up to GAIN·lr octaves, so
# the transfer lr of the feature maps (1e-2) can move it by ~3 octaves in the demo's 40 steps, not 0.4.
HALF_LIFE_GAIN = 8.0

# Below this norm sum a token's two branch terms both count as zero: its window share is 0.
BRANCH_NORM_FLOOR = 1e-30


def norm_shares(window_term: torch.Tensor, other_term: torch.Tensor, other: str) -> dict[str, torch.Tensor]:
    """Branch shares of a sum-style hybrid (y = window term + other term, each `[B, T, H, D]`): per token
    and head `[B, T, H]` (float64), window = ‖window term‖ / (‖window term‖ + ‖other term‖) and `other` =
    1 − window (a token whose two terms are both zero counts as all `other`)."""
    window_norm = window_term.float().norm(dim=-1)  # [B, T, H]
    other_norm = other_term.float().norm(dim=-1)  # [B, T, H]
    window = (window_norm / (window_norm + other_norm).clamp_min(BRANCH_NORM_FLOOR)).double()
    return {"window": window, other: 1.0 - window}  # float64: the two sum to one exactly


def sliding_window(p: Projected, window_size: int, opts, state, want_state, sink_tokens: int = 0):
    """Plain causal sliding-window softmax over the last `window_size` keys and the first `sink_tokens`
    → ([B, T, H, D], state)."""
    fz = zero_features(p.q, p.q.shape[2])
    logit = p.q.new_zeros(p.q.shape[2], dtype=torch.float32)  # γ cancels without a linear branch
    return window_linear_attn(
        p.q_rope, p.k_rope, p.v, fz, fz, logit, window_size=window_size, initial_state=state,
        output_final_state=want_state, sink_tokens=sink_tokens, **opts.op_kwargs(state, p.q.shape[1]),
    )


class WindowLinearAttention(Mechanism):
    name = "window_linear"
    reads = (*FEATURE_MAP_KEYS, "window_size", "sink_tokens", "window_only", "init_window_logit", "linear_half_life",
             "linear_half_life_learned")

    def __init__(self, cfg, num_heads, num_kv_heads, head_dim, hidden_size):
        super().__init__(cfg, num_heads, num_kv_heads, head_dim, hidden_size)
        self.window_size = cfg.window_size
        self.sink_tokens = cfg.sink_tokens
        self.window_only = cfg.window_only
        self.linear_half_life = cfg.linear_half_life
        if not self.window_only:
            self.feature_maps = FeatureMaps(cfg, num_heads, head_dim, cfg.tie_qk_feature_map)
            self.window_logit = nn.Parameter(torch.full((num_heads,), float(cfg.init_window_logit)))
            if cfg.linear_half_life_learned:  # θ_h with half-life 2^(GAIN·θ_h), every head at linear_half_life
                start = math.log2(cfg.linear_half_life) / HALF_LIFE_GAIN
                self.half_life_log2 = nn.Parameter(torch.full((num_heads,), start))

    def half_life(self):
        """The linear keys' half-life: None, the configured number, or the learned one per head `[H]`."""
        if hasattr(self, "half_life_log2"):
            return torch.exp2(self.half_life_log2.float() * HALF_LIFE_GAIN)
        return self.linear_half_life

    def forward(self, p, state, opts, want_state):
        if self.window_only:
            return sliding_window(p, self.window_size, opts, state, want_state, self.sink_tokens)
        fq, fk = self.feature_maps(p.q_rope, repeat_heads(p.k_rope, p.group))
        return window_linear_attn(
            p.q_rope, p.k_rope, p.v, fq, fk, self.window_logit, window_size=self.window_size,
            initial_state=state, output_final_state=want_state, sink_tokens=self.sink_tokens,
            linear_half_life=self.half_life(), **opts.op_kwargs(state, p.q.shape[1]),
        )

    def param_groups(self):
        groups = {"window_logit": "mixing", "half_life_log2": "gates"}  # the half-life decides what the state keeps
        return {name: groups.get(name, "feature_maps") for name, _ in self.named_parameters()}

    def branch_shares(self, p, opts) -> dict[str, torch.Tensor]:
        """Per token and head `[B, T, H]`: `window`, the softmax keys' share of the shared normalizer
        (Σ a_sm / (Σ a_sm + Σ a_lin), sinks included), and `linear` = 1 − window. The window-only
        baseline is all window. Uses the parallel weights (`[B, H, T, T]` memory)."""
        if self.window_only:
            window = p.q.new_ones(p.q.shape[:3], dtype=torch.float64)  # [B, T, H]
            return {"window": window, "linear": 1.0 - window}
        weights = self.attention_weights(p)  # [B, H, T, T], rows sum to 1
        t = weights.shape[-1]
        keys = sliding_window_sink_mask(t, t, self.window_size, self.sink_tokens, device=weights.device)  # [T, T]
        window = (weights * keys).sum(-1).transpose(1, 2).double()  # [B, T, H]
        return {"window": window, "linear": 1.0 - window}  # float64: the two sum to one exactly

    def attention_weights(self, p):
        """The op's parallel-form weights `[B, H, T, T]` of the hybrid (rows sum to 1)."""
        if self.window_only:
            raise ValueError("the window-only baseline has no linear branch to train with attention weights")
        fq, fk = self.feature_maps(p.q_rope, repeat_heads(p.k_rope, p.group))
        return window_linear_attn_weights(
            p.q_rope, p.k_rope, fq, fk, self.window_logit, window_size=self.window_size, scale=self.head_dim**-0.5,
            sink_tokens=self.sink_tokens, linear_half_life=self.half_life(),
        )
