"""The official recipe's model and data fields: neg_pos_ub, RetinaNet's P6 source, unrounded
anchors, filter_empty and gradient clipping."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image

from detection.config import ConfigError, load_config
from detection.data import CocoDetectionDataset, DatasetError, validate_coco
from detection.engine.train import build_trainer
from detection.models.detectors import build_detector
from detection.models.faster_rcnn import BoundedNegativeSampler, bounded_negatives


@pytest.mark.parametrize("neg_pos_ub, num_pos, expected", [(-1, 3, 200), (5, 3, 15), (5, 0, 5), (0, 4, 0), (100, 3, 200)])
def test_bounded_negatives(neg_pos_ub, num_pos, expected):
    assert bounded_negatives(torch.tensor([200]), torch.tensor([num_pos]), neg_pos_ub).item() == expected


@pytest.mark.parametrize("neg_pos_ub, num_pos, expected_neg", [(-1, 3, 253), (5, 3, 15), (5, 0, 5), (5, 200, 128)])
def test_rpn_sampler_counts(neg_pos_ub, num_pos, expected_neg):
    """256 anchors per image, half positives at most: mmdet's RandomSampler counts."""
    matched = torch.zeros(2000, dtype=torch.int64)
    matched[:num_pos] = 1
    matched[-300:] = -1  # ignored anchors are never sampled
    torch.manual_seed(0)
    (pos,), (neg,) = BoundedNegativeSampler(256, 0.5, neg_pos_ub)([matched])
    assert int(pos.sum()) == min(num_pos, 128)
    assert int(neg.sum()) == expected_neg
    assert bool((matched[neg.bool()] == 0).all())


def test_rcnn_sampling_bounds_negatives():
    cfg = load_config(Path("configs/faster_rcnn_tiny.yaml"),
                      ["model.backbone.weights=null", "model.roi_heads.neg_pos_ub=2"])
    heads = build_detector(cfg, num_classes=3).roi_heads
    gt = torch.tensor([[10.0, 10.0, 50.0, 50.0]])
    far = torch.tensor([[70.0, 70.0, 120.0, 120.0]]).repeat(40, 1) + torch.arange(40.0)[:, None] / 10
    torch.manual_seed(0)
    _, _, labels, _ = heads.select_training_samples([far], [{"boxes": gt, "labels": torch.tensor([1])}])
    # the GT itself is the one positive proposal, so at most 2 negatives of the 40
    assert int((labels[0] > 0).sum()) == 1
    assert int((labels[0] == 0).sum()) == 2


@pytest.mark.parametrize("channels", [(16, 32, 64, 128), (16, 32, 64, 64)])
@pytest.mark.parametrize("extra_from", ["p5", "c5"])
def test_retinanet_p6_source(extra_from, channels):
    cfg = load_config(Path("configs/retinanet_tiny.yaml"), [
        "model.backbone.weights=null", "model.retinanet.min_level=3", "model.anchor_sizes=[16,32,64,128,256]",
        f"model.backbone.channels={list(channels)}", f"model.retinanet.extra_from={extra_from}"])
    backbone = build_detector(cfg, num_classes=3).eval().backbone
    extra = backbone.fpn.extra_blocks
    assert extra.p6.in_channels == (channels[-1] if extra_from == "c5" else 64)
    seen = {}
    extra.p6.register_forward_hook(lambda module, args, out: seen.update(p6_input=args[0], p6=out))
    image = torch.rand(1, 3, 128, 128)
    features = backbone(image)
    source = backbone.body(image)["2"] if extra_from == "c5" else features["2"]
    assert torch.equal(seen["p6_input"], source)
    assert torch.equal(features["p6"], seen["p6"])
    assert [f.shape[-1] for f in features.values()] == [16, 8, 4, 2, 1]


def test_c5_extra_levels_need_min_level_3():
    with pytest.raises(ConfigError, match="extra_from: c5 needs min_level: 3"):
        load_config(Path("configs/retinanet_tiny.yaml"), ["model.retinanet.extra_from=c5"])


def test_retinanet_anchor_sizes_are_not_rounded():
    cfg = load_config(Path("configs/retinanet_tiny.yaml"), [
        "model.backbone.weights=null", "model.retinanet.min_level=3", "model.anchor_sizes=[32, 64, 128, 256, 512.5]"])
    assert cfg.model.anchor_sizes[:2] == (32, 64) and isinstance(cfg.model.anchor_sizes[0], int)
    sizes = build_detector(cfg, num_classes=3).anchor_generator.sizes
    assert sizes[0] == pytest.approx((32, 32 * 2 ** (1 / 3), 32 * 2 ** (2 / 3)))
    assert sizes[4] == pytest.approx((512.5, 512.5 * 2 ** (1 / 3), 512.5 * 2 ** (2 / 3)))


def _coco_set(root: Path, crowd_flags: list[list[int]]) -> Path:
    """One 40 px image per entry of ``crowd_flags``, with one annotation per flag (its ``iscrowd``)."""
    (root / "images").mkdir(parents=True)
    images, annotations = [], []
    for i, flags in enumerate(crowd_flags, start=1):
        Image.new("RGB", (40, 40)).save(root / "images" / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": 40, "height": 40})
        annotations += [{"id": 10 * i + k, "image_id": i, "category_id": 1, "bbox": [2, 2, 10, 10], "area": 100,
                         "iscrowd": crowd} for k, crowd in enumerate(flags)]
    ann = root / "instances.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations,
                               "categories": [{"id": 1, "name": "box"}]}))
    return ann


def test_filter_empty_drops_only_unannotated_images(tmp_path):
    split = validate_coco(_coco_set(tmp_path, [[0, 0], [], [1], []]), tmp_path / "images")
    assert CocoDetectionDataset(split, train=True).image_ids == [1, 2, 3, 4]
    kept = CocoDetectionDataset(split, train=True, drop_empty=True)
    assert kept.image_ids == [1, 3]  # image 3's one annotation is a crowd one: kept, as mmdet does
    assert [kept[i][1]["image_id"] for i in range(len(kept))] == [1, 3]
    assert kept[1][1]["boxes"].shape == (0, 4)


def test_filter_empty_with_no_annotated_image_is_a_named_error(tmp_path):
    split = validate_coco(_coco_set(tmp_path, [[], []]), tmp_path / "images")
    with pytest.raises(DatasetError, match="instances.json: none of the 2 selected images .*data.filter_empty"):
        CocoDetectionDataset(split, train=True, drop_empty=True)


class _OneWeight(L.LightningModule):
    """loss = 1000 · (w1 + w2 + w3): gradient norm 1000·√3, far above the clip."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))

    def training_step(self, batch, batch_idx):
        return 1000.0 * self.w.sum()

    def train_dataloader(self):
        return torch.utils.data.DataLoader([torch.zeros(1)], batch_size=1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


def test_grad_clip_limits_the_total_l2_norm(tmp_path):
    """train.grad_clip reaches Lightning's automatic optimisation as a total 2-norm clip (mmdet's
    clip_grad max_norm, norm_type 2): one SGD step at lr 1 moves the weights by exactly the clip."""
    cfg = load_config(Path("configs/faster_rcnn_tiny.yaml"), ["train.grad_clip=35", "train.max_steps=1"])
    module = _OneWeight()
    build_trainer(cfg, tmp_path, progress_bar=False).fit(module)
    assert module.w.detach().norm().item() == pytest.approx(35.0, rel=1e-5)
    assert torch.allclose(module.w.detach(), torch.full((3,), -35.0 / 3 ** 0.5))
