"""Detector builders: pyramids per detector, and backbone weights only from a local file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.models import resnet50

from detection.config import ConfigError, load_config
from detection.models.detectors import build_detector


@pytest.mark.parametrize("detector, overrides, levels, sides", [
    ("faster_rcnn", [], ["0", "1", "2", "3", "pool"], [32, 16, 8, 4, 2]),
    ("retinanet", [], ["0", "1", "2", "3", "pool"], [32, 16, 8, 4, 2]),
    ("retinanet", ["model.retinanet.min_level=3", "model.anchor_sizes=[16,32,64,128,256]"],
     ["0", "1", "2", "p6", "p7"], [16, 8, 4, 2, 1]),
])
def test_tiny_pyramids(detector, overrides, levels, sides):
    cfg = load_config(Path(f"configs/{detector}_tiny.yaml"), ["model.backbone.weights=null", *overrides])
    features = build_detector(cfg, num_classes=4).eval().backbone(torch.rand(1, 3, 128, 128))
    assert list(features) == levels
    assert [f.shape[-1] for f in features.values()] == sides


FROM_SCRATCH = ["model.backbone.weights=null", "model.backbone.from_scratch=true"]
"""The r50 configs without their ImageNet file; the tiny ones without their pre-trained weights."""


@pytest.mark.parametrize("detector", ["faster_rcnn", "retinanet"])
@pytest.mark.parametrize("profile", ["tiny", "r50_coco_1x"])
def test_bfp_gathers_at_p4_on_every_profile(detector, profile):
    """The default refine_level is P4 on both pyramids (P2-P6, P3-P7): the refined map has P4's size."""
    weights = ["model.backbone.weights=null"] if profile == "tiny" else FROM_SCRATCH
    cfg = load_config(Path(f"configs/{detector}_{profile}.yaml"), [*weights, "components.bfp.enabled=true"])
    assert cfg.components.bfp.refine_level == 4
    backbone = build_detector(cfg, num_classes=4).eval().backbone
    gathered = []
    backbone.neck.refine.register_forward_hook(lambda module, inputs, output: gathered.append(inputs[0].shape[-2:]))
    with torch.no_grad():
        backbone(torch.rand(1, 3, 128, 128))
    assert gathered == [torch.Size([128 // 16, 128 // 16])]


@pytest.mark.parametrize("config, level, levels", [
    ("retinanet_tiny", 7, "P2-P6"), ("retinanet_r50_coco_1x", 2, "P3-P7"), ("faster_rcnn_tiny", 7, "P2-P6"),
])
def test_a_bfp_level_the_pyramid_lacks_names_the_field_and_the_levels(config, level, levels):
    cfg = load_config(Path(f"configs/{config}.yaml"),
                      [*FROM_SCRATCH, "components.bfp.enabled=true", f"components.bfp.refine_level={level}"])
    with pytest.raises(ConfigError, match=f"components.bfp.refine_level={level}: .* no P{level}; its levels are {levels}"):
        build_detector(cfg, num_classes=4)


def test_missing_backbone_weights_is_a_clear_error_not_a_download(tmp_path):
    cfg = load_config(Path("configs/faster_rcnn_r50_coco_1x.yaml"),
                      [f"model.backbone.weights={tmp_path / 'resnet50.pth'}"])
    with pytest.raises(ConfigError, match="model.backbone.weights: .*resnet50.pth does not exist"):
        build_detector(cfg, num_classes=80)


def test_backbone_weights_load_from_a_local_file(tmp_path):
    reference = resnet50(weights=None)
    torch.save(reference.state_dict(), tmp_path / "resnet50.pth")
    cfg = load_config(Path("configs/retinanet_r50_coco_1x.yaml"), [f"model.backbone.weights={tmp_path / 'resnet50.pth'}"])
    model = build_detector(cfg, num_classes=80)
    loaded = model.backbone.body.body.layer2[0].conv1.weight
    assert torch.equal(loaded, reference.layer2[0].conv1.weight)
    torch.save({"not": torch.zeros(1)}, tmp_path / "other.pth")
    bad = load_config(Path("configs/retinanet_r50_coco_1x.yaml"), [f"model.backbone.weights={tmp_path / 'other.pth'}"])
    with pytest.raises(ConfigError, match="not a ResNet-50 state_dict"):
        build_detector(bad, num_classes=80)


@pytest.mark.parametrize("head_init, tower_std", [("normal", 0.01), ("kaiming", (2 / (64 * 9)) ** 0.5)])
def test_retinanet_subnet_init(head_init, tower_std):
    torch.manual_seed(0)
    cfg = load_config(Path("configs/retinanet_tiny.yaml"),
                      ["model.backbone.weights=null", f"model.retinanet.head_init={head_init}"])
    head = build_detector(cfg, num_classes=4).head
    for subnet in (head.classification_head, head.regression_head):
        towers = [m.weight for m in subnet.conv.modules() if isinstance(m, torch.nn.Conv2d)]
        assert len(towers) == cfg.model.retinanet.head_convs
        for weight in towers:  # 36 864 draws: the sample std is within 2 % of the target
            assert weight.std().item() == pytest.approx(tower_std, rel=0.02)
    predictor = head.classification_head.cls_logits
    assert predictor.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert torch.allclose(predictor.bias, torch.tensor(-torch.log(torch.tensor(99.0)).item()))


def test_the_private_torchvision_helpers_behave_as_relied_on():
    """detection/models/torchvision_internals.py re-exports private torchvision names; this fails on
    an upgrade that changes what the detectors rely on."""
    from collections import OrderedDict

    from detection.models.torchvision_internals import BoxCoder, IntermediateLayerGetter, Matcher

    coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
    anchors = torch.tensor([[10.0, 10.0, 30.0, 50.0], [0.0, 0.0, 8.0, 8.0]])
    boxes = torch.tensor([[12.0, 8.0, 34.0, 44.0], [1.0, 2.0, 9.0, 7.0]])
    torch.testing.assert_close(coder.decode_single(coder.encode_single(boxes, anchors), anchors), boxes)
    assert (Matcher.BELOW_LOW_THRESHOLD, Matcher.BETWEEN_THRESHOLDS) == (-1, -2)
    net = torch.nn.Sequential(OrderedDict(a=torch.nn.Conv2d(3, 4, 3), b=torch.nn.Conv2d(4, 5, 3)))
    out = IntermediateLayerGetter(net, {"a": "0", "b": "1"})(torch.rand(1, 3, 9, 9))
    assert list(out) == ["0", "1"] and out["1"].shape == (1, 5, 5, 5)


def test_tiny_backbone_loads_the_pretrained_weights(tiny_weights, tmp_path):
    state = torch.load(tiny_weights, weights_only=True)
    cfg = load_config(Path("configs/retinanet_tiny.yaml"), [f"model.backbone.weights={tiny_weights}"])
    body = build_detector(cfg, num_classes=4).backbone.body
    assert torch.equal(body.stages[3][0][0].weight, state["stages.3.0.0.weight"])

    missing = load_config(Path("configs/faster_rcnn_tiny.yaml"), [f"model.backbone.weights={tmp_path / 'none.pt'}"])
    with pytest.raises(ConfigError, match=r"none.pt does not exist; create it .*libra pretrain"):
        build_detector(missing, num_classes=4)
    wider = load_config(Path("configs/faster_rcnn_tiny.yaml"),
                        [f"model.backbone.weights={tiny_weights}", "model.backbone.channels=[16,32,64,256]"])
    with pytest.raises(ConfigError, match=r"not a tiny backbone .* state_dict: shape mismatch 6 \[stages.3"):
        build_detector(wider, num_classes=4)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    junk = load_config(Path("configs/faster_rcnn_tiny.yaml"), [f"model.backbone.weights={tmp_path / 'junk.pt'}"])
    with pytest.raises(ConfigError, match="junk.pt is not a loadable state_dict"):
        build_detector(junk, num_classes=4)
