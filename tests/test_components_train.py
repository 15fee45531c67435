"""Each component trains end to end in the tiny profile: a few real steps through Lightning."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import nn

from conftest import tiny_overrides
from detection.components import BalancedFeaturePyramid
from detection.config import load_config
from detection.engine.train import train
from detection.models.detectors import build_detector

pytestmark = pytest.mark.trains

CASES = {
    "IS": ("faster_rcnn", ["components.iou_balanced_sampling.enabled=true",
                           "components.iou_balanced_sampling.instance_balanced_pos=true"]),
    "BFP-faster_rcnn": ("faster_rcnn", ["components.bfp.enabled=true"]),
    "BL-faster_rcnn": ("faster_rcnn", ["components.balanced_l1.enabled=true"]),
    "BFP-retinanet": ("retinanet", ["components.bfp.enabled=true", "components.bfp.refine_type=conv"]),
    "BL-retinanet": ("retinanet", ["components.balanced_l1.enabled=true"]),
    "IoU-cls": ("retinanet", ["components.iou_balanced_cls.enabled=true"]),
    "IoU-loc": ("retinanet", ["components.iou_balanced_loc.enabled=true"]),
}


def _config(detector: str, sets: list[str], root):
    return load_config(f"configs/{detector}_tiny.yaml",
                       tiny_overrides(root, **{"train.max_steps": 3, "data.max_images": 12}) + sets)


def _train(detector: str, sets: list[str], root, out) -> nn.Module:
    return train(_config(detector, sets, root), out, progress_bar=False).model


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_component_trains(case, synthetic_root, tmp_path):
    detector, sets = CASES[case]
    model = _train(detector, sets, synthetic_root, tmp_path / case)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    log = (tmp_path / case / "metrics.csv").read_text().splitlines()
    assert len(log) > 3 and (tmp_path / case / "checkpoints" / "last.ckpt").exists()
    if case.startswith("BFP"):
        assert isinstance(model.backbone.neck, BalancedFeaturePyramid)
        cfg = _config(detector, sets, synthetic_root)
        L.seed_everything(cfg.train.seed, verbose=False)
        initial = build_detector(cfg, 4).backbone.neck.state_dict()
        trained = model.backbone.neck.state_dict()
        assert any(not torch.equal(initial[k], trained[k]) for k in initial), "the BFP's weights were trained"
    if case == "IS":
        hist = model.roi_heads.sampled_negative_iou
        assert hist.counts.sum() > 0, "the sampler recorded the IoUs of the negatives it sampled"
    if case == "IoU-loc":
        w_loc = float(model.head.loc_weight.w_loc)
        assert math.isfinite(w_loc) and w_loc > 0, "w_loc: auto is fixed at the first step"
        state = torch.load(tmp_path / case / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert float(state["state_dict"]["model.head.loc_weight.w_loc"]) == w_loc, "and kept in the checkpoint"


def test_balanced_sampling_moves_negatives_to_higher_iou(synthetic_root, tmp_path):
    """Random sampling draws mostly IoU≈0 negatives; IoU-balanced sampling draws more hard ones."""
    random = _train("faster_rcnn", [], synthetic_root, tmp_path / "random").roi_heads.sampled_negative_iou
    balanced = _train("faster_rcnn", CASES["IS"][1], synthetic_root, tmp_path / "balanced").roi_heads.sampled_negative_iou

    def hard_share(hist) -> float:
        centres = (hist.edges[:-1] + hist.edges[1:]) / 2
        return float(hist.counts[centres >= 0.1].sum() / hist.counts.sum())

    assert hard_share(balanced) > hard_share(random) + 0.05
