"""Pieces every mechanism shares: the projected inputs of one attention call, the mechanism base
class, and small tensor helpers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from ..config import AttentionConfig


@dataclass
class Projected:
    """Everything a mechanism may read, computed once from the frozen teacher projections.

    q `[B, T, H, D]`, k and v `[B, T, H_kv, D]` are after the q/k norms (Qwen3) and before RoPE;
    q_rope / k_rope after RoPE; k_raw is `k_proj(x)` before any norm (the Liger gate source);
    hidden `[B, T, hidden]` is the layer input (the LAWCAT gate source)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q_rope: torch.Tensor
    k_rope: torch.Tensor
    k_raw: torch.Tensor
    hidden: torch.Tensor

    @property
    def group(self) -> int:
        return self.q.shape[2] // self.k.shape[2]


# Calls of at most this many tokens after a cached state run as recurrent decode steps.
DECODE_STEP_TOKENS = 1


@dataclass(frozen=True)
class RunOptions:
    """How a mechanism computes one call: the ops' form, chunk size and backend."""

    form: str = "chunk"
    chunk_size: int = 64
    backend: str = "auto"
    compile: bool = False  # torch.compile the mechanism for training calls (see LinearizedAttention)

    def op_kwargs(self, state: Any, num_tokens: int) -> dict:
        """The ops' keyword arguments for a call of `num_tokens` tokens continuing `state` (None: a fresh
        sequence). A decode step (one token after a state) uses the recurrent form, exact and cheapest
        there; longer calls (prefill, chunked continuation) use the configured form from the state."""
        form = "recurrent" if state is not None and num_tokens <= DECODE_STEP_TOKENS else self.form
        kwargs = dict(form=form, backend=self.backend if form == "chunk" else "torch")
        if form == "chunk":
            kwargs["chunk_size"] = self.chunk_size
        return kwargs


def repeat_heads(x: torch.Tensor, group: int) -> torch.Tensor:
    """`[B, T, H_kv, D]` → `[B, T, H_kv·group, D]`: query head h reads kv head h // group (GQA)."""
    return x if group == 1 else x.repeat_interleave(group, dim=2)


# AttentionConfig keys every mechanism's conversion reads (surgery: layer selection and RunOptions).
# The layer-choice keys (softmax_layers: auto) are read by the run for every mechanism.
COMMON_CONFIG_KEYS = ("mechanism", "layers", "softmax_layers", "softmax_layer_count", "softmax_layer_selector",
                      "selection_steps", "selector_recall_weight", "form", "chunk_size", "backend", "compile")


class Mechanism(nn.Module):
    """A student attention. `forward(p, state, opts)` returns per-head outputs `[B, T, H, D]` and the
    state after the last token (None when `state is None and not want_state`).

    `reads` names the AttentionConfig keys the mechanism reads beyond `COMMON_CONFIG_KEYS`.
    `param_groups()` names each trainable parameter's group (feature_maps, gates, mixing, conv)."""

    name: str = ""
    reads: tuple[str, ...] = ()
    # The feature map to use when the mechanism is switched on the command line without naming one: set
    # by mechanisms that take only some maps (None: any map works, the config's stays).
    default_feature_map: Optional[str] = None

    def __init__(self, cfg: AttentionConfig, num_heads: int, num_kv_heads: int, head_dim: int, hidden_size: int):
        super().__init__()
        self.cfg = cfg
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim

    def forward(self, p: Projected, state: Any, opts: RunOptions, want_state: bool) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    def param_groups(self) -> dict[str, str]:
        return {}

    def calibration_tokens(self) -> int:
        """Teacher tokens `linearize.calibrating` should show this layer before training; 0 = none."""
        return 0

    def calibrate(self, p: Projected, y_teacher: torch.Tensor, weights: torch.Tensor, opts: RunOptions) -> dict:
        """Sets the new parameters from the teacher's output `[B, T, H, D]` and weights `[B, H, T, T]` on
        `p`; returns a JSON-able record of what was set. Only mechanisms with `calibration_tokens() > 0`."""
        raise ValueError(f"mechanism {self.name!r} has no calibrated initialization")

    def attention_weights(self, p: Projected) -> Optional[torch.Tensor]:
        """Normalized student attention `[B, H, T, T]` for the attention-weight loss (parallel only)."""
        raise ValueError(f"mechanism {self.name!r} has no attention-weight form; use mechanism linear or window_linear")
