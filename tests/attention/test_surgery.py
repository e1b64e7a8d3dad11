import dataclasses
import json

import pytest
import torch

import linearize
from attn_helpers import (
    MECHANISMS, attention_config, randomize_student, rel_rms,
)
from linearize.attention import LinearizedAttention
from linearize.surgery import wrapped_attentions

# Transfer mode recomputes the teacher attention with fp32 SDPA instead of the model's eager path:
# same math, different summation order.
TEACHER_RECOMPUTE_TOL = 1e-5
# bf16 weights and activations (8-bit mantissa) through two layers: ~6e-3 measured.
BF16_TOL = 3e-2


def ids(length=24, seed=0):
    return torch.randint(0, 256, (2, length), generator=torch.Generator().manual_seed(seed))


def test_zero_converted_layers_is_bit_identical(make_tiny_model, arch):
    model = make_tiny_model(arch)
    x = ids()
    with torch.no_grad():
        ref = model(x).logits
        for cfg in (attention_config("softmax"), attention_config("linear", softmax_layers=[0, 1])):
            linearize.linearize_model(model, cfg)
            assert not list(wrapped_attentions(model))
            assert torch.equal(model(x).logits, ref)
            linearize.unlinearize_model(model)


def test_unlinearize_restores_the_same_modules(make_tiny_model, arch):
    model = make_tiny_model(arch)
    originals = [layer.self_attn for layer in model.model.layers]
    x = ids()
    with torch.no_grad():
        ref = model(x).logits
        linearize.linearize_model(model, attention_config("window_linear"))
        assert all(isinstance(layer.self_attn, LinearizedAttention) for layer in model.model.layers)
        assert [layer.self_attn.base_layer for layer in model.model.layers] == originals
        assert not torch.equal(model(x).logits, ref)
        linearize.unlinearize_model(model)
        assert [layer.self_attn for layer in model.model.layers] == originals
        assert torch.equal(model(x).logits, ref)
    assert not hasattr(model.config, "linearize")


def test_unsupported_architecture_names_the_supported_ones():
    from transformers import AutoConfig, AutoModelForCausalLM

    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(linearize.UserError, match="unsupported architecture 'gpt2'.*llama, mistral, qwen2, qwen3"):
        linearize.linearize_model(gpt2, attention_config("linear"))


def test_bad_layer_selection_and_double_conversion(make_tiny_model):
    model = make_tiny_model("llama")
    with pytest.raises(linearize.UserError, match="index 5 is out of range"):
        linearize.linearize_model(model, attention_config("linear", layers=[0, 5]))
    linearize.linearize_model(model, attention_config("linear", layers=[1]))
    assert isinstance(model.model.layers[1].self_attn, LinearizedAttention)
    assert not isinstance(model.model.layers[0].self_attn, LinearizedAttention)
    with pytest.raises(linearize.UserError, match="already linearized"):
        linearize.linearize_model(model, attention_config("linear"))


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_freeze_leaves_exactly_the_student_groups(make_tiny_model, mechanism):
    model = make_tiny_model("qwen2")
    linearize.linearize_model(model, attention_config(mechanism))
    trainable = linearize.freeze_for_transfer(model)
    groups = linearize.student_parameters(model)
    grouped = {name for group in groups.values() for name, _ in group}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == grouped
    assert len(trainable) == len(grouped)
    assert all(".mechanism." in name for name in grouped)
    expected = {
        "linear": {"feature_maps"}, "window_linear": {"feature_maps", "mixing"}, "liger": set(),
        "liger_window": set(), "lawcat": {"feature_maps", "gates", "conv"},
    }[mechanism]
    assert {g for g, members in groups.items() if members} == expected


def test_qwen3_student_uses_the_qk_norms(make_tiny_model):
    model = make_tiny_model("qwen3")
    linearize.linearize_model(model, attention_config("window_linear"))
    x = ids()
    with torch.no_grad():
        before = model(x, use_cache=False).logits
        model.model.layers[0].self_attn.base_layer.q_norm.weight.mul_(1.5)
        after = model(x, use_cache=False).logits
    assert rel_rms(after, before) > 1e-3


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_transfer_mode_returns_teacher_outputs(make_tiny_model, arch, mechanism):
    model = make_tiny_model(arch)
    x = ids()
    with torch.no_grad():
        ref = model(x).logits
    linearize.linearize_model(model, attention_config(mechanism))
    randomize_student(model)
    pairs = []
    with torch.no_grad(), linearize.transfer_mode(model, pairs.append):
        logits = model(x, use_cache=False).logits
    assert rel_rms(logits, ref) <= TEACHER_RECOMPUTE_TOL
    assert [p.layer_idx for p in pairs] == [0, 1]
    assert all(p.student.shape == p.teacher.shape == (2, 24, 4, 16) for p in pairs)
    assert all(rel_rms(p.student, p.teacher) > 1e-3 for p in pairs)  # the student really is different
    assert all(a.mode == "student" and a.collector is None for a in wrapped_attentions(model))


def test_teacher_mode_runs_the_original_attention(make_tiny_model):
    model = make_tiny_model("mistral")
    x = ids()
    with torch.no_grad():
        ref = model(x).logits
        linearize.linearize_model(model, attention_config("lawcat"))
        with linearize.teacher_mode(model):
            assert torch.equal(model(x).logits, ref)


def test_attention_weights_for_the_weight_loss(make_tiny_model):
    model = make_tiny_model("llama")
    linearize.linearize_model(model, attention_config("window_linear", window_size=4))

    class Collector(list):
        want_weights = True

        def __call__(self, pair):
            self.append(pair)

    pairs = Collector()
    with torch.no_grad(), linearize.transfer_mode(model, pairs):
        model(ids(12), use_cache=False)
    w = pairs[0].student_weights
    assert w.shape == pairs[0].teacher_weights.shape == (2, 4, 12, 12)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 12))
    assert torch.count_nonzero(w.triu(1)) == 0  # causal


@pytest.mark.parametrize("mechanism", ["linear", "window_linear"])
def test_transfer_mode_collects_weights_when_asked(make_tiny_model, mechanism):
    """`weights=True` adds both attention weights to each pair (rows of the student's sum to 1, as the
    op's parallel form normalizes them); the default hands over outputs only; the mode is undone."""
    model = make_tiny_model("llama")
    linearize.linearize_model(model, attention_config(mechanism, window_size=4))
    for weights in (True, False):
        pairs = []
        with torch.no_grad(), linearize.transfer_mode(model, pairs.append, weights=weights):
            model(ids(12), use_cache=False)
        assert len(pairs) == 2
        for pair in pairs:
            if weights:
                assert pair.student_weights.shape == pair.teacher_weights.shape == (2, 4, 12, 12)
                # normalized as the op's output: the normalizer's eps (1e-6) against row sums of O(1)
                torch.testing.assert_close(pair.student_weights.sum(-1), torch.ones(2, 4, 12), rtol=0, atol=1e-4)
            else:
                assert pair.student_weights is None and pair.teacher_weights is None
    assert all(not a.collect_weights and a.mode == "student" for a in wrapped_attentions(model))


def test_conversion_is_recorded_in_the_config(make_tiny_model):
    model = make_tiny_model("llama")
    linearize.linearize_model(model, attention_config("liger", softmax_layers=[0]))
    record = json.loads(json.dumps(model.config.linearize))
    assert record["layers"] == {"0": "softmax", "1": "liger"}
    assert record["attention"]["mechanism"] == "liger"
    assert "linearize" in model.config.to_dict()


def test_liger_rejects_a_parametric_feature_map(make_tiny_model):
    with pytest.raises(linearize.UserError, match="parameter-free feature map"):
        linearize.linearize_model(make_tiny_model("llama"), attention_config("liger", feature_map="hedgehog"))


def test_transfer_teacher_honours_a_sliding_window(make_tiny_model):
    """Mistral with a window shorter than the sequence: the recomputed teacher must slide too."""
    model = make_tiny_model("mistral", sliding_window=6)
    x = ids(20)
    with torch.no_grad():
        ref = model(x).logits
    linearize.linearize_model(model, attention_config("linear"))
    with torch.no_grad(), linearize.transfer_mode(model, lambda pair: None):
        logits = model(x, use_cache=False).logits
    assert rel_rms(logits, ref) <= TEACHER_RECOMPUTE_TOL


def test_left_padding_is_refused_right_padding_is_exact(make_tiny_model):
    model = make_tiny_model("llama")
    linearize.linearize_model(model, attention_config("liger"))
    x = ids(10)
    with torch.no_grad():
        full = model(x, use_cache=False).logits
        right = torch.ones_like(x)
        right[0, 7:] = 0
        padded = model(x, attention_mask=right, use_cache=False).logits
        assert torch.equal(padded[0, :7], full[0, :7])  # causal: later padding cannot reach earlier tokens
        left = torch.ones_like(x)
        left[0, :3] = 0
        with pytest.raises(linearize.UserError, match="left-padded"):
            model(x, attention_mask=left, use_cache=False)


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_model_cast_to_bf16_after_conversion(make_tiny_model, mechanism):
    """Exports may cast the whole model; the students still compute in fp32 and return the model dtype."""
    model = make_tiny_model("qwen3")
    linearize.linearize_model(model, attention_config(mechanism))
    randomize_student(model)
    x = ids(20)
    with torch.no_grad():
        ref = model(x).logits
        out = model.to(torch.bfloat16)(x).logits
    assert out.dtype == torch.bfloat16
    assert rel_rms(out, ref) <= BF16_TOL


@pytest.mark.parametrize("mechanism", ["linear", "window_linear", "lawcat"])
def test_transfer_loss_reaches_every_student_parameter(make_tiny_model, mechanism):
    model = make_tiny_model("llama")
    linearize.linearize_model(model, attention_config(mechanism))
    randomize_student(model)
    trainable = linearize.freeze_for_transfer(model)
    pairs = []
    with linearize.transfer_mode(model, pairs.append):
        model(ids(20), use_cache=False)
    loss = sum(torch.nn.functional.mse_loss(p.student, p.teacher) for p in pairs)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


@pytest.mark.parametrize("key,value,valid", [
    ("mechanism", "mamba", "linear, window_linear, liger, liger_window, lawcat, softmax"),
    ("form", "fused", "chunk, parallel, recurrent"),
    ("backend", "cuda", "auto, torch, triton"),
])
def test_unknown_names_are_refused_at_conversion(make_tiny_model, key, value, valid):
    with pytest.raises(linearize.UserError, match=f"unknown .*{value}.*{valid}"):
        cfg = dataclasses.replace(attention_config("linear"), **{key: value})
        linearize.linearize_model(make_tiny_model("llama"), cfg)


def test_left_padding_detection_reads_every_mask_layout():
    from linearize.attention.wrapper import hides_earlier_keys

    left, right = torch.tensor([[0, 1, 1], [1, 1, 1]]), torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert hides_earlier_keys(left) and not hides_earlier_keys(right)  # 2D (flash attention)
    as_bool = [m.bool()[:, None, None, :].expand(2, 1, 3, 3) for m in (left, right)]  # SDPA
    assert hides_earlier_keys(as_bool[0]) and not hides_earlier_keys(as_bool[1])
    additive = [torch.zeros(2, 1, 3, 3).masked_fill(~m, torch.finfo(torch.float32).min) for m in as_bool]  # eager
    assert hides_earlier_keys(additive[0]) and not hides_earlier_keys(additive[1])
    assert not hides_earlier_keys(None)


def test_an_unknown_mechanism_is_one_user_error_wherever_the_library_meets_it(make_tiny_model):
    """The library checks a mechanism name in one place (mechanism_factory), with one exception type."""
    import linearize
    from linearize.attention import build_mechanism
    from linearize.config import AttentionConfig
    from linearize.errors import UserError

    bad = AttentionConfig(mechanism="mamba")
    with pytest.raises(UserError, match="unknown mechanism 'mamba'; valid mechanisms: linear"):
        linearize.linearize_model(make_tiny_model("llama"), bad)
    with pytest.raises(UserError, match="unknown mechanism 'mamba'"):
        build_mechanism(bad, 4, 2, 16, 64)
