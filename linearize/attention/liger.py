"""Liger mechanisms. The gate comes from the pretrained key projection, so there are no new parameters:
g = logsigmoid(k_proj(x)) / gate_norm per kv head and key dim (before RoPE), with q' = softmax(q) and
k' = softmax(k) over the head dim, scale 1, unnormalized gated linear attention (GLA form).

`liger_window` mixes α·(sliding-window softmax over W keys and the first `sink_tokens`) + β·(the gated
linear branch)."""
from __future__ import annotations

import torch.nn.functional as F

from ..errors import UserError
from ..feature_maps import build_feature_map
from ..ops.gated_linear_attn import chunk_gated_linear_attn
from .base import Mechanism
from .window_linear import norm_shares, sliding_window


class LigerAttention(Mechanism):
    name = "liger"
    reads = ("feature_map", "feature_dim", "gate_norm")
    default_feature_map = "softmax_dim"  # Liger's parameter-free map over the head dim

    def __init__(self, cfg, num_heads, num_kv_heads, head_dim, hidden_size):
        super().__init__(cfg, num_heads, num_kv_heads, head_dim, hidden_size)
        self.feature_map = build_feature_map(cfg.feature_map, num_heads, head_dim, cfg.feature_dim)
        # The gate has one value per key dim, so the map must keep the head dim and add no parameters.
        if self.feature_map.out_dim != head_dim or any(True for _ in self.feature_map.parameters()):
            raise UserError(
                f"mechanism {self.name} needs a parameter-free feature map that keeps the head dim "
                f"(softmax_dim, elu, identity), not {cfg.feature_map!r}"
            )
        self.gate_norm = cfg.gate_norm

    def gated_linear(self, p, state, opts, want_state):
        g = F.logsigmoid(p.k_raw.float()) / self.gate_norm  # [B, T, H_kv, D]
        return chunk_gated_linear_attn(
            self.feature_map(p.q), self.feature_map(p.k), p.v, g, scale=1.0, normalize=False,
            initial_state=state, output_final_state=want_state, **opts.op_kwargs(state, p.q.shape[1]),
        )

    def forward(self, p, state, opts, want_state):
        return self.gated_linear(p, state, opts, want_state)


class LigerWindowAttention(LigerAttention):
    name = "liger_window"
    reads = (*LigerAttention.reads, "liger_alpha", "liger_beta", "window_size", "sink_tokens")

    def __init__(self, cfg, num_heads, num_kv_heads, head_dim, hidden_size):
        super().__init__(cfg, num_heads, num_kv_heads, head_dim, hidden_size)
        self.alpha, self.beta, self.window_size = cfg.liger_alpha, cfg.liger_beta, cfg.window_size
        self.sink_tokens = cfg.sink_tokens

    def forward(self, p, state, opts, want_state):
        window_state, gla_state = state if state is not None else (None, None)
        y_sw, window_state = sliding_window(p, self.window_size, opts, window_state, want_state, self.sink_tokens)
        y_gla, gla_state = self.gated_linear(p, gla_state, opts, want_state)
        y = self.alpha * y_sw.float() + self.beta * y_gla.float()
        return y.to(p.v.dtype), ((window_state, gla_state) if want_state else None)

    def branch_shares(self, p, opts):
        """Per token and head `[B, T, H]`: `window` = ‖α·SWA‖ / (‖α·SWA‖ + ‖β·GLA‖) and
        `linear` = 1 − window."""
        y_sw, _ = sliding_window(p, self.window_size, opts, None, False, self.sink_tokens)
        y_gla, _ = self.gated_linear(p, None, opts, False)
        return norm_shares(self.alpha * y_sw.float(), self.beta * y_gla.float(), "linear")
