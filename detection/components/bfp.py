"""Balanced Feature Pyramid (Libra R-CNN, Pang et al., CVPR 2019, Sec. 3.2)."""

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BalancedFeaturePyramid", "NonLocalBlock2d"]

_REFINE_TYPES = ("none", "conv", "non_local")


class NonLocalBlock2d(nn.Module):
    """Embedded-Gaussian non-local block (Wang et al., CVPR 2018), residual, without normalisation.

    ``out = x + W(softmax(θ(x)ᵀ φ(x)) g(x))`` over all spatial positions, with 1×1 convolutions
    θ, φ, g (``C → C / reduction``) and W (``C / reduction → C``). The affinities are not scaled
    by ``1/√C'`` (the embedded-Gaussian form of the paper, as in mmdet's BFP). W starts at zero,
    so the block starts as the identity.
    """

    def __init__(self, channels: int, reduction: int = 2) -> None:
        super().__init__()
        inner = max(channels // reduction, 1)
        self.theta = nn.Conv2d(channels, inner, 1)
        self.phi = nn.Conv2d(channels, inner, 1)
        self.g = nn.Conv2d(channels, inner, 1)
        self.out = nn.Conv2d(inner, channels, 1)
        for conv in (self.theta, self.phi, self.g):
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.zeros_(conv.bias)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        query = self.theta(x).flatten(2).transpose(1, 2)  # [n, hw, c']
        key = self.phi(x).flatten(2)  # [n, c', hw]
        value = self.g(x).flatten(2).transpose(1, 2)  # [n, hw, c']
        attention = torch.softmax(query @ key, dim=-1)
        context = (attention @ value).transpose(1, 2).reshape(n, -1, h, w)
        return x + self.out(context)


def _resize(x: Tensor, size: torch.Size, pool: bool) -> Tensor:
    """Adaptive-max-pool (``pool=True``) or nearest-interpolate ``x`` to spatial ``size``."""
    if x.shape[-2:] == size:
        return x
    if pool:
        return F.adaptive_max_pool2d(x, size)
    return F.interpolate(x, size=size, mode="nearest")


class BalancedFeaturePyramid(nn.Module):
    """Balanced Feature Pyramid: gather, refine, scatter (Libra R-CNN, Sec. 3.2).

    With ``L`` maps ``C_l`` (finest first) and ``r = refine_index``::

        C = (1/L) · Σ_l resize(C_l, size of C_r)       gather: finer maps max-pooled, coarser interpolated
        P_l = C_l + resize(refine(C), size of C_l)     scatter: to finer maps nearest-upsampled, to coarser max-pooled

    where ``refine`` is ``"none"`` (the identity), a 3×3 convolution (``"conv"``) or a
    :class:`NonLocalBlock2d` (``"non_local"``).

    ``forward`` takes and returns an ``OrderedDict`` as produced by torchvision's
    ``FeaturePyramidNetwork`` (``'0'..'3', 'pool'`` or ``'p3'..'p7'``), keeping keys and order.
    ``refine_index`` is the position of the gathering level in that dict (Libra R-CNN gathers at
    P4: 2 of Faster R-CNN's P2-P6, 1 of RetinaNet's P3-P7).
    """

    def __init__(
        self,
        in_channels: int,
        num_levels: int,
        refine_index: int,
        refine_type: str,
    ) -> None:
        super().__init__()
        if not 0 <= refine_index < num_levels:
            raise ValueError(f"refine_index must be in [0, {num_levels}), got {refine_index}")
        if refine_type not in _REFINE_TYPES:
            raise ValueError(f"refine_type must be one of {_REFINE_TYPES}, got {refine_type!r}")
        self.num_levels = num_levels
        self.refine_index = refine_index
        self.refine: nn.Module
        if refine_type == "none":
            self.refine = nn.Identity()
        elif refine_type == "conv":
            self.refine = nn.Conv2d(in_channels, in_channels, 3, padding=1)
            nn.init.kaiming_uniform_(self.refine.weight, a=1)
            nn.init.zeros_(self.refine.bias)
        else:
            self.refine = NonLocalBlock2d(in_channels)

    def forward(self, features: "OrderedDict[str, Tensor]") -> "OrderedDict[str, Tensor]":
        if len(features) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} feature levels, got {len(features)}")
        maps = list(features.values())
        size = maps[self.refine_index].shape[-2:]
        gathered = [_resize(x, size, pool=i < self.refine_index) for i, x in enumerate(maps)]
        balanced = self.refine(torch.stack(gathered).mean(dim=0))
        return OrderedDict(
            (name, x + _resize(balanced, x.shape[-2:], pool=i > self.refine_index))
            for i, (name, x) in enumerate(features.items())
        )
