"""Unit tests of the transfer MSE, attention-weight cross-entropy, distillation KL and the next-token loss."""
from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F

from linearize.losses import PairCollector, attention_ce, distill_kl, kl_per_position, next_token_loss, transfer_mse

Pair = namedtuple("Pair", "layer_idx student teacher student_weights teacher_weights")


def _pair(idx, shape=(2, 5, 4, 8), weights=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(shape, generator=g, requires_grad=True)
    teacher = torch.randn(shape, generator=g)
    sw = tw = None
    if weights:
        B, T, H, _ = shape
        causal = torch.ones(T, T).tril().bool()
        tw = torch.randn(B, H, T, T, generator=g).masked_fill(~causal, float("-inf")).softmax(-1)  # [B, H, T, T]
        sw = torch.rand(B, H, T, T, generator=g).masked_fill(~causal, 0.0)
    return Pair(idx, student, teacher, sw, tw)


def test_transfer_mse_is_mean_over_layers_times_factor():
    pairs = [_pair(0, seed=1), _pair(1, shape=(2, 5, 4, 8), seed=2)]
    expected = sum(((p.student - p.teacher) ** 2).mean() for p in pairs) / len(pairs) * 1000.0
    got = transfer_mse(pairs, factor=1000.0)
    # fp32 sums of 320 terms in a different order
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


def test_transfer_mse_bf16_inputs_computed_in_fp32_and_teacher_gets_no_grad():
    p = _pair(0)
    teacher = p.teacher.clone().requires_grad_(True)
    pair = Pair(0, p.student.bfloat16(), teacher.bfloat16(), None, None)
    loss = transfer_mse([pair])
    assert loss.dtype == torch.float32
    loss.backward()
    assert teacher.grad is None and p.student.grad is not None


def test_transfer_mse_needs_pairs():
    with pytest.raises(ValueError, match="no transfer pairs"):
        transfer_mse([])


def test_attention_ce_minimal_when_student_matches_teacher():
    p = _pair(0, weights=True)
    teacher_entropy = -(p.teacher_weights * p.teacher_weights.clamp_min(1e-12).log()).sum(-1).mean()
    scaled_copy = Pair(0, p.student, p.teacher, p.teacher_weights * 3.0, p.teacher_weights)
    # row normalization makes the scale irrelevant; fp32 log/sum rounding only
    torch.testing.assert_close(attention_ce([scaled_copy]), teacher_entropy, rtol=1e-5, atol=1e-6)
    assert attention_ce([p]) > teacher_entropy + 0.01


def test_attention_ce_skips_layers_without_weights_and_raises_when_none():
    with_w, without = _pair(0, weights=True), _pair(1)
    torch.testing.assert_close(attention_ce([with_w, without]), attention_ce([with_w]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="want_weights"):
        attention_ce([without])


def test_distill_kl_matches_definition_and_mask():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 6, 11, generator=g), torch.randn(2, 6, 11, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    per_pos = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
    # same math through a different torch kernel
    torch.testing.assert_close(distill_kl(s, t), per_pos.mean(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(distill_kl(s, t, mask), per_pos[mask.bool()].mean(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(kl_per_position(s, t), per_pos, rtol=1e-5, atol=1e-6)  # the [B, T] evaluation sums
    assert distill_kl(t, t).abs() < 1e-6  # KL of a distribution with itself; fp32 rounding


def test_distill_kl_rejects_shape_mismatch_and_empty_mask():
    s = torch.randn(1, 3, 5)
    with pytest.raises(ValueError, match="shapes differ"):
        distill_kl(s, torch.randn(1, 3, 6))
    with pytest.raises(ValueError, match="no positions"):
        distill_kl(s, s, torch.zeros(1, 3))


def test_collector_take_empties():
    c = PairCollector(want_weights=True)
    c(_pair(0))
    assert len(c.take()) == 1 and c.take() == [] and c.want_weights


def test_next_token_loss_is_the_shifted_cross_entropy_in_every_reduction():
    """Position t's logits predict token t+1: the float64 log-softmax picked at the next token."""
    g = torch.Generator().manual_seed(0)
    logits, ids = torch.randn(2, 5, 7, generator=g), torch.randint(0, 7, (2, 5), generator=g)
    picked = -logits.double().log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]  # [B, T−1]
    # fp32 cross-entropy against the float64 reference: rounding of 7-way log-sum-exps only
    torch.testing.assert_close(next_token_loss(logits, ids, reduction="none").double(), picked, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(next_token_loss(logits, ids).double(), picked.mean(), rtol=1e-6, atol=1e-6)
    summed = next_token_loss(logits, ids, reduction="sum").double()
    torch.testing.assert_close(summed, picked.sum(), rtol=1e-6, atol=1e-6)


def test_recovery_objective_weights_ce_and_kl():
    """ce_weight · CE + kl_weight · KL, with the teacher read through teacher_view (softmax attention):
    ce_weight=0 leaves the KL alone (distillation on logits only), and both at 0 is refused."""
    import linearize
    from linearize.losses import recovery_objective

    from conftest import tiny_model

    model = tiny_model("llama").eval()
    linearize.linearize_model(model, linearize.AttentionConfig(mechanism="window_linear", window_size=4, feature_dim=8,
                                                               chunk_size=4))
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        student = model(input_ids=ids, use_cache=False).logits  # [B, T, V]
        with linearize.teacher_mode(model):
            teacher = model(input_ids=ids, use_cache=False).logits  # [B, T, V]
        ce, kl = next_token_loss(student, ids), distill_kl(student, teacher)
        assert kl > 1e-4  # the converted layers differ from softmax: the KL term is not trivially zero
        # float32 forwards of the same model, reduced in a different order: agreement to ~1e-6 relative
        torch.testing.assert_close(recovery_objective(kl_weight=1.0, ce_weight=0.0)(model, ids), kl)
        torch.testing.assert_close(recovery_objective(kl_weight=0.0, ce_weight=1.0)(model, ids), ce)
        torch.testing.assert_close(recovery_objective(kl_weight=0.5, ce_weight=2.0)(model, ids), 2.0 * ce + 0.5 * kl)
    with pytest.raises(ValueError, match="positive sum"):
        recovery_objective(kl_weight=0.0, ce_weight=0.0)



def _logits(*shape, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def _top_k_kl_reference(s, t, k, tau):
    """float64 by hand: the teacher's top-k tokens and one bucket for the rest, τ² · KL over k + 1 outcomes."""
    p, q = (t.double() / tau).softmax(-1), (s.double() / tau).softmax(-1)
    idx = p.topk(k, dim=-1).indices
    p_k, q_k = p.gather(-1, idx), q.gather(-1, idx)
    p_all = torch.cat([p_k, 1 - p_k.sum(-1, keepdim=True)], -1)  # [B, T, k+1]
    q_all = torch.cat([q_k, 1 - q_k.sum(-1, keepdim=True)], -1)
    return tau**2 * (p_all * (p_all / q_all).log()).sum(-1)  # [B, T]


def test_top_k_kl_with_k_equal_vocabulary_is_the_full_kl():
    from linearize.losses.distill import top_k_kl

    s, t = _logits(2, 5, 13, seed=1), _logits(2, 5, 13, seed=2)
    # the same sums over the same 13 tokens in a different order: fp32 rounding only
    torch.testing.assert_close(top_k_kl(s, t, k=13), distill_kl(s, t), rtol=1e-5, atol=1e-6)
    full_at_tau = distill_kl(s / 2.0, t / 2.0) * 4.0  # τ² · KL of the softened distributions
    torch.testing.assert_close(top_k_kl(s, t, k=13, temperature=2.0), full_at_tau, rtol=1e-5, atol=1e-6)


def test_top_k_kl_matches_the_bucketed_definition_and_mask():
    from linearize.losses.distill import top_k_kl, top_k_kl_per_position, teacher_top_k

    s, t = _logits(2, 6, 17, seed=3), _logits(2, 6, 17, seed=4)
    mask = torch.tensor([[1, 1, 0, 0, 0, 1], [1, 1, 1, 1, 1, 1]])
    for k, tau in ((1, 1.0), (4, 1.0), (4, 2.5), (16, 0.7)):
        ref = _top_k_kl_reference(s, t, k, tau)
        got = top_k_kl_per_position(s, teacher_top_k(t, k, tau), tau)
        # fp32 against float64 on 17-way softmaxes of logits up to ~10 / 0.7
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(top_k_kl(s, t, k, tau, mask).double(), ref[mask.bool()].mean(), rtol=1e-4, atol=1e-5)
    assert top_k_kl(t, t, k=4).abs() < 1e-5  # a distribution against itself; fp32 rounding


def test_top_k_kl_cached_form_and_gradients():
    """The cached form (teacher top-k stored) gives the same loss; gradients reach the student only."""
    from linearize.losses.distill import TeacherTopK, top_k_kl, top_k_kl_cached, teacher_top_k

    s = _logits(1, 4, 11, seed=5).requires_grad_(True)
    t = _logits(1, 4, 11, seed=6).requires_grad_(True)
    cached = teacher_top_k(t, 3, 1.5)
    assert cached.log_probs.shape == cached.indices.shape == (1, 4, 3) and not cached.log_probs.requires_grad
    stored = TeacherTopK(cached.log_probs.clone(), cached.indices.clone())
    loss = top_k_kl_cached(s, stored, 1.5)
    torch.testing.assert_close(loss, top_k_kl(s, t, 3, 1.5), rtol=0, atol=0)  # same computation
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None


def test_top_k_kl_rejects_bad_k_and_temperature():
    from linearize.losses.distill import top_k_kl

    s = _logits(1, 2, 5)
    for k in (0, 6):
        with pytest.raises(ValueError, match="k must be"):
            top_k_kl(s, s, k)
    with pytest.raises(ValueError, match="temperature"):
        top_k_kl(s, s, 2, temperature=0.0)


def test_hidden_mse_zero_for_the_teacher_against_itself_and_positive_for_a_student():
    """On a converted tiny model: the decoder-layer outputs of the teacher against themselves give 0,
    the student's against the teacher's a positive mean of the per-layer MSEs."""
    import linearize
    from linearize.losses.distill import hidden_mse

    from conftest import tiny_model

    model = tiny_model("llama").eval()
    linearize.linearize_model(model, linearize.AttentionConfig(mechanism="linear", feature_dim=8, chunk_size=4))
    ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        student = model(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states[1:]
        with linearize.teacher_mode(model):
            teacher = model(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states[1:]
    assert len(student) == model.config.num_hidden_layers
    assert hidden_mse(teacher, teacher) == 0
    expected = sum(((s - t) ** 2).mean() for s, t in zip(student, teacher)) / len(student)
    got = hidden_mse(student, teacher)
    assert got > 1e-6  # linear attention differs from softmax in both layers (random weights: small outputs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)  # same sums, different order
    mask = torch.tensor([[1] * 10, [0] * 10])
    expected_first = sum(((s[0] - t[0]) ** 2).mean() for s, t in zip(student, teacher)) / len(student)
    torch.testing.assert_close(hidden_mse(student, teacher, mask), expected_first, rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="one teacher output per student layer"):
        hidden_mse(student, teacher[:1])
