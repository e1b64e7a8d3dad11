"""The wrapper against the installed transformers: it binds the wrapped attention's arguments by that
attention's own signature (transformers 5.24 renamed the cache argument from `past_key_values` to `cache`),
a signature it cannot read fails at conversion, and the cache every decoder layer hands over reaches the
student, so cached decoding equals the full forward."""
import inspect

import pytest
import torch
from transformers import DynamicCache

import linearize
from attn_helpers import attention_config, converted, rel_rms
from linearize.attention import StudentCacheLayer
from linearize.attention.wrapper import CACHE_ARGUMENTS
from linearize.errors import UserError
from linearize.surgery import wrapped_attentions

pytestmark = pytest.mark.parity

# fp32 end to end; cached and full paths differ only in summation order (measured ~1e-7).
TOL = 1e-5
# The students whose exports were measured decoding garbage under transformers 5.24 on the old wrapper.
DECODE_MECHANISMS = ["linear", "window_linear", "lawcat"]


def installed_cache_name(forward) -> str:
    """The name the installed transformers gives the cache argument of `forward`."""
    return next(name for name in CACHE_ARGUMENTS if name in inspect.signature(forward).parameters)


def swap_attention_class(model, make_class) -> None:
    """Gives every attention of `model` the subclass `make_class(base_class)` (before conversion)."""
    layers = model.model.layers
    cls = make_class(type(layers[0].self_attn))
    for layer in layers:
        layer.self_attn.__class__ = cls


def cache_second(base_class):
    """An attention taking (hidden_states, cache, position_embeddings, attention_mask): the cache under the
    5.24 name and moved to second place; it records what it received and delegates by name."""
    installed = installed_cache_name(base_class.forward)

    class CacheSecondAttention(base_class):
        def forward(self, hidden_states, cache=None, position_embeddings=None, attention_mask=None, **kwargs):
            self.received = dict(cache=cache, position_embeddings=position_embeddings)
            return super().forward(hidden_states, position_embeddings, attention_mask, **{installed: cache}, **kwargs)

    return CacheSecondAttention


def cache_renamed(base_class):
    class KvCacheAttention(base_class):
        def forward(self, hidden_states, position_embeddings=None, attention_mask=None, kv_cache=None, **kwargs):
            raise AssertionError("never called")

    return KvCacheAttention


def rotary_renamed(base_class):
    class RotaryAttention(base_class):
        def forward(self, hidden_states, rotary=None, attention_mask=None, cache=None, **kwargs):
            raise AssertionError("never called")

    return RotaryAttention


def reordered_model(make_tiny_model, mechanism="linear"):
    model = make_tiny_model("llama")
    swap_attention_class(model, cache_second)
    linearize.linearize_model(model, attention_config(mechanism))
    return model


def layer_inputs(model, length: int):
    """Hidden states `[1, T, hidden]` and the model's rotary (cos, sin), each `[1, T, head_dim]`."""
    hidden = torch.randn(1, length, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    cos, sin = model.model.rotary_emb(hidden, torch.arange(length)[None])
    return hidden, (cos, sin)


def positions(position_embeddings, start: int, end: int):
    """The rotary (cos, sin) of positions start..end-1."""
    return tuple(x[:, start:end] for x in position_embeddings)


@pytest.mark.parametrize("cache_keyword", CACHE_ARGUMENTS)
def test_student_binds_the_cache_by_name_in_any_position(make_tiny_model, cache_keyword):
    """A prefill passed positionally in the base's own order, then a step passing the cache by keyword
    under either known name, equals one uncached call: the cache was found and the state carried over."""
    model = reordered_model(make_tiny_model)
    attn = next(wrapped_attentions(model))
    hidden, pe = layer_inputs(model, 9)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        full = attn(hidden, None, pe, None)[0]  # [1, T, hidden]
        prefill = attn(hidden[:, :8], cache, positions(pe, 0, 8), None)[0]
        step = attn(hidden_states=hidden[:, 8:], position_embeddings=positions(pe, 8, 9), attention_mask=None,
                    **{cache_keyword: cache})[0]
    layer = cache.layers[attn.layer_idx]
    assert isinstance(layer, StudentCacheLayer) and layer.seen == 9
    assert rel_rms(torch.cat([prefill, step], dim=1), full) <= TOL


@pytest.mark.parametrize("cache_keyword", [None, *CACHE_ARGUMENTS])
def test_teacher_mode_passes_the_arguments_by_name(make_tiny_model, cache_keyword):
    """Positionally in the base's order, or by keyword with the cache under either known name: the base
    attention receives each argument under its own name."""
    model = reordered_model(make_tiny_model)
    attn = next(wrapped_attentions(model))
    hidden, pe = layer_inputs(model, 5)
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), linearize.teacher_mode(model):
        if cache_keyword is None:
            attn(hidden, cache, pe, None)
        else:
            attn(hidden_states=hidden, position_embeddings=pe, attention_mask=None, **{cache_keyword: cache})
    assert attn.base_layer.received["cache"] is cache
    assert attn.base_layer.received["position_embeddings"] is pe
    assert cache.get_seq_length(attn.layer_idx) == 5  # the softmax layer stored its keys


@pytest.mark.parametrize("make_class,named", [(cache_renamed, "no cache argument"),
                                              (rotary_renamed, "no argument 'position_embeddings'")])
def test_an_unknown_attention_signature_fails_at_conversion(make_tiny_model, make_class, named):
    model = make_tiny_model("llama")
    swap_attention_class(model, make_class)
    with pytest.raises(UserError, match=named) as raised:
        linearize.linearize_model(model, attention_config("linear"))
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("mechanism", DECODE_MECHANISMS)
def test_cached_decoding_through_the_installed_model_equals_the_full_forward(make_tiny_model, mechanism):
    """The model's own calls (whatever it names the cache) reach every student layer: a prefill and
    token-by-token steps give the full forward's logits, and each student layer counted every token."""
    model = converted(make_tiny_model, mechanism)
    keyword = installed_cache_name(type(model).forward)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits  # [1, T, V]
        steps = [model(ids[:, :8], use_cache=True, **{keyword: cache}).logits]
        steps += [model(ids[:, t:t + 1], use_cache=True, **{keyword: cache}).logits for t in range(8, 12)]
    assert all(isinstance(layer, StudentCacheLayer) and layer.seen == 12 for layer in cache.layers)
    assert rel_rms(torch.cat(steps, dim=1), full) <= TOL
