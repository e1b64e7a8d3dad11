"""Student mode under autograd recomputes the mechanism in backward: same loss and gradients as keeping
its intermediates, and fewer tensors saved for backward."""
import pytest
import torch

import linearize
from attn_helpers import converted, rel_rms
from linearize.surgery import wrapped_attentions

# Same ops recomputed in the same order; only the autograd bookkeeping differs.
RECOMPUTE_TOL = 1e-6


def loss_and_grads(model, recompute: bool, x):
    linearize.set_recompute(model, recompute)
    model.zero_grad()
    loss = model(input_ids=x, use_cache=False).logits.square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mechanism", ["window_linear", "linear"])
def test_recompute_matches_keeping_intermediates(make_tiny_model, mechanism):
    model = converted(make_tiny_model, mechanism)
    model.train()
    x = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    loss_kept, grads_kept = loss_and_grads(model, False, x)
    loss_re, grads_re = loss_and_grads(model, True, x)
    assert torch.allclose(loss_re, loss_kept, rtol=RECOMPUTE_TOL)
    assert grads_kept.keys() == grads_re.keys() and grads_kept
    for name, grad in grads_kept.items():
        assert rel_rms(grads_re[name], grad) <= RECOMPUTE_TOL, name


def saved_bytes(model, recompute: bool, x) -> int:
    """Bytes of the tensors autograd keeps for backward during one forward."""
    linearize.set_recompute(model, recompute)
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=x, use_cache=False).logits.sum()
    return total


def test_recompute_saves_less_for_backward(make_tiny_model):
    model = converted(make_tiny_model, "window_linear")
    model.train()
    x = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(0))
    assert saved_bytes(model, True, x) < saved_bytes(model, False, x)


@pytest.mark.parametrize("recompute", [True, False])
def test_lora_stage_sets_recompute_from_config(make_tiny_model, recompute):
    from linearize.config.schema import LoraRecoveryConfig
    from stages.lora_recovery import wrap_with_lora

    model = converted(make_tiny_model, "window_linear")
    peft_model = wrap_with_lora(model, LoraRecoveryConfig(recompute_attention=recompute))
    layers = list(wrapped_attentions(peft_model))
    assert layers and all(layer.recompute is recompute for layer in layers)


def test_set_recompute_reaches_every_converted_layer(make_tiny_model):
    model = converted(make_tiny_model, "linear")
    for flag in (False, True):
        assert linearize.set_recompute(model, flag) is model
        layers = list(wrapped_attentions(model))
        assert len(layers) == 2 and all(layer.recompute is flag for layer in layers)
