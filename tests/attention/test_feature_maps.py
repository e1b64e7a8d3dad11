import pytest
import torch


from linearize.feature_maps import FEATURE_MAPS, build_feature_map

H, D = 3, 8


@pytest.mark.parametrize("name", list(FEATURE_MAPS))
def test_shape_matches_out_dim(name):
    fm = build_feature_map(name, H, D, feature_dim=5)
    y = fm(torch.randn(2, 7, H, D))
    assert y.shape == (2, 7, H, fm.out_dim)
    assert y.dtype == torch.float32


def test_hedgehog_is_two_softmaxes_with_identity_init():
    fm = build_feature_map("hedgehog", H, D, feature_dim=D)
    x = torch.randn(2, 4, H, D)
    y = fm(x)
    # Identity init: xW = x, so the map is exactly [softmax(x), softmax(-x)].
    torch.testing.assert_close(y, torch.cat([x.softmax(-1), (-x).softmax(-1)], -1))
    torch.testing.assert_close(y[..., :D].sum(-1), torch.ones(2, 4, H))


def test_hedgehog_identity_init_with_wider_features():
    fm = build_feature_map("hedgehog", H, D, feature_dim=2 * D)
    w = fm.weight.detach()
    assert torch.equal(w[:, :, :D], torch.eye(D).expand(H, D, D))
    assert torch.count_nonzero(w[:, :, D:]) == 0


def test_hedgehog_joint_is_one_softmax():
    fm = build_feature_map("hedgehog_joint", H, D, feature_dim=D)
    y = fm(torch.randn(2, 4, H, D))
    torch.testing.assert_close(y.sum(-1), torch.ones(2, 4, H))
    assert not torch.allclose(y[..., :D].sum(-1), torch.ones(2, 4, H))


def test_positive_maps():
    # Seeded and moderate: for x below about -17, 1 + elu(x) rounds to exactly 0 in fp32.
    x = 3 * torch.randn(2, 4, H, D, generator=torch.Generator().manual_seed(0))
    assert (build_feature_map("elu", H, D)(x) > 0).all()
    assert (build_feature_map("t2r", H, D, 6)(x) >= 0).all()
    torch.testing.assert_close(build_feature_map("softmax_dim", H, D)(x).sum(-1), torch.ones(2, 4, H))


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="hedgehog, hedgehog_joint, t2r, elu, softmax_dim, identity"):
        build_feature_map("cosformer", H, D)


def test_hedgehog_backward_matches_autograd_of_the_formula():
    """Hedgehog's hand-written backward against autograd of [softmax(xW), softmax(−xW)] + eps."""
    gen = torch.Generator().manual_seed(0)
    fm = build_feature_map("hedgehog", H, D, feature_dim=6)
    with torch.no_grad():
        fm.weight.add_(0.3 * torch.randn(fm.weight.shape, generator=gen))
    x = torch.randn(2, 5, H, D, generator=gen, requires_grad=True)
    grad = torch.randn(2, 5, H, 12, generator=gen)
    fm(x).backward(grad)
    w_ref = fm.weight.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    z = torch.einsum("bthd,hdf->bthf", x_ref, w_ref)
    torch.cat([z.softmax(-1), (-z).softmax(-1)], -1).add(1e-12).backward(grad)
    # fp32, a handful of terms per entry: agreement to a few ulps, checked at 1e-5 relative.
    torch.testing.assert_close(fm.weight.grad, w_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)


def test_hedgehog_function_passes_gradcheck():
    from linearize.feature_maps import _HedgehogFunction

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, H, 4, D, dtype=torch.float64, generator=gen, requires_grad=True)  # heads-first
    w = torch.randn(H, D, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    # float64 finite differences; the default gradcheck tolerances (atol 1e-5, rtol 1e-3) apply.
    assert torch.autograd.gradcheck(_HedgehogFunction.apply, (x, w))
