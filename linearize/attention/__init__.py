"""Student attention mechanisms, registered by name (the `attention.mechanism` config value).

| name | what |
|---|---|
| linear | normalized linear attention with learned feature maps (after RoPE and GQA grouping) |
| window_linear | LoLCATs: sliding-window softmax + linear over older keys, shared normalizer (`window_only`: the SWA baseline) |
| liger | gated linear attention, gate from the pretrained key projection, no new parameters |
| liger_window | α · sliding-window softmax + β · liger |
| lawcat | causal conv on q/k, shared feature map, low-rank gate, normalized gated linear attention |
| softmax | the teacher attention is kept (no layer is converted) |
| gated_delta | Gated DeltaNet: L2-normalized teacher q/k, β and Mamba2 decay from small projections, gated output |
| kda | Kimi Delta Attention: gated_delta with a per-key-channel decay from a low-rank projection |
| gated_delta_window | sliding-window softmax over W keys + the gated delta rule, summed with a learned window weight |
"""
from __future__ import annotations

from typing import Callable

from ..errors import UserError
from .base import COMMON_CONFIG_KEYS, Mechanism, Projected, RunOptions
from .cache import StudentCache, StudentCacheLayer, cache_nbytes, map_state, state_nbytes
from .gated_delta import GatedDeltaAttention, GatedDeltaWindowAttention, KimiDeltaAttention
from .lawcat import LawcatAttention
from .liger import LigerAttention, LigerWindowAttention
from .linear import LinearAttention
from .window_linear import WindowLinearAttention
from .wrapper import MODES, LinearizedAttention, TransferPair

MECHANISMS: dict[str, Callable[..., Mechanism] | None] = {
    "linear": LinearAttention,
    "window_linear": WindowLinearAttention,
    "liger": LigerAttention,
    "liger_window": LigerWindowAttention,
    "lawcat": LawcatAttention,
    "softmax": None,  # keep the teacher: nothing to build
    # Later mechanisms are appended: error messages list the names in this order, and appending keeps the
    # earlier list a prefix of the new one.
    "gated_delta": GatedDeltaAttention,
    "kda": KimiDeltaAttention,
    "gated_delta_window": GatedDeltaWindowAttention,
}


def available_mechanisms() -> list[str]:
    return list(MECHANISMS)


def mechanism_config_keys() -> dict[str, tuple[str, ...]]:
    """{mechanism: the AttentionConfig keys it reads}: `COMMON_CONFIG_KEYS` (read for every mechanism,
    `softmax` included) followed by the mechanism's own `reads`. A key outside a mechanism's tuple is
    ignored when that mechanism is chosen."""
    return {
        name: COMMON_CONFIG_KEYS + (factory.reads if factory is not None else ())
        for name, factory in MECHANISMS.items()
    }


def mechanism_factory(name: str) -> Callable[..., Mechanism] | None:
    """The registered class of mechanism `name` (None for `softmax`): the library's one check of the name."""
    if name not in MECHANISMS:
        raise UserError(f"unknown mechanism {name!r}; valid mechanisms: {', '.join(MECHANISMS)}")
    return MECHANISMS[name]


def build_mechanism(cfg, num_heads: int, num_kv_heads: int, head_dim: int, hidden_size: int) -> Mechanism:
    factory = mechanism_factory(cfg.mechanism)
    if factory is None:
        raise ValueError("mechanism 'softmax' keeps the teacher attention; there is no student to build")
    return factory(cfg, num_heads, num_kv_heads, head_dim, hidden_size)


__all__ = [
    "COMMON_CONFIG_KEYS", "MECHANISMS", "MODES", "LinearizedAttention", "Mechanism", "Projected", "RunOptions",
    "StudentCache", "StudentCacheLayer", "TransferPair", "available_mechanisms", "build_mechanism", "cache_nbytes",
    "map_state", "mechanism_config_keys", "mechanism_factory", "state_nbytes",
]
