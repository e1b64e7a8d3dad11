"""`linear`: normalized linear attention φ_q(q)ᵀS / φ_q(q)ᵀz with learned feature maps applied after
RoPE and after GQA grouping (LoLCATs' pure linear student)."""
from __future__ import annotations

import torch

from ..feature_maps import build_feature_map
from ..ops.linear_attn import chunk_linear_attn, linear_attn_weights
from .base import Mechanism, Projected, repeat_heads

# The AttentionConfig keys the feature maps read (linear and window_linear build them).
FEATURE_MAP_KEYS = ("feature_map", "feature_dim", "tie_qk_feature_map")


class FeatureMaps(torch.nn.Module):
    """The q and k maps (one shared module when `tie_qk_feature_map`)."""

    def __init__(self, cfg, num_heads: int, head_dim: int, tied: bool):
        super().__init__()
        self.q = build_feature_map(cfg.feature_map, num_heads, head_dim, cfg.feature_dim)
        self.k = self.q if tied else build_feature_map(cfg.feature_map, num_heads, head_dim, cfg.feature_dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q `[B, T, H, D]`, k `[B, T, H, D]` (already GQA-expanded) → `[B, T, H, F]` each."""
        return self.q(q), self.k(k)


class LinearAttention(Mechanism):
    name = "linear"
    reads = FEATURE_MAP_KEYS

    def __init__(self, cfg, num_heads, num_kv_heads, head_dim, hidden_size):
        super().__init__(cfg, num_heads, num_kv_heads, head_dim, hidden_size)
        self.feature_maps = FeatureMaps(cfg, num_heads, head_dim, cfg.tie_qk_feature_map)

    def features(self, p: Projected) -> tuple[torch.Tensor, torch.Tensor]:
        return self.feature_maps(p.q_rope, repeat_heads(p.k_rope, p.group))

    def forward(self, p, state, opts, want_state):
        fq, fk = self.features(p)
        # The feature maps are per query head, so v is expanded to match fk's heads.
        v = repeat_heads(p.v, p.group)  # [B, T, H, D]
        return chunk_linear_attn(
            fq, fk, v, normalize=True, initial_state=state, output_final_state=want_state,
            **opts.op_kwargs(state, p.q.shape[1]),
        )

    def param_groups(self):
        return {name: "feature_maps" for name, _ in self.named_parameters()}

    def attention_weights(self, p):
        """The op's parallel-form weights `[B, H, T, T]` (rows normalized as the output is)."""
        return linear_attn_weights(*self.features(p), normalize=True)
