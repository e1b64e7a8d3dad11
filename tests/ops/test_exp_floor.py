"""The floored exponentials every op uses to stay off CPU exp's slow underflow path."""
import torch

from linearize.ops._common import EXP_FLOOR, floored_exp, masked_exp


def test_floored_exp_is_exp_above_the_floor_and_tiny_below():
    x = torch.tensor([0.0, -1.0, -50.0, -86.9, -87.5, -200.0, float("-inf")])
    y = floored_exp(x)
    torch.testing.assert_close(y[:4], x[:4].exp(), rtol=0, atol=0)
    # below the floor: exp(EXP_FLOOR) ≈ 1.6e-38 instead of 0 or a denormal
    assert torch.equal(y[4:], torch.full((3,), float(torch.tensor(EXP_FLOOR).exp())))
    assert (y[4:] < 2e-38).all()
    assert x.tolist()[-1] == float("-inf")  # the input is left untouched


def test_masked_exp_matches_masked_fill_exp_with_exact_zeros():
    gen = torch.Generator().manual_seed(0)
    x = (5 * torch.randn(6, 7, generator=gen)).requires_grad_(True)
    keep = torch.rand(6, 7, generator=gen) > 0.4
    with torch.no_grad():
        x[~keep] = 1e4  # masked entries may be huge: exp would overflow to inf and inf·0 to NaN
    y = masked_exp(x, keep)
    ref = x.detach().masked_fill(~keep, float("-inf")).exp()
    # Same fp32 exp on the kept entries (all above the floor here): bitwise equal.
    assert torch.equal(y.detach(), ref)
    assert torch.equal(y.detach()[~keep], torch.zeros(int((~keep).sum())))
    y.sum().backward()
    torch.testing.assert_close(x.grad, ref, rtol=0, atol=0)  # d exp(x)/dx = exp(x) kept, 0 masked


def test_exp_functions_pass_gradcheck():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    keep = torch.rand(4, 5, generator=gen) > 0.3
    # float64 finite differences, inputs far above the floor: the default tolerances apply.
    assert torch.autograd.gradcheck(floored_exp, (x,))
    assert torch.autograd.gradcheck(lambda t: masked_exp(t, keep), (x,))
