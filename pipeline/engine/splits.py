"""The data splits of an experiment: validated before use, and the ground truth COCO evaluates against.

Free of Lightning, so that evaluation, reporting and data preparation start quickly.
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.config import DataConfig
from pipeline.data import CocoSplit, DatasetError, validate_coco


def load_splits(cfg: DataConfig) -> tuple[CocoSplit, CocoSplit]:
    """Validate the train and val splits (same categories in both) before anything trains."""
    train_ann = cfg.resolve(cfg.train_annotations)
    if cfg.source == "synthetic" and not train_ann.exists():
        raise DatasetError(f"{train_ann}: the built-in data set is not there; run `libra prepare --out {cfg.root}` first")
    train = validate_coco(train_ann, cfg.resolve(cfg.train_images), cfg.max_images)
    val = validate_coco(cfg.resolve(cfg.val_annotations), cfg.resolve(cfg.val_images), cfg.max_images,
                        categories=train.categories)
    return train, val


def coco_subset(split: CocoSplit) -> dict[str, Any]:
    """The split's annotation file restricted to its selected images (the evaluation ground truth)."""
    gt = json.loads(split.annotation_file.read_text())
    keep = set(split.image_ids)
    return {
        "images": [im for im in gt["images"] if im["id"] in keep],
        "annotations": [a for a in gt["annotations"] if a["image_id"] in keep],
        "categories": gt["categories"],
    }


def validation_split(cfg: DataConfig) -> CocoSplit:
    """Validate only the val split (what evaluation needs; the train split is checked before training)."""
    val_ann = cfg.resolve(cfg.val_annotations)
    if cfg.source == "synthetic" and not val_ann.exists():
        raise DatasetError(f"{val_ann}: the built-in data set is not there; run `libra prepare --out {cfg.root}` first")
    return validate_coco(val_ann, cfg.resolve(cfg.val_images), cfg.max_images)
