"""`window_linear`: the LoLCATs hybrid. Softmax over the last W keys plus linear attention over older
keys, one shared normalizer, a learned per-head window weight sigmoid(w_h) (init 0.1).

`window_only=True` drops the linear branch (zero features): the sliding-window softmax baseline.
`sink_tokens=N` keeps the first N tokens in every query's softmax part (attention sinks; they never enter
the linear state), here and in every mechanism that uses `sliding_window`."""
from __future__ import annotations

import torch
from torch import nn

from ..ops.window_linear_attn import window_linear_attn, window_linear_attn_weights
from .base import Mechanism, Projected, repeat_heads
from .linear import FEATURE_MAP_KEYS, FeatureMaps


def zero_features(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """`[B, T, H, 1]` zeros: a linear branch that contributes nothing."""
    return x.new_zeros(x.shape[0], x.shape[1], num_heads, 1, dtype=torch.float32)


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
    reads = (*FEATURE_MAP_KEYS, "window_size", "sink_tokens", "window_only", "init_window_logit")

    def __init__(self, cfg, num_heads, num_kv_heads, head_dim, hidden_size):
        super().__init__(cfg, num_heads, num_kv_heads, head_dim, hidden_size)
        self.window_size = cfg.window_size
        self.sink_tokens = cfg.sink_tokens
        self.window_only = cfg.window_only
        if not self.window_only:
            self.feature_maps = FeatureMaps(cfg, num_heads, head_dim, cfg.tie_qk_feature_map)
            self.window_logit = nn.Parameter(torch.full((num_heads,), float(cfg.init_window_logit)))

    def forward(self, p, state, opts, want_state):
        if self.window_only:
            return sliding_window(p, self.window_size, opts, state, want_state, self.sink_tokens)
        fq, fk = self.feature_maps(p.q_rope, repeat_heads(p.k_rope, p.group))
        return window_linear_attn(
            p.q_rope, p.k_rope, p.v, fq, fk, self.window_logit, window_size=self.window_size,
            initial_state=state, output_final_state=want_state, sink_tokens=self.sink_tokens,
            **opts.op_kwargs(state, p.q.shape[1]),
        )

    def param_groups(self):
        return {name: "mixing" if name == "window_logit" else "feature_maps" for name, _ in self.named_parameters()}

    def attention_weights(self, p):
        """The op's parallel-form weights `[B, H, T, T]` of the hybrid (rows sum to 1)."""
        if self.window_only:
            raise ValueError("the window-only baseline has no linear branch to train with attention weights")
        fq, fk = self.feature_maps(p.q_rope, repeat_heads(p.k_rope, p.group))
        return window_linear_attn_weights(
            p.q_rope, p.k_rope, fq, fk, self.window_logit, window_size=self.window_size, scale=self.head_dim**-0.5,
            sink_tokens=self.sink_tokens,
        )
