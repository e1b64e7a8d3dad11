"""Feature maps φ for linear attention, registered by name (the `attention.feature_map` config value).

Every map takes `[B, T, H, D]` and returns `[B, T, H, out_dim]`, computed in fp32 (the softmaxes of
Hedgehog underflow in bf16). `build_feature_map(name, num_heads, head_dim, feature_dim)` builds one.

| name | φ(x) | params | out_dim |
|---|---|---|---|
| hedgehog | [softmax(xW), softmax(−xW)] + 1e-12, two softmaxes over f (LoLCATs form) | W [H, d, f] | 2f |
| hedgehog_joint | softmax([xW, −xW]), one softmax over 2f | W [H, d, f] | 2f |
| t2r | relu(xW + b) | W [H, d, f], b [H, f] | f |
| elu | 1 + elu(x) | none | d |
| softmax_dim | softmax(x) over the head dim (Liger) | none | d |
| identity | x | none | d |
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

# Added to Hedgehog's features so a query never sees an exactly-zero normalizer (an addition, not a clamp:
# below fp32 resolution for any feature that matters, and its backward saves nothing).
HEDGEHOG_MIN = 1e-12


def identity_projection(num_heads: int, head_dim: int, feature_dim: int) -> torch.Tensor:
    """`[H, d, f]` with ones on the diagonal: the first min(d, f) coordinates pass through at init."""
    weight = torch.zeros(num_heads, head_dim, feature_dim)
    eye = torch.eye(min(head_dim, feature_dim))
    weight[:, : eye.shape[0], : eye.shape[1]] = eye
    return weight


class _PerHeadProjection(nn.Module):
    """Base for maps with a learned per-head matrix W `[H, d, f]`, identity-initialised."""

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int):
        super().__init__()
        self.weight = nn.Parameter(identity_projection(num_heads, head_dim, feature_dim))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bthd,hdf->bthf", x.float(), self.weight.float())  # [B, T, H, f]


class _HedgehogFunction(torch.autograd.Function):
    """`[softmax(xW), softmax(−xW)] + HEDGEHOG_MIN` with a hand-written backward. Autograd of the same
    math needs xW and −xW as one `[d, 2f]` matmul each way, an extra pass for the eps and several saved
    tensors; here one `[d, f]` matmul each way, and only x and the output are kept. Attention transfer
    runs this twice per layer and step, so it shows in stage throughput."""

    @staticmethod
    def forward(ctx, x, weight):
        z = x @ weight  # [B, H, T, f]
        signs = torch.tensor([1.0, -1.0], dtype=z.dtype, device=z.device).view(2, 1)
        y = (z.unsqueeze(-2) * signs).softmax(-1)  # [B, H, T, 2, f]: both signs' softmax in one pass
        y.add_(HEDGEHOG_MIN)
        ctx.save_for_backward(x, weight, y)
        return y.flatten(-2)  # [B, H, T, 2f]

    @staticmethod
    def backward(ctx, grad):
        x, weight, y = ctx.saved_tensors
        # Softmax backward of each half, y·(g − Σ g·y), as aten's fused kernel (autograd's own). y carries
        # the +1e-12, which moves the result by about 1e-12 relative: far below fp32 resolution.
        g = grad.unflatten(-1, y.shape[-2:])  # [B, H, T, 2, f]
        dz = torch.ops.aten._softmax_backward_data(g, y, -1, y.dtype)  # [B, H, T, 2, f]
        dz = dz[..., 0, :] - dz[..., 1, :]  # [B, H, T, f]: the second half saw −xW
        dx = dz @ weight.transpose(-1, -2) if ctx.needs_input_grad[0] else None  # [B, H, T, d]
        dw = torch.einsum("bhtd,bhtf->hdf", x, dz) if ctx.needs_input_grad[1] else None  # [H, d, f]
        return dx, dw


class Hedgehog(_PerHeadProjection):
    def __init__(self, num_heads: int, head_dim: int, feature_dim: int = 64):
        super().__init__(num_heads, head_dim, feature_dim)
        self.out_dim = 2 * feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Computed heads-first so the softmax reads contiguous rows; the result is a [B, T, H, 2f] view of
        # heads-first memory, which the ops' heads-first staging reads back without a copy.
        y = _HedgehogFunction.apply(x.float().transpose(1, 2), self.weight.float())  # [B, H, T, 2f]
        return y.transpose(1, 2)  # [B, T, H, 2f]


class HedgehogJoint(_PerHeadProjection):
    def __init__(self, num_heads: int, head_dim: int, feature_dim: int = 64):
        super().__init__(num_heads, head_dim, feature_dim)
        self.out_dim = 2 * feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.project(x)
        return torch.cat([z, -z], dim=-1).softmax(-1) + HEDGEHOG_MIN  # [B, T, H, 2f]


class T2R(_PerHeadProjection):
    def __init__(self, num_heads: int, head_dim: int, feature_dim: int = 64):
        super().__init__(num_heads, head_dim, feature_dim)
        self.bias = nn.Parameter(torch.zeros(num_heads, feature_dim))
        self.out_dim = feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.project(x) + self.bias.float())  # [B, T, H, f]


class _Elementwise(nn.Module):
    """Parameter-free maps that keep the head dim."""

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int = 64):
        super().__init__()
        self.out_dim = head_dim


class Elu(_Elementwise):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1 + F.elu(x.float())


class SoftmaxDim(_Elementwise):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().softmax(-1)


class Identity(_Elementwise):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float()


FEATURE_MAPS: dict[str, Callable[..., nn.Module]] = {
    "hedgehog": Hedgehog,
    "hedgehog_joint": HedgehogJoint,
    "t2r": T2R,
    "elu": Elu,
    "softmax_dim": SoftmaxDim,
    "identity": Identity,
}


def available_feature_maps() -> list[str]:
    return list(FEATURE_MAPS)


def build_feature_map(name: str, num_heads: int, head_dim: int, feature_dim: int = 64) -> nn.Module:
    """Build the registered map `name` for `num_heads` heads of width `head_dim`."""
    if name not in FEATURE_MAPS:
        raise ValueError(f"unknown feature map {name!r}; valid feature maps: {', '.join(FEATURE_MAPS)}")
    return FEATURE_MAPS[name](num_heads, head_dim, feature_dim)
