"""The LoRA-recovery objective's distillation options: top-k KL (k = vocabulary is the full KL), the
temperature, and hidden-state alignment to the teacher's layer outputs, all read through teacher_view."""
from __future__ import annotations

import pytest
import torch

import linearize
from linearize.losses import recovery_objective
from linearize.losses.distill import distill_kl, hidden_mse, top_k_kl

from conftest import tiny_model


@pytest.fixture(scope="module")
def converted():
    model = tiny_model("llama").eval()
    linearize.linearize_model(model, linearize.AttentionConfig(mechanism="window_linear", window_size=4, feature_dim=8,
                                                               chunk_size=4))
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        student = model(input_ids=ids, use_cache=False, output_hidden_states=True)
        with linearize.teacher_mode(model):
            teacher = model(input_ids=ids, use_cache=False, output_hidden_states=True)
    return model, ids, student, teacher


def test_top_k_over_the_whole_vocabulary_is_the_full_kl(converted):
    model, ids, student, teacher = converted
    vocab = model.config.vocab_size
    with torch.no_grad():
        full = recovery_objective(kl_weight=1.0, ce_weight=0.0)(model, ids)
        every = recovery_objective(kl_weight=1.0, ce_weight=0.0, kl_top_k=vocab)(model, ids)
        few = recovery_objective(kl_weight=1.0, ce_weight=0.0, kl_top_k=4)(model, ids)
    # the same sum over the vocabulary, reduced in another order: agreement to fp32 rounding
    torch.testing.assert_close(every, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(full, distill_kl(student.logits, teacher.logits), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(few, top_k_kl(student.logits, teacher.logits, 4), rtol=1e-5, atol=1e-6)
    assert not torch.isclose(few, full, rtol=1e-3)  # the bucket of the other tokens is not the full KL


def test_the_temperature_softens_both_sides_and_scales_by_its_square(converted):
    model, ids, student, teacher = converted
    with torch.no_grad():
        soft = recovery_objective(kl_weight=1.0, ce_weight=0.0, kl_temperature=2.0)(model, ids)
    want = distill_kl(student.logits / 2.0, teacher.logits / 2.0) * 4.0
    torch.testing.assert_close(soft, want, rtol=1e-5, atol=1e-6)  # fp32 rounding of the same sums


def test_hidden_alignment_reads_every_decoder_layer_output(converted):
    model, ids, student, teacher = converted
    with torch.no_grad():
        aligned = recovery_objective(kl_weight=0.0, ce_weight=0.0, hidden_weight=1.0)(model, ids)
        with linearize.teacher_mode(model):  # the teacher against itself: nothing to align
            itself = recovery_objective(kl_weight=0.0, ce_weight=0.0, hidden_weight=1.0)(model, ids)
    assert aligned > 0 and itself == 0
    torch.testing.assert_close(aligned, hidden_mse(student.hidden_states[1:], teacher.hidden_states[1:]))


def test_an_objective_with_nothing_to_learn_is_refused():
    with pytest.raises(ValueError, match="positive sum"):
        recovery_objective(kl_weight=0.0, ce_weight=0.0, hidden_weight=0.0)
