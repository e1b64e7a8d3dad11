"""Attention sinks (`attention.sink_tokens`) in every window mechanism: the mechanism's output is the
float64 formula with the first N keys in every query's softmax part, and cached decoding (prefill, then
token by token) and `generate` follow the full forward with a cache bounded by W + N keys."""
import pytest
import torch
from transformers import DynamicCache

import linearize
from attn_helpers import attention_config, converted, greedy_by_full_forwards, rel_rms
from linearize.attention.window_linear import sliding_window

# fp32 mechanism vs float64 formula over 16 tokens: rounding sits near 1e-7.
ORACLE_TOL = 1e-5
# Cached decoding vs one full forward through a 2-layer fp32 model: summation order only (~1e-7).
DECODE_TOL = 1e-5
SEQ, WINDOW, SINKS = 16, 3, 2
# (mechanism, overrides): every mechanism with a window half, and the window-only baseline
WINDOW_SETTINGS = {
    "window_linear": {},
    "window_only": {"window_only": True},
    "liger_window": {},
    "gated_delta_window": {"init": "zero_gate"},
    "window_linear_decay": {"linear_half_life": 4.0},  # the decayed linear branch
    "window_linear_learned_decay": {"linear_half_life": 4.0, "linear_half_life_learned": True},  # one per head
}
DECAYED = ("window_linear_decay", "window_linear_learned_decay")


def build(make_tiny_model, setting, **overrides):
    mechanism = "window_linear" if setting in ("window_only", *DECAYED) else setting
    return converted(make_tiny_model, mechanism, **WINDOW_SETTINGS[setting], **overrides)


def projected(model):
    """Layer 0's wrapper and its `Projected` inputs for a random hidden sequence `[2, SEQ, hidden]`."""
    attn = model.model.layers[0].self_attn
    hidden = torch.randn(2, SEQ, model.config.hidden_size, generator=torch.Generator().manual_seed(7))
    position_embeddings = model.model.rotary_emb(hidden, torch.arange(SEQ)[None])
    with torch.no_grad():
        return attn, attn.project(hidden, position_embeddings)


def heads_first(x, group):
    return x.double().repeat_interleave(group, dim=2).transpose(1, 2)  # [B, H, T, ·]


def softmax_keys(window, sinks):
    """`[T, T]` bool: each query's window keys and the first `sinks` keys at or before it."""
    lag = torch.arange(SEQ)[:, None] - torch.arange(SEQ)[None, :]  # [T, T]
    return (lag >= 0) & ((lag < window) | (torch.arange(SEQ)[None, :] < sinks))


def test_window_linear_formula_with_sinks(make_tiny_model):
    model = converted(make_tiny_model, "window_linear", window_size=WINDOW, sink_tokens=SINKS)
    attn, p = projected(model)
    mech = attn.mechanism
    with torch.no_grad():
        y, _ = mech(p, None, attn.opts, want_state=False)
        fq = mech.feature_maps.q(p.q_rope).double().transpose(1, 2)  # [B, H, T, F]
        fk = heads_first(mech.feature_maps.k(p.k_rope.repeat_interleave(p.group, dim=2)), 1)  # [B, H, T, F]
    q, k, v = p.q_rope.double().transpose(1, 2), heads_first(p.k_rope, p.group), heads_first(p.v, p.group)
    lag = torch.arange(SEQ)[:, None] - torch.arange(SEQ)[None, :]  # [T, T]
    soft = softmax_keys(WINDOW, SINKS)
    linear = (lag >= 0) & ~soft  # every other causal key; never a sink
    scores = ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).masked_fill(~soft, float("-inf"))  # [B, H, T, T]
    gamma = torch.sigmoid(mech.window_logit.detach().double())[None, :, None, None]
    weights = gamma * (scores - scores.amax(-1, keepdim=True)).exp() + (fq @ fk.transpose(-1, -2)) * linear
    ref = ((weights @ v) / weights.sum(-1, keepdim=True)).transpose(1, 2)  # [B, T, H, D]
    assert rel_rms(y, ref) <= ORACLE_TOL
    assert linear.any() and (soft & (lag >= WINDOW)).any()  # both branches and a sink outside the window


def test_window_half_is_softmax_over_window_and_sinks(make_tiny_model):
    """`sliding_window` (the window half of liger_window and gated_delta_window) with sinks."""
    model = converted(make_tiny_model, "liger_window")
    attn, p = projected(model)
    with torch.no_grad():
        y, _ = sliding_window(p, WINDOW, attn.opts, None, False, SINKS)
    q, k, v = p.q_rope.double().transpose(1, 2), heads_first(p.k_rope, p.group), heads_first(p.v, p.group)
    scores = ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).masked_fill(~softmax_keys(WINDOW, SINKS), float("-inf"))
    ref = (scores.softmax(-1) @ v).transpose(1, 2)  # [B, T, H, D]
    assert rel_rms(y, ref) <= ORACLE_TOL


@pytest.mark.parametrize("setting", list(WINDOW_SETTINGS))
def test_every_window_mechanism_passes_its_sinks_on(make_tiny_model, setting):
    """The same weights with and without sinks give different outputs once keys leave the window."""
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    outs = []
    for sinks in (0, SINKS):
        model = build(make_tiny_model, setting, window_size=WINDOW, sink_tokens=sinks)
        with torch.no_grad():
            outs.append(model(ids, use_cache=False).logits)
    assert rel_rms(outs[1], outs[0]) > 1e-3


def window_cache(state):
    """The window half's `WindowLinearState` of a layer's decode state."""
    return state if hasattr(state, "_fields") else state[0]  # (window, linear/delta state) for the sums


@pytest.mark.parametrize("setting", list(WINDOW_SETTINGS))
def test_prefill_then_decoding_equals_full_forward(make_tiny_model, setting):
    model = build(make_tiny_model, setting, window_size=WINDOW, sink_tokens=SINKS)
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, :1], past_key_values=cache, use_cache=True).logits]  # prefill inside the sinks
        steps += [model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(1, 9)]
        sink_keys = window_cache(cache.layers[0].state).k[:, :, :SINKS].clone()  # [B, H_kv, N, D]
        steps += [model(ids[:, 9:14], past_key_values=cache, use_cache=True).logits]  # a chunked continuation
        steps += [model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(14, 20)]
    assert rel_rms(torch.cat(steps, dim=1), full) <= DECODE_TOL
    window = window_cache(cache.layers[0].state)
    assert window.k.shape[2] == WINDOW + SINKS  # bounded: the sinks and the last W keys
    assert torch.equal(window.k[:, :, :SINKS], sink_keys)  # the first tokens' keys stay


@pytest.mark.parametrize("setting", ["window_linear", "gated_delta_window", *DECAYED])
def test_greedy_generate_matches_full_forwards(make_tiny_model, setting):
    model = build(make_tiny_model, setting, window_size=WINDOW, sink_tokens=SINKS)
    prompt = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(out, greedy_by_full_forwards(model, prompt, 6))


def test_the_half_life_reaches_the_op(make_tiny_model):
    """`attention.linear_half_life` changes window_linear's output once keys are linear, and is the op's
    decayed form: the same weights with a half-life far beyond the sequence are the undecayed model."""
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    logits = {}
    for name, half_life in (("none", None), ("far", 1e9), ("near", 2.0)):
        model = build(make_tiny_model, "window_linear", window_size=WINDOW, sink_tokens=SINKS,
                      linear_half_life=half_life)
        with torch.no_grad():
            logits[name] = model(ids, use_cache=False).logits
    assert rel_rms(logits["far"], logits["none"]) <= ORACLE_TOL
    assert rel_rms(logits["near"], logits["none"]) > 1e-3


def test_a_learned_half_life_is_per_head_and_trains(make_tiny_model):
    """`linear_half_life_learned`: every head starts at linear_half_life, the parameter sits in the gates group
    (trained in attention transfer), a loss reaches it, and a head whose half-life moves changes its output."""
    fresh = make_tiny_model("llama")
    linearize.linearize_model(fresh, attention_config("window_linear", **WINDOW_SETTINGS["window_linear_learned_decay"]))
    start = fresh.model.layers[0].self_attn.mechanism.half_life()
    assert torch.allclose(start, torch.full_like(start, 4.0))  # every head at linear_half_life
    model = build(make_tiny_model, "window_linear_learned_decay", window_size=WINDOW, sink_tokens=SINKS)
    attn, p = projected(model)
    mech = attn.mechanism  # moved off its init: one half-life per head
    gates = [name for name, _ in linearize.student_parameters(model)["gates"]]
    assert any(name.endswith("half_life_log2") for name in gates)
    y, _ = mech(p, None, attn.opts, want_state=False)
    y.square().sum().backward()
    assert mech.half_life_log2.grad.abs().min() > 0
    with torch.no_grad():
        mech.half_life_log2[0] += 0.5  # head 0: 4 → 64 tokens
        moved, _ = mech(p, None, attn.opts, want_state=False)
    assert rel_rms(moved[:, :, 0], y[:, :, 0].detach()) > 1e-3
    assert rel_rms(moved[:, :, 1:], y[:, :, 1:].detach()) <= ORACLE_TOL
