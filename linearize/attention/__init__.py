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

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional

from ..errors import UserError
from ..ops._common import FORM_NAMES
from ..ops.gated_delta_rule import FORMS as DELTA_FORMS
from ..ops.gated_linear_attn import FORMS as GATED_LINEAR_FORMS
from ..ops.linear_attn import FORMS as LINEAR_FORMS
from ..ops.window_linear_attn import FORMS as WINDOW_FORMS
from .base import COMMON_CONFIG_KEYS, Mechanism, Projected, RunOptions
from .cache import StudentCache, StudentCacheLayer, cache_nbytes, map_state, state_nbytes
from .gated_delta import GatedDeltaAttention, GatedDeltaWindowAttention, KimiDeltaAttention
from .lawcat import LawcatAttention
from .liger import LigerAttention, LigerWindowAttention
from .linear import LinearAttention
from .window_linear import WindowLinearAttention
from .wrapper import LinearizedAttention, TransferPair


def _both(first, second) -> tuple[str, ...]:
    """The forms two ops share (a hybrid runs both in the one form)."""
    return tuple(form for form in first if form in second)


# A student trained natively in Qwen3.5's Gated DeltaNet layers: the settings that layer computes exactly
# (q/k before RoPE, the decay from its own projection, no attention sinks).
QWEN3_5_DELTA = MappingProxyType({"sink_tokens": 0, "delta_rope": False, "decay_from": "projection"})


@dataclass(frozen=True)
class Registered:
    """A mechanism's registry entry: its class (None: keep the teacher) and what a config may ask of it,
    read by the config checks (linearize.config.validate) before anything loads.

    `forms`: the `attention.form` values its ops compute a full sequence in. `attention_weights`: it gives
    `[B, H, T, T]` weights in the parallel form (`attention_transfer.attn_ce_weight > 0`). `window`: a
    sliding-window hybrid (`window_size`, `sink_tokens` mean something). `native_families`: the serving
    families (linearize.models.families.FAMILIES) it can be trained in, each with the AttentionConfig
    settings that family's layer fixes."""

    factory: Optional[Callable[..., Mechanism]]
    forms: tuple[str, ...]
    attention_weights: bool = False
    window: bool = False
    native_families: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


MECHANISMS: dict[str, Registered] = {
    "linear": Registered(LinearAttention, tuple(LINEAR_FORMS), attention_weights=True),
    "window_linear": Registered(WindowLinearAttention, tuple(WINDOW_FORMS), attention_weights=True, window=True),
    "liger": Registered(LigerAttention, tuple(GATED_LINEAR_FORMS)),
    "liger_window": Registered(LigerWindowAttention, _both(GATED_LINEAR_FORMS, WINDOW_FORMS), window=True),
    "lawcat": Registered(LawcatAttention, tuple(GATED_LINEAR_FORMS)),
    "softmax": Registered(None, FORM_NAMES),  # keep the teacher: nothing to build, any form
    # Later mechanisms are appended: error messages list the names in this order, and appending keeps the
    # earlier list a prefix of the new one.
    "gated_delta": Registered(GatedDeltaAttention, tuple(DELTA_FORMS), native_families={"qwen3_5": QWEN3_5_DELTA}),
    "kda": Registered(KimiDeltaAttention, tuple(DELTA_FORMS)),
    "gated_delta_window": Registered(GatedDeltaWindowAttention, _both(DELTA_FORMS, WINDOW_FORMS), window=True),
}


def available_mechanisms() -> list[str]:
    return list(MECHANISMS)


def mechanism_config_keys() -> dict[str, tuple[str, ...]]:
    """{mechanism: the AttentionConfig keys it reads}: `COMMON_CONFIG_KEYS` (read for every mechanism,
    `softmax` included) followed by the mechanism's own `reads`. A key outside a mechanism's tuple is
    ignored when that mechanism is chosen."""
    return {
        name: COMMON_CONFIG_KEYS + (entry.factory.reads if entry.factory is not None else ())
        for name, entry in MECHANISMS.items()
    }


def mechanism_factory(name: str) -> Callable[..., Mechanism] | None:
    """The registered class of mechanism `name` (None for `softmax`): the library's one check of the name."""
    if name not in MECHANISMS:
        raise UserError(f"unknown mechanism {name!r}; valid mechanisms: {', '.join(MECHANISMS)}")
    return MECHANISMS[name].factory


def build_mechanism(cfg, num_heads: int, num_kv_heads: int, head_dim: int, hidden_size: int) -> Mechanism:
    factory = mechanism_factory(cfg.mechanism)
    if factory is None:
        raise ValueError("mechanism 'softmax' keeps the teacher attention; there is no student to build")
    return factory(cfg, num_heads, num_kv_heads, head_dim, hidden_size)


__all__ = [
    "COMMON_CONFIG_KEYS", "MECHANISMS", "Registered", "LinearizedAttention", "Mechanism", "Projected", "RunOptions",
    "StudentCache", "StudentCacheLayer", "TransferPair", "available_mechanisms", "build_mechanism", "cache_nbytes",
    "map_state", "mechanism_config_keys", "mechanism_factory", "state_nbytes",
]
