"""The data splits of an experiment: validated before use, and the ground truth COCO evaluates against.

Free of Lightning, so that evaluation, reporting and data preparation start quickly.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

from detection.config import DataConfig
from detection.data import CocoSplit, DatasetError, validate_coco
from detection.data.validate import load_coco_json, with_coco_defaults


def load_splits(cfg: DataConfig) -> tuple[CocoSplit, CocoSplit]:
    """Validate the train and val splits (same categories in both) before anything trains."""
    train_ann = cfg.resolve(cfg.train_annotations)
    if cfg.source == "synthetic" and not train_ann.exists():
        raise DatasetError(f"{train_ann}: the built-in data set is not there; run `libra prepare --out {cfg.root}` first")
    train = validate_coco(train_ann, cfg.resolve(cfg.train_images), cfg.max_images,
                          max_image_pixels=cfg.max_image_pixels)
    val = validate_coco(cfg.resolve(cfg.val_annotations), cfg.resolve(cfg.val_images), cfg.max_images,
                        categories=train.categories, max_image_pixels=cfg.max_image_pixels)
    warn_about(train)
    warn_about(val)
    return train, val


def coco_subset(split: CocoSplit) -> dict[str, Any]:
    """The split's annotation file restricted to its selected images (the evaluation ground truth),
    with COCO's defaults for a missing ``area`` or ``iscrowd``."""
    gt = load_coco_json(split.annotation_file)
    keep = set(split.image_ids)
    return {
        "images": [im for im in gt["images"] if im["id"] in keep],
        "annotations": [with_coco_defaults(a) for a in gt["annotations"] if a["image_id"] in keep],
        "categories": gt["categories"],
    }


def validation_split(cfg: DataConfig) -> CocoSplit:
    """Validate only the val split (what evaluation needs; the train split is checked before training)."""
    val_ann = cfg.resolve(cfg.val_annotations)
    if cfg.source == "synthetic" and not val_ann.exists():
        raise DatasetError(f"{val_ann}: the built-in data set is not there; run `libra prepare --out {cfg.root}` first")
    val = validate_coco(val_ann, cfg.resolve(cfg.val_images), cfg.max_images, max_image_pixels=cfg.max_image_pixels)
    warn_about(val)
    return val


def warn_about(split: CocoSplit) -> None:
    """Say on stderr what validation let through but a user should know: no annotations at all, or
    annotations completed with COCO's defaults."""
    file, count = split.annotation_file, len(split.image_ids)
    if split.num_annotations == 0:
        _warn(f"{file}: no annotations in the {count} selected images: training on them teaches only "
              "background, and evaluating on them gives AP 0")
    missing = []
    if split.missing_area:
        missing.append(f"{split.missing_area} without 'area' (using bbox w*h)")
    if split.missing_iscrowd:
        missing.append(f"{split.missing_iscrowd} without 'iscrowd' (using 0)")
    if missing:
        _warn(f"{file}: of {split.num_annotations} annotations, {' and '.join(missing)}, as COCO does")


@functools.cache
def _warn(message: str) -> None:
    """Print a warning once per process (tuning, for one, validates the splits for every trial)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)
