"""ResNet-50 weights: never silently from scratch, read in torchvision's, mmdet's or Detectron2's names."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torchvision.models import resnet50

from conftest import libra
from detection.config import BackboneConfig, ConfigError, load_config
from detection.models.backbone import build_body

R50_CONFIG = Path("configs/faster_rcnn_r50_coco_1x.yaml")
D2_LAYER = {"bn1": "conv1.norm", "bn2": "conv2.norm", "bn3": "conv3.norm", "conv1": "conv1", "conv2": "conv2",
            "conv3": "conv3", "downsample.0": "shortcut", "downsample.1": "shortcut.norm"}


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    """A ResNet-50 state_dict of random tensors (BatchNorm's too, so that none equals a fresh init)."""
    generator = torch.Generator().manual_seed(0)
    return {k: torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
            for k, v in resnet50(weights=None).state_dict().items()}


def _detectron2_name(key: str) -> str:
    """torchvision's ResNet name -> Detectron2's (``layer1.0.bn1.weight`` -> ``res2.0.conv1.norm.weight``)."""
    if stem := re.fullmatch(r"(conv1|bn1)\.(.+)", key):
        return f"stem.conv1.{'norm.' if stem[1] == 'bn1' else ''}{stem[2]}"
    stage, block, rest = re.fullmatch(r"layer(\d)\.(\d+)\.(.+)", key).groups()
    layer, param = re.fullmatch(r"(bn\d|conv\d|downsample\.\d)\.(.+)", rest).groups()
    return f"res{int(stage) + 1}.{block}.{D2_LAYER[layer]}.{param}"


def _body(weights: Path) -> torch.nn.Module:
    return build_body(BackboneConfig(name="resnet50", weights=weights), 4)[0]


@pytest.mark.parametrize("layout", ["torchvision", "mmdet", "mmdet-detector", "detectron2", "detectron2-detector"])
def test_resnet50_weights_in_each_layout_load_every_tensor(reference, tmp_path, layout):
    plain = {k: v for k, v in reference.items() if not k.endswith("num_batches_tracked")}
    d2 = {_detectron2_name(k): v for k, v in plain.items() if not k.startswith("fc.")}
    saved = {
        "torchvision": reference,
        "mmdet": {"meta": {"epoch": 1}, "state_dict": {f"backbone.{k}": v for k, v in plain.items()}},
        "mmdet-detector": {"state_dict": {**{f"backbone.{k}": v for k, v in plain.items()},
                                          "neck.lateral_convs.0.conv.weight": torch.zeros(1)}},
        "detectron2": {"model": d2},
        "detectron2-detector": {"model": {f"backbone.bottom_up.{k}": v for k, v in d2.items()}},
    }[layout]
    torch.save(saved, tmp_path / "r50.pth")
    body = _body(tmp_path / "r50.pth")
    loaded = body.state_dict()
    assert len(loaded) == len([k for k in plain if not k.startswith("fc.")]) == 265
    for key, value in loaded.items():
        assert torch.equal(value, reference[key]), key


def test_partial_or_foreign_weights_are_refused_naming_the_keys(reference, tmp_path):
    partial = {k: v for k, v in reference.items() if not k.startswith("layer4.2.")}
    torch.save({**partial, "head.weight": torch.zeros(2)}, tmp_path / "partial.pth")
    with pytest.raises(ConfigError, match=r"partial.pth is not a ResNet-50 state_dict: missing 15 \[layer4\.2\.conv1"
                                          r"\.weight, .*, \.\.\.\]; unexpected 1 \[head\.weight\]"):
        _body(tmp_path / "partial.pth")
    torch.save({**reference, "conv1.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "shape.pth")
    with pytest.raises(ConfigError, match=r"shape mismatch 1 \[conv1\.weight \(64, 3, 3, 3\) vs \(64, 3, 7, 7\)\]"):
        _body(tmp_path / "shape.pth")


def test_a_pickle_is_refused_unread(tmp_path):
    (tmp_path / "R-50.pkl").write_bytes(b"never read")
    with pytest.raises(ConfigError, match=r"model.backbone.weights: .*R-50.pkl is a pickle, which is not loaded "
                                          r".*convert it with torch"):
        _body(tmp_path / "R-50.pkl")


def test_resnet50_needs_weights_or_an_explicit_from_scratch(tmp_path):
    with pytest.raises(ConfigError, match=r"model.backbone: .*set model.backbone.weights to a local file with "
                                          r"torchvision's resnet50 state_dict .*from_scratch: true"):
        load_config(R50_CONFIG, ["model.backbone.weights=null"])
    with pytest.raises(ConfigError, match="contradict each other"):
        load_config(R50_CONFIG, ["model.backbone.from_scratch=true"])
    scratch = load_config(R50_CONFIG, ["model.backbone.weights=null", "model.backbone.from_scratch=true"])
    assert build_body(scratch.model.backbone, 4)[1] == (256, 512, 1024, 2048)
    assert load_config(Path("configs/faster_rcnn_tiny.yaml"), ["model.backbone.weights=null"]).model.backbone.weights is None


@pytest.mark.parametrize("sets, named", [
    (["model.backbone.weights=null"], "set model.backbone.weights to a local file"),
    (["model.backbone.weights={tmp}/resnet50-0676ba61.pth"], "resnet50-0676ba61.pth does not exist; put torchvision"),
], ids=["null", "absent-file"])
def test_train_refuses_before_reading_data_or_writing_the_run(tmp_path, sets, named):
    run = tmp_path / "run"
    args = [arg for s in [*sets, f"data.root={tmp_path}/no-coco-here"] for arg in ("--set", s.format(tmp=tmp_path))]
    proc = libra("train", "--config", str(R50_CONFIG), "--out", str(run), *args, check=False)
    assert proc.returncode != 0 and "model.backbone" in proc.stderr and named in proc.stderr, proc.stderr
    assert "instances_train2017" not in proc.stderr and not run.exists()


def test_pretraining_twice_writes_the_same_bytes(tmp_path):
    """The backbone weights' file digest is part of every run key: identical reruns of `libra pretrain`
    (each in its own process, so temporary file names differ) must write identical files."""
    sets = [arg for value in ("num_train=64", "num_val=16", "epochs=1", "batch_size=32", "image_size=32")
            for arg in ("--set", value)]
    written = []
    for name in ("first", "second"):
        out = tmp_path / name / "tiny_backbone.pt"
        libra("pretrain", "--out", str(out), *sets)
        written.append(out.read_bytes())
    assert written[0] == written[1]
