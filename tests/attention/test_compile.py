"""`attention.compile`: training calls run a torch.compile'd mechanism with the eager results, and
evaluation stays eager."""
import dataclasses

import torch

import linearize
from attn_helpers import converted, rel_rms
from linearize.losses import PairCollector, transfer_mse
from linearize.surgery import wrapped_attentions

# inductor reorders and fuses fp32 reductions: agreement to ~1e-6 observed, checked at 1e-4.
COMPILE_TOL = 1e-4


def set_compile(model, flag: bool) -> None:
    for layer in wrapped_attentions(model):
        layer.opts = dataclasses.replace(layer.opts, compile=flag)


def transfer_loss_and_grads(model, x):
    model.zero_grad()
    collector = PairCollector()
    with linearize.transfer_mode(model, collector):
        model(input_ids=x, use_cache=False)
    loss = transfer_mse(collector.take(), 1000.0)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_compiled_transfer_matches_eager(make_tiny_model):
    model = converted(make_tiny_model, "window_linear", compile=True)
    linearize.freeze_for_transfer(model)
    layers = list(wrapped_attentions(model))
    x = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    set_compile(model, False)
    loss_eager, grads_eager = transfer_loss_and_grads(model, x)
    set_compile(model, True)
    loss_compiled, grads_compiled = transfer_loss_and_grads(model, x)
    assert all(layer._compiled is not None for layer in layers)  # the compiled path really ran
    assert abs(loss_compiled.item() - loss_eager.item()) <= COMPILE_TOL * loss_eager.item()
    assert grads_eager.keys() == grads_compiled.keys() and grads_eager
    for name, grad in grads_eager.items():
        assert rel_rms(grads_compiled[name], grad) <= COMPILE_TOL, name


def test_evaluation_stays_eager(make_tiny_model):
    model = converted(make_tiny_model, "window_linear", compile=True)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 256, (1, 16)), use_cache=False)
    assert all(layer._compiled is None for layer in wrapped_attentions(model))


def test_compiled_lora_style_training_matches_eager(make_tiny_model):
    """Student mode with gradients (LoRA recovery): the compiled mechanism under recompute-in-backward."""
    model = converted(make_tiny_model, "window_linear", compile=True)
    model.train()
    x = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    results = []
    for use_compile in (False, True):
        set_compile(model, use_compile)
        model.zero_grad()
        loss = model(input_ids=x, use_cache=False).logits.square().mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_eager, grads_eager), (loss_compiled, grads_compiled) = results
    assert all(layer.recompute and layer._compiled is not None for layer in wrapped_attentions(model))
    assert abs(loss_compiled.item() - loss_eager.item()) <= COMPILE_TOL * loss_eager.item()
    for name, grad in grads_eager.items():
        assert rel_rms(grads_compiled[name], grad) <= COMPILE_TOL, name
