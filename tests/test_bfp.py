from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detection.components import BalancedFeaturePyramid

CHANNELS = 8
FASTER_RCNN = (["0", "1", "2", "3", "pool"], [32, 16, 8, 4, 2], 2)
RETINANET = (["p3", "p4", "p5", "p6", "p7"], [25, 13, 7, 4, 2], 1)


def pyramid(names, sizes, seed=0, batch=2) -> "OrderedDict[str, torch.Tensor]":
    generator = torch.Generator().manual_seed(seed)
    return OrderedDict(
        (name, torch.randn(batch, CHANNELS, size, size + 1, generator=generator))
        for name, size in zip(names, sizes, strict=True)
    )


def reference_without_refine(features, refine_index):
    """Gather by pooling finer / interpolating coarser levels, average, scatter back, add."""
    maps = list(features.values())
    height, width = maps[refine_index].shape[-2:]
    gathered = []
    for i, x in enumerate(maps):
        if i < refine_index:
            gathered.append(F.adaptive_max_pool2d(x, (height, width)))
        elif i > refine_index:
            gathered.append(F.interpolate(x, size=(height, width), mode="nearest"))
        else:
            gathered.append(x)
    mean = sum(gathered) / len(gathered)
    out = OrderedDict()
    for i, (name, x) in enumerate(features.items()):
        if i < refine_index:
            out[name] = x + F.interpolate(mean, size=x.shape[-2:], mode="nearest")
        elif i > refine_index:
            out[name] = x + F.adaptive_max_pool2d(mean, x.shape[-2:])
        else:
            out[name] = x + mean
    return out


@pytest.mark.parametrize("layout", [FASTER_RCNN, RETINANET], ids=["faster_rcnn", "retinanet"])
@pytest.mark.parametrize("refine_type", ["none", "conv", "non_local"])
def test_keeps_keys_order_and_shapes(layout, refine_type):
    names, sizes, refine_index = layout
    features = pyramid(names, sizes)
    bfp = BalancedFeaturePyramid(CHANNELS, len(names), refine_index, refine_type)
    out = bfp(features)
    assert list(out.keys()) == names
    for name in names:
        assert out[name].shape == features[name].shape


@pytest.mark.parametrize("layout", [FASTER_RCNN, RETINANET], ids=["faster_rcnn", "retinanet"])
def test_no_refine_is_gather_mean_scatter(layout):
    names, sizes, refine_index = layout
    features = pyramid(names, sizes, seed=1)
    out = BalancedFeaturePyramid(CHANNELS, len(names), refine_index, "none")(features)
    expected = reference_without_refine(features, refine_index)
    for name in names:
        torch.testing.assert_close(out[name], expected[name])


@pytest.mark.parametrize("refine_type", ["none", "conv", "non_local"])
def test_gradients_reach_inputs_and_upstream(refine_type):
    torch.manual_seed(0)
    names, sizes, refine_index = FASTER_RCNN
    upstream = nn.Conv2d(3, CHANNELS, 3, padding=1)
    image = torch.randn(2, 3, sizes[0], sizes[0], requires_grad=True)
    base = upstream(image)
    features = OrderedDict(
        (name, F.adaptive_avg_pool2d(base, size)) for name, size in zip(names, sizes, strict=True)
    )
    for x in features.values():
        x.retain_grad()
    bfp = BalancedFeaturePyramid(CHANNELS, len(names), refine_index, refine_type)
    if refine_type == "non_local":
        nn.init.normal_(bfp.refine.out.weight, std=0.1)  # leave the identity start
    out = bfp(features)
    sum(y.square().sum() for y in out.values()).backward()
    for x in features.values():
        assert x.grad is not None and x.grad.abs().sum() > 0
    assert upstream.weight.grad.abs().sum() > 0
    assert image.grad.abs().sum() > 0
    for parameter in bfp.parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0


def test_non_local_starts_as_identity_then_changes():
    names, sizes, refine_index = FASTER_RCNN
    features = pyramid(names, sizes, seed=2)
    none = BalancedFeaturePyramid(CHANNELS, len(names), refine_index, "none")(features)
    bfp = BalancedFeaturePyramid(CHANNELS, len(names), refine_index, "non_local")
    for name in names:
        torch.testing.assert_close(bfp(features)[name], none[name])
    nn.init.normal_(bfp.refine.out.weight, std=0.1)
    assert not torch.allclose(bfp(features)["0"], none["0"])


def test_invalid_configuration():
    with pytest.raises(ValueError, match="refine_index"):
        BalancedFeaturePyramid(CHANNELS, 5, refine_index=5, refine_type="none")
    with pytest.raises(ValueError, match="refine_index"):
        BalancedFeaturePyramid(CHANNELS, 5, refine_index=-1, refine_type="none")
    with pytest.raises(ValueError, match="refine_type"):
        BalancedFeaturePyramid(CHANNELS, 5, refine_index=2, refine_type="attention")
    names, sizes, _ = FASTER_RCNN
    with pytest.raises(ValueError, match="expected 4 feature levels, got 5"):
        BalancedFeaturePyramid(CHANNELS, 4, refine_index=2, refine_type="none")(pyramid(names, sizes))
