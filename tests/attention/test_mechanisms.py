"""Each mechanism on a tiny converted model: the three computation forms agree, a sequence split at any
point and resumed from the cached state equals the unsplit run, and the state stays bounded."""
import pytest
import torch
from transformers import DynamicCache

import linearize
from attn_helpers import (
    MECHANISMS, converted, rel_rms, set_form, sliding_window_softmax,
)
from linearize.attention import StudentCache, cache_nbytes

# fp32 end to end; the forms differ only in summation order, so errors sit near 1e-7.
FORM_TOL = 1e-5
# Issue requirement for cached decoding vs the full forward in fp32 (we measure ~1e-7).
DECODE_TOL = 2e-3


def student_outputs(model, ids, form):
    """Per-layer student outputs `[B, T, H, D]`, each layer fed exact teacher inputs."""
    set_form(model, form)
    pairs = []
    with torch.no_grad(), linearize.transfer_mode(model, pairs.append):
        model(ids, use_cache=False)
    return [p.student for p in pairs]


# Each length runs on a different architecture: all four are covered without a 4x longer test.
LENGTH_ARCH = [(1, "qwen2"), (63, "mistral"), (100, "qwen3"), (257, "llama")]


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize("length,arch", LENGTH_ARCH)
def test_three_forms_agree(make_tiny_model, mechanism, length, arch):
    model = converted(make_tiny_model, mechanism, arch)
    ids = torch.randint(0, 256, (2, length), generator=torch.Generator().manual_seed(length))
    chunk = student_outputs(model, ids, "chunk")
    for form in ("parallel", "recurrent"):
        for y, ref in zip(student_outputs(model, ids, form), chunk):
            assert rel_rms(y, ref) <= FORM_TOL, (form, rel_rms(y, ref))


def run_split(model, ids, split, cache_class=DynamicCache):
    """Logits from a prefill of `ids[:, :split]` then the rest in one call resumed from the cache."""
    cache = cache_class(config=model.config)
    with torch.no_grad():
        first = model(ids[:, :split], past_key_values=cache, use_cache=True).logits
        second = model(ids[:, split:], past_key_values=cache, use_cache=True).logits
    return torch.cat([first, second], dim=1), cache


# One architecture per mechanism keeps the test short; qwen3 (q/k norms) gets the stateful conv.
SPLIT_ARCH = {"linear": "llama", "window_linear": "mistral", "liger": "qwen2", "liger_window": "qwen3",
              "lawcat": "qwen3"}


@pytest.mark.parity
@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_split_and_resume_equals_unsplit(make_tiny_model, mechanism):
    arch = SPLIT_ARCH[mechanism]
    model = converted(make_tiny_model, mechanism, arch)
    ids = torch.randint(0, 256, (2, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    for split, cache_class in ((1, DynamicCache), (7, StudentCache), (33, DynamicCache)):
        logits, cache = run_split(model, ids, split, cache_class)
        assert rel_rms(logits, full) <= FORM_TOL, (split, rel_rms(logits, full))
        assert all(cache.get_seq_length(i) == 50 for i in range(len(cache.layers)))


@pytest.mark.parity
@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize("softmax_layers", [[], [1]], ids=["all_converted", "hybrid"])
def test_token_by_token_decoding_equals_full_forward(make_tiny_model, mechanism, softmax_layers):
    model = converted(make_tiny_model, mechanism, softmax_layers=softmax_layers)
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(30)]
    assert rel_rms(torch.cat(steps, dim=1), full) <= DECODE_TOL


def cache_bytes_after(model, ids, lengths):
    cache = DynamicCache(config=model.config)
    sizes, done = [], 0
    with torch.no_grad():
        for n in lengths:
            model(ids[:, done:n], past_key_values=cache, use_cache=True)
            done = n
            sizes.append(cache_nbytes(cache))
    return sizes


@pytest.mark.parametrize("mechanism", ["linear", "liger", "lawcat"])
def test_state_memory_is_constant_for_linear_mechanisms(make_tiny_model, mechanism):
    model = converted(make_tiny_model, mechanism)
    ids = torch.randint(0, 256, (1, 120), generator=torch.Generator().manual_seed(2))
    small, large = cache_bytes_after(model, ids, [40, 120])
    assert small == large > 0


@pytest.mark.parametrize("mechanism", ["window_linear", "liger_window"])
def test_state_memory_is_bounded_by_the_window(make_tiny_model, mechanism):
    model = converted(make_tiny_model, mechanism)  # W = 8
    ids = torch.randint(0, 256, (1, 120), generator=torch.Generator().manual_seed(3))
    before_full, at_window, later = cache_bytes_after(model, ids, [4, 8, 120])
    assert before_full < at_window == later


def test_softmax_layers_keep_growing_kv(make_tiny_model):
    model = converted(make_tiny_model, "linear", softmax_layers=[0])
    ids = torch.randint(0, 256, (1, 60), generator=torch.Generator().manual_seed(4))
    small, large = cache_bytes_after(model, ids, [20, 60])
    assert large > small


@pytest.mark.parametrize("form", ["chunk", "parallel", "recurrent"])
def test_window_only_is_sliding_window_softmax(make_tiny_model, form):
    model = converted(make_tiny_model, "window_linear", window_only=True, window_size=5)
    set_form(model, form)
    attn = model.model.layers[0].self_attn
    hidden = torch.randn(2, 20, model.config.hidden_size, generator=torch.Generator().manual_seed(5))
    position_embeddings = model.model.rotary_emb(hidden, torch.arange(20)[None])
    with torch.no_grad():
        p = attn.project(hidden, position_embeddings)
        y, _ = attn.mechanism(p, None, attn.opts, want_state=False)
    assert rel_rms(y, sliding_window_softmax(p, 5)) <= FORM_TOL
