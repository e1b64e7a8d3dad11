"""`model.generate` on converted models builds and uses the student cache by itself."""
import pytest
import torch

import linearize
from attn_helpers import (
    MECHANISMS, attention_config, greedy_by_full_forwards, randomize_student,
)

pytestmark = pytest.mark.parity


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_greedy_generate_matches_argmax_of_full_forwards(make_tiny_model, mechanism):
    model = make_tiny_model("llama")
    linearize.linearize_model(model, attention_config(mechanism, softmax_layers=[0] if mechanism == "linear" else []))
    randomize_student(model)
    prompt = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(out, greedy_by_full_forwards(model, prompt, 6))


def test_teacher_mode_generates_like_the_original_model(make_tiny_model):
    model = make_tiny_model("qwen2")
    prompt = torch.randint(1, 256, (1, 8), generator=torch.Generator().manual_seed(3))
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(prompt, **settings)
        linearize.linearize_model(model, attention_config("window_linear"))
        with linearize.teacher_mode(model):
            assert torch.equal(model.generate(prompt, **settings), ref)


@pytest.mark.parametrize("mechanism", ["window_linear", "lawcat"])
def test_beam_search_with_cache_equals_without(make_tiny_model, mechanism):
    """Beam search reorders the cache every step: the student states must follow their beams."""
    model = make_tiny_model("llama")
    linearize.linearize_model(model, attention_config(mechanism, softmax_layers=[1] if mechanism == "lawcat" else []))
    randomize_student(model)
    prompt = torch.randint(1, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    settings = dict(max_new_tokens=8, num_beams=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(model.generate(prompt, **settings), model.generate(prompt, use_cache=False, **settings))
