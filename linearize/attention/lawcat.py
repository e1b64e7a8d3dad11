"""`lawcat`: LAWCAT. A causal depthwise Conv1D over time on q and k (not v), no RoPE in the linear
branch, one feature map shared by q and k, a low-rank data-dependent gate (hidden → rank → H_kv·F,
shared across each GQA group, g = logsigmoid(·)/gate_norm), and normalized gated linear attention."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..feature_maps import build_feature_map
from ..ops.gated_linear_attn import chunk_gated_linear_attn
from .base import Mechanism, repeat_heads

# Near-identity conv init from the paper: the current token passes through, older taps barely leak.
CONV_LAST_TAP = 1.0
CONV_OTHER_TAPS = 1e-3


class CausalDepthwiseConv(nn.Module):
    """Depthwise causal conv over time on `[B, T, C]`; the state is the last `kernel − 1` inputs."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        weight = torch.full((channels, 1, kernel), CONV_OTHER_TAPS)
        weight[:, :, -1] = CONV_LAST_TAP
        self.weight = nn.Parameter(weight)
        self.kernel = kernel

    def forward(self, x: torch.Tensor, prefix: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x `[B, T, C]`, prefix `[B, kernel − 1, C]` (zeros at the start) → (y `[B, T, C]`, new prefix)."""
        if prefix is None:
            prefix = x.new_zeros(x.shape[0], self.kernel - 1, x.shape[2])
        full = torch.cat([prefix.to(x.dtype), x], dim=1)  # [B, kernel − 1 + T, C]
        y = F.conv1d(full.transpose(1, 2), self.weight.to(x.dtype), groups=x.shape[2])  # [B, C, T]
        return y.transpose(1, 2), full[:, full.shape[1] - (self.kernel - 1):]


class LawcatAttention(Mechanism):
    name = "lawcat"
    reads = ("conv_kernel", "feature_map", "feature_dim", "gate_rank", "gate_norm")

    def __init__(self, cfg, num_heads, num_kv_heads, head_dim, hidden_size):
        super().__init__(cfg, num_heads, num_kv_heads, head_dim, hidden_size)
        self.conv_q = CausalDepthwiseConv(num_heads * head_dim, cfg.conv_kernel)
        self.conv_k = CausalDepthwiseConv(num_kv_heads * head_dim, cfg.conv_kernel)
        self.feature_map = build_feature_map(cfg.feature_map, num_heads, head_dim, cfg.feature_dim)
        self.gate_down = nn.Linear(hidden_size, cfg.gate_rank, bias=False)
        self.gate_up = nn.Linear(cfg.gate_rank, num_kv_heads * self.feature_map.out_dim, bias=True)
        self.gate_norm = cfg.gate_norm

    def forward(self, p, state, opts, want_state):
        conv_q_state, conv_k_state, recurrent = state if state is not None else (None, None, None)
        b, t, h, d = p.q.shape
        q, conv_q_state = self.conv_q(p.q.float().reshape(b, t, h * d), conv_q_state)  # [B, T, H·D]
        k, conv_k_state = self.conv_k(p.k.float().reshape(b, t, -1), conv_k_state)  # [B, T, H_kv·D]
        fq = self.feature_map(q.view(b, t, h, d))  # [B, T, H, F]
        fk = self.feature_map(repeat_heads(k.view(b, t, -1, d), p.group))  # [B, T, H, F]
        g = self.log_decay(p.hidden)  # [B, T, H_kv·F]
        g = repeat_heads(g.view(b, t, -1, fq.shape[-1]), p.group)  # [B, T, H, F]
        y, recurrent = chunk_gated_linear_attn(
            fq, fk, repeat_heads(p.v, p.group), g, normalize=True, initial_state=recurrent,
            output_final_state=want_state, **opts.op_kwargs(state, p.q.shape[1]),
        )
        return y, ((conv_q_state, conv_k_state, recurrent) if want_state else None)

    def log_decay(self, hidden: torch.Tensor) -> torch.Tensor:
        """g = logsigmoid(up(down(x))) / gate_norm: `[B, T, hidden]` → `[B, T, H_kv·F]`, in fp32 even when the
        model (and with it this gate) was cast to bf16 after conversion."""
        low = F.linear(hidden.float(), self.gate_down.weight.float())  # [B, T, rank]
        return F.logsigmoid(F.linear(low, self.gate_up.weight.float(), self.gate_up.bias.float())) / self.gate_norm

    def param_groups(self):
        groups = {"conv_q": "conv", "conv_k": "conv", "gate_down": "gates", "gate_up": "gates"}
        return {name: groups.get(name.split(".")[0], "feature_maps") for name, _ in self.named_parameters()}
