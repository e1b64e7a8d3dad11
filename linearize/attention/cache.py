"""The generation cache: one `StudentCacheLayer` per converted layer (its mechanism's state object and
a token count) inside an ordinary transformers `DynamicCache`, so softmax layers of a hybrid keep their
usual key/value layers and `get_seq_length` is right for every layer."""
from __future__ import annotations

from typing import Any, Callable

import torch
from transformers.cache_utils import CacheLayerMixin, DynamicCache


def map_state(fn: Callable[[torch.Tensor], torch.Tensor], state: Any) -> Any:
    """Apply `fn` to every tensor of a nested state (tensors, tuples, NamedTuples, None)."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return fn(state)
    mapped = [map_state(fn, s) for s in state]
    return type(state)(*mapped) if hasattr(state, "_fields") else type(state)(mapped)


def state_nbytes(state: Any) -> int:
    total = 0

    def count(x: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += x.numel() * x.element_size()
        return x

    map_state(count, state)
    return total


class StudentCacheLayer(CacheLayerMixin):
    """Holds a student layer's recurrent state, window keys/values and conv state; memory is constant
    in context length for linear/gated mechanisms and bounded by W + sink_tokens keys for window mechanisms."""

    is_sliding = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, **kwargs):
        super().__init__()
        self.state: Any = None
        self.seen = 0

    def lazy_initialization(self, key_states, value_states) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("a student attention layer keeps a recurrent state, not keys and values")

    def advance(self, state: Any, num_tokens: int) -> None:
        self.state, self.seen, self.is_initialized = state, self.seen + num_tokens, True

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Matches a full-attention layer, so a mask built from this layer also fits the hybrid's softmax layers.
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        return state_nbytes(self.state)

    def reset(self) -> None:
        self.state, self.seen = None, 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.state = map_state(lambda x: x.index_select(0, beam_idx.to(x.device)), self.state)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.state = map_state(lambda x: x.repeat_interleave(repeats, dim=0), self.state)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.state = map_state(lambda x: x[indices], self.state)

    def offload(self):
        pass

    def prefetch(self):
        pass


class StudentCache(DynamicCache):
    """A `DynamicCache` whose converted layers are `StudentCacheLayer`s from the start, read from a converted
    model's `config.linearize["layers"]`; softmax layers get the usual key/value layers.

    Optional: `generate` builds a plain `DynamicCache`, and each converted layer installs its
    `StudentCacheLayer` on first use (`student_layer`), so both kinds of cache work."""

    def __init__(self, config, **kwargs):
        super().__init__(config=config, **kwargs)
        record = getattr(config, "linearize", None) or {}
        for idx, mechanism in record.get("layers", {}).items():
            if mechanism != "softmax":
                self.layers[int(idx)] = StudentCacheLayer()


def student_layer(cache: DynamicCache, layer_idx: int) -> StudentCacheLayer:
    """The student layer of `cache` at `layer_idx`, installing one where the model built a plain layer
    (a `DynamicCache` made by `generate` or by the model's own forward)."""
    while len(cache.layers) <= layer_idx:
        cache.layers.append(cache.layer_class_to_replicate() if cache.layer_class_to_replicate else StudentCacheLayer())
    layer = cache.layers[layer_idx]
    if not isinstance(layer, StudentCacheLayer):
        if layer.get_seq_length() > 0:
            raise RuntimeError(f"layer {layer_idx} of this cache already holds keys/values from a softmax attention")
        layer = cache.layers[layer_idx] = StudentCacheLayer()
    return layer


def cache_nbytes(cache: DynamicCache) -> int:
    """Bytes held by every layer of a cache: student states plus softmax keys/values."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, StudentCacheLayer):
            total += layer.nbytes()
        elif getattr(layer, "keys", None) is not None:
            total += sum(x.numel() * x.element_size() for x in (layer.keys, layer.values))
    return total
