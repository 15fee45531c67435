"""model.init_from: a fresh run starts from a detector checkpoint (not a resumed one); heads reset on request."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torchvision.models.detection import fasterrcnn_resnet50_fpn, retinanet_resnet50_fpn

from conftest import tiny_overrides
from detection.config import ConfigError, load_config
from detection.engine.train import TrainingStopped, train
from detection.run_dir import RunDir
from detection.models.detectors import build_detector, init_detector

pytestmark = pytest.mark.trains
CONFIG = Path("configs/faster_rcnn_tiny.yaml")
PREDICTOR = ["roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.cls_score.bias",
             "roi_heads.box_predictor.bbox_pred.weight", "roi_heads.box_predictor.bbox_pred.bias"]
STATISTICS = "roi_heads.sampled_negative_iou."


class WeightsAtStart(Callback):
    """The detector's tensors when training starts, and a SIGINT to this process after step ``stop_after``."""

    def __init__(self, stop_after: int):
        self.stop_after = stop_after
        self.state: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.state = {k: v.clone() for k, v in pl_module.model.state_dict().items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.stop_after:
            os.kill(os.getpid(), signal.SIGINT)


def _model_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    return {k.removeprefix("model."): v for k, v in state.items()}


@pytest.fixture(scope="module")
def source_checkpoint(synthetic_root, tmp_path_factory) -> Path:
    """A tiny Faster R-CNN trained for 2 steps (seed 0)."""
    run = tmp_path_factory.mktemp("source")
    train(load_config(CONFIG, tiny_overrides(synthetic_root, **{"data.max_images": 8})), run, progress_bar=False)
    return run / "checkpoints" / "last.ckpt"


def test_a_fresh_run_starts_from_the_checkpoint_and_a_resumed_one_does_not_reread_it(
        synthetic_root, source_checkpoint, tmp_path):
    init = tmp_path / "init.ckpt"
    shutil.copy(source_checkpoint, init)
    # another seed: every randomly initialised tensor of the new run differs from the source unless loaded
    cfg = load_config(CONFIG, tiny_overrides(synthetic_root, **{"data.max_images": 8, "train.seed": 5,
                                                                "model.init_from": init}))
    run, capture = tmp_path / "run", WeightsAtStart(stop_after=1)
    with pytest.raises(TrainingStopped):
        train(cfg, run, progress_bar=False, callbacks=[capture])
    source = _model_state(source_checkpoint)
    assert source[STATISTICS + "counts"].sum() > 0 == capture.state[STATISTICS + "counts"].sum()
    weights = [k for k in source if not k.startswith(STATISTICS)]
    for key in weights:
        assert torch.equal(capture.state[key], source[key]), key
    report = json.loads(RunDir(run).init_report.read_text())
    assert report == {"init_from": str(init), "loaded": len(weights), "reinitialised": [], "not_in_source": [],
                      "not_used": []}
    assert load_config(run / "config.yaml").model.init_from == init

    init.write_bytes(b"gone")  # a resumed run continues from its own checkpoint, never from init_from
    assert train(cfg, run, resume=True, progress_bar=False) is not None
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert json.loads(RunDir(run).init_report.read_text()) == report


def _tiny(**sets: object):
    return load_config(CONFIG, ["model.backbone.weights=null", *(f"{k}={v}" for k, v in sets.items())])


def test_other_classes_need_the_predictor_reset_and_keep_everything_else(tmp_path):
    torch.manual_seed(1)
    source = build_detector(_tiny(), num_classes=3).state_dict()
    torch.save(source, tmp_path / "three_classes.pt")
    torch.manual_seed(2)
    target = build_detector(_tiny(), num_classes=5)
    fresh = {k: v.clone() for k, v in target.state_dict().items()}

    with pytest.raises(ConfigError, match=r"model.init_from: .*three_classes.pt: shape mismatch .*"
                                          r"roi_heads.box_predictor.cls_score.weight \(4, 256\) vs \(6, 256\).*"
                                          r"set model.init_reset_heads: true"):
        init_detector(target, _tiny(**{"model.init_from": tmp_path / "three_classes.pt"}).model)
    report = init_detector(target, _tiny(**{"model.init_from": tmp_path / "three_classes.pt",
                                            "model.init_reset_heads": "true"}).model)
    assert report.reinitialised == PREDICTOR and report.not_in_source == [] and report.not_used == []
    for key, value in target.state_dict().items():
        expected = fresh[key] if key in PREDICTOR or key.startswith(STATISTICS) else source[key]
        assert torch.equal(value, expected), key


def test_a_checkpoint_with_a_moving_average_gives_the_average_its_run_evaluated(tmp_path):
    """A checkpoint trained with train.ema_decay holds the trained detector under model. and its moving
    average under ema.; the run scored the average, so fine-tuning starts from it."""
    trained, average = (build_detector(_tiny(**{"train.seed": seed}), num_classes=3).state_dict() for seed in (1, 2))
    torch.save({"state_dict": {**{f"model.{k}": v for k, v in trained.items()},
                               **{f"ema.{k}": v for k, v in average.items()}}}, tmp_path / "ema.ckpt")
    target = build_detector(_tiny(**{"train.seed": 3}), num_classes=3)
    report = init_detector(target, _tiny(**{"model.init_from": tmp_path / "ema.ckpt"}).model)
    assert report.not_used == [] and report.not_in_source == []
    weights = [k for k in average if not k.startswith(STATISTICS)]
    assert report.loaded == sorted(weights) and any(not torch.equal(average[k], trained[k]) for k in weights)
    for key in weights:
        assert torch.equal(target.state_dict()[key], average[key]), key


def test_another_architecture_is_refused_naming_the_tensors(tmp_path):
    torch.save(build_detector(_tiny(**{"model.fpn_channels": 32}), num_classes=3).state_dict(), tmp_path / "fpn32.pt")
    with pytest.raises(ConfigError, match=r"shape mismatch \(source vs this detector\) 21 \[backbone.fpn.inner_blocks.0.0.weight \(32, 16, 1, 1\) "
                                          r"vs \(64, 16, 1, 1\), .*same architecture"):
        init_detector(build_detector(_tiny(), num_classes=3), _tiny(**{"model.init_from": tmp_path / "fpn32.pt"}).model)
    torch.save({"classifier.weight": torch.zeros(2)}, tmp_path / "classifier.pt")
    with pytest.raises(ConfigError, match=r"none of its 1 tensors matches this detector"):
        init_detector(build_detector(_tiny(), num_classes=3), _tiny(**{"model.init_from": tmp_path / "classifier.pt"}).model)


RETINANET_CLASSES = ["head.classification_head.cls_logits.weight", "head.classification_head.cls_logits.bias"]
"""torchvision's RetinaNet has a channel per label 0..K (0 never positive), ours one per class: these differ."""


@pytest.mark.parametrize("detector, torchvision_builder, sets, class_tensors", [
    ("faster_rcnn", fasterrcnn_resnet50_fpn, [], []),
    ("retinanet", retinanet_resnet50_fpn, ["model.retinanet.extra_from=p5",  # torchvision's v1: P6 from P5
                                           "model.init_reset_heads=true"], RETINANET_CLASSES),
])
def test_torchvision_detector_weights_map_onto_the_r50_detector(tmp_path, detector, torchvision_builder, sets,
                                                                class_tensors):
    torch.manual_seed(0)
    reference = torchvision_builder(weights=None, weights_backbone=None, num_classes=91).state_dict()
    torch.save(reference, tmp_path / "torchvision.pth")
    cfg = load_config(Path(f"configs/{detector}_r50_coco_1x.yaml"),
                      ["model.backbone.weights=null", "model.backbone.from_scratch=true",
                       f"model.init_from={tmp_path / 'torchvision.pth'}", *sets])
    model = build_detector(cfg, num_classes=90)
    report = init_detector(model, cfg.model)
    assert report.not_used == [] and report.not_in_source == [] and report.reinitialised == class_tensors
    state = model.state_dict()
    weights = {k: v for k, v in reference.items() if not k.endswith("num_batches_tracked") and k not in class_tensors}
    assert len(report.loaded) == len(weights) == len([k for k in state if not k.startswith(STATISTICS)
                                                      and k not in class_tensors])
    for key, value in weights.items():  # the RetinaNet body sits one level deeper here
        ours = key if key in state else key.replace("backbone.body.", "backbone.body.body.", 1)
        assert torch.equal(state[ours], value), key
