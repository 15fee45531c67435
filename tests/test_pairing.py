"""Paired seeds: at the same seed a variant starts from its baseline's initial weights in every tensor
they share, and building a detector leaves the global random stream that training draws from alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides
from detection.config import load_config
from detection.data import CLASSES
from detection.engine.train import train
from detection.models.detectors import build_detector
from detection.models.init_streams import stream_seed

VARIANTS = {
    "faster_rcnn": ["components.bfp.enabled=true", "components.iou_balanced_sampling.enabled=true",
                    "components.balanced_l1.enabled=true"],
    "retinanet": ["components.bfp.enabled=true", "components.balanced_l1.enabled=true",
                  "components.iou_balanced_cls.enabled=true", "components.iou_balanced_loc.enabled=true"],
}


def _initial_state(detector: str, seed: int, *overrides: str) -> dict[str, torch.Tensor]:
    cfg = load_config(Path(f"configs/{detector}_tiny.yaml"),
                      ["model.backbone.weights=null", f"train.seed={seed}", *overrides])
    return build_detector(cfg, num_classes=4).state_dict()


@pytest.mark.parametrize("detector", sorted(VARIANTS))
def test_variants_start_from_the_baselines_weights_in_every_shared_tensor(detector):
    baseline = _initial_state(detector, 0)
    everything = _initial_state(detector, 0, *VARIANTS[detector])
    for variant in [[override] for override in VARIANTS[detector]] + [VARIANTS[detector]]:
        state = everything if len(variant) > 1 else _initial_state(detector, 0, *variant)
        shared = [name for name in baseline if name in state]
        assert len(shared) == len(baseline), f"{variant} drops tensors of the baseline"
        differing = [name for name in shared if not torch.equal(baseline[name], state[name])]
        assert not differing, f"{variant}: initial weights differ from the baseline's in {differing}"
    added = set(everything) - set(baseline)
    assert any(name.startswith("backbone.neck.") for name in added), "BFP adds its own tensors"


@pytest.mark.parametrize("detector", sorted(VARIANTS))
def test_seeds_draw_other_weights_and_building_consumes_no_global_randomness(detector):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    seed0 = _initial_state(detector, 0)
    assert torch.equal(torch.get_rng_state(), before), "building drew from the global stream"
    seed1 = _initial_state(detector, 1)
    drawn = [name for name in seed0 if name.endswith(".weight") and seed0[name].std() > 0]
    assert drawn and all(not torch.equal(seed0[name], seed1[name]) for name in drawn)
    assert torch.equal(_initial_state(detector, 0)["backbone.fpn.layer_blocks.0.0.weight"],
                       seed0["backbone.fpn.layer_blocks.0.0.weight"]), "the same seed gives the same weights"


def test_stream_seeds_are_stable_distinct_and_in_range():
    assert stream_seed(0, "rpn.head") == stream_seed(0, "rpn.head")
    seeds = {stream_seed(s, n) for s in range(3) for n in ("rpn.head", "backbone.fpn", "backbone.neck", "head")}
    assert len(seeds) == 12 and all(0 <= s < 2**63 for s in seeds)


@pytest.mark.trains
def test_neutral_iou_losses_train_bit_identical_weights(synthetic_root, tmp_path):
    """IoU-cls with eta = 0 and IoU-loc with lambda = 0, w_loc = 1 change no loss term: at the same seed the
    run draws the same data order, initial weights and sampling, so it ends at the baseline's weights."""
    runs = {}
    for name, sets in {"baseline": [], "neutral": ["components.iou_balanced_cls.enabled=true",
                                                   "components.iou_balanced_cls.eta=0",
                                                   "components.iou_balanced_loc.enabled=true",
                                                   "components.iou_balanced_loc.lam=0",
                                                   "components.iou_balanced_loc.w_loc=1"]}.items():
        cfg = load_config("configs/retinanet_tiny.yaml",
                          tiny_overrides(synthetic_root, **{"train.max_steps": 3, "data.max_images": 12}) + sets)
        runs[name] = train(cfg, tmp_path / name, progress_bar=False).model.state_dict()
    baseline, neutral = runs["baseline"], runs["neutral"]
    initial = build_detector(cfg, num_classes=len(CLASSES)).state_dict()
    assert any(not torch.equal(initial[name], baseline[name]) for name in initial), "training moved the weights"
    assert set(baseline) <= set(neutral)
    assert [name for name in baseline if not torch.equal(baseline[name], neutral[name])] == []
