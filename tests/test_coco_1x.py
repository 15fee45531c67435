"""The official r50 coco_1x recipes run as they are: 2 optimizer steps at 1333x800 on CPU, then
evaluation. Only trainer, data and batch settings are overridden; the model is the config's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import resnet50

from detection.config import load_config
from detection.engine.coco_eval import IOU_KEYS
from detection.engine.evaluate import evaluate_run
from detection.engine.train import train

pytestmark = pytest.mark.trains

# 640x384 images are resized to 1333x800 (the short side to 800), the recipes' input size.
WIDTH, HEIGHT = 640, 384


def _write_split(root: Path, name: str, objects_per_image: list[int], rng: np.random.Generator) -> None:
    """A COCO split of noise images, each with ``n`` filled rectangles (its annotations)."""
    (root / name).mkdir(parents=True)
    images, annotations = [], []
    for image_id, count in enumerate(objects_per_image, start=1):
        pixels = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
        for k in range(count):
            w, h = (int(v) for v in rng.integers(40, 200, 2))
            x, y = int(rng.integers(0, WIDTH - w)), int(rng.integers(0, HEIGHT - h))
            pixels[y:y + h, x:x + w] = rng.integers(0, 256, 3, dtype=np.uint8)
            annotations.append({"id": 100 * image_id + k, "image_id": image_id, "category_id": 1 + k % 2,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
        Image.fromarray(pixels).save(root / name / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": WIDTH, "height": HEIGHT})
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / f"instances_{name}.json").write_text(json.dumps(
        {"images": images, "annotations": annotations,
         "categories": [{"id": 1, "name": "square"}, {"id": 2, "name": "slab"}]}))


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    """2 annotated training images and an empty one (left out by the recipes' filter_empty), 1 val image."""
    root = tmp_path_factory.mktemp("coco")
    rng = np.random.default_rng(0)
    _write_split(root, "train", [3, 0, 2], rng)
    _write_split(root, "val", [2], rng)
    return root


@pytest.fixture(scope="module")
def resnet50_weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "resnet50.pth"
    torch.manual_seed(0)
    torch.save(resnet50(weights=None).state_dict(), path)
    return path


# fast: test_recipe_parity checks both recipes against mmdet's, test_init_from builds the R50 detectors
@pytest.mark.slow
@pytest.mark.parametrize("config", ["faster_rcnn_r50_coco_1x", "retinanet_r50_coco_1x"])
def test_coco_1x_recipe_trains_two_steps_and_evaluates(config, coco_root, resnet50_weights, tmp_path):
    cfg = load_config(Path(f"configs/{config}.yaml"), [
        f"data.root={coco_root}", "data.train_annotations=annotations/instances_train.json",
        "data.val_annotations=annotations/instances_val.json", "data.train_images=train", "data.val_images=val",
        "data.num_workers=0", f"model.backbone.weights={resnet50_weights}",
        "trainer.accelerator=cpu", "trainer.devices=1", "trainer.strategy=auto", "trainer.precision=32-true",
        "train.batch_size=1", "train.epochs=1", "train.milestones=[]", "train.max_steps=2",
        "train.val_every_n_epochs=2", "train.log_every_n_steps=1", "eval.batch_size=1",
    ])
    assert (cfg.model.min_size, cfg.model.max_size) == (800, 1333) and cfg.data.filter_empty
    run = tmp_path / "run"
    module = train(cfg, run, progress_bar=False)
    assert module.global_step == 2  # the empty training image was left out: 2 images, 2 steps of 1
    log = (run / "metrics.csv").read_text().splitlines()
    losses = [float(v) for row in log[1:] for k, v in zip(log[0].split(","), row.split(","))
              if k == "train/loss_step" and v]
    assert len(losses) == 2 and all(np.isfinite(losses)) and all(0 < v < 100 for v in losses)

    metrics = evaluate_run(run)
    assert json.loads((run / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert set(metrics["bbox"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert set(metrics["ap_per_iou"]) == set(IOU_KEYS) and len(metrics["stats"]) == 12
    values = [*metrics["bbox"].values(), *metrics["ap_per_iou"].values(), *metrics["stats"].values()]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert metrics["num_images"] == 1
    assert 0 <= metrics["num_detections"] <= cfg.model.detections_per_img
