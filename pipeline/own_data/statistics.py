"""What a data set holds, before anything trains on it: per split the images, their sizes, the objects per
image, the classes, the box sizes in pixels and relative to the image, crowd regions and empty images; and
the warnings a user should act on before an ablation, each naming its fix.

An *object* is an annotation that is not a crowd region (the detectors train on objects only, and COCO's
evaluation ignores crowd regions). A box's *size* is ``sqrt(w · h)`` in pixels; its relative size is
``sqrt(w · h / (W · H))`` for an image of ``W x H``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from detection.config import ExperimentConfig
from detection.data import CocoSplit
from pipeline.own_data.anchors import AnchorLayout, resized_boxes
from pipeline.own_data.boxes import SplitBoxes, read_split_boxes

QUANTILES: dict[str, float] = {"min": 0.0, "p5": 0.05, "p25": 0.25, "median": 0.5, "p75": 0.75, "p95": 0.95, "max": 1.0}
"""The quantiles every distribution is summarised by (name -> probability)."""


def quantiles(values: Tensor) -> dict[str, float] | None:
    """:data:`QUANTILES` of ``values`` (linear interpolation), None for no values."""
    if not len(values):
        return None
    points = torch.quantile(values.double(), torch.tensor(list(QUANTILES.values()), dtype=torch.float64))
    return {name: round(float(value), 2) for name, value in zip(QUANTILES, points)}


@dataclass(frozen=True)
class SplitStatistics:
    """One split's statistics (see the module docstring for *object* and *size*)."""

    images: int
    image_sizes: dict[str, int]
    """``"WxH"`` -> images of that size, most frequent first."""
    objects: int
    objects_per_image: dict[str, float]
    images_with_objects: int
    empty_images: int
    """Images without any annotation (a crowd region counts as one, as in ``data.filter_empty``)."""
    crowd_regions: int
    images_with_crowd: int
    classes: dict[str, int]
    """Every category of the set -> its objects in this split."""
    box_width_px: dict[str, float] | None
    box_height_px: dict[str, float] | None
    box_size_px: dict[str, float] | None
    box_size_relative: dict[str, float] | None


def split_statistics(boxes: SplitBoxes) -> SplitStatistics:
    objects = boxes.objects
    rows = boxes.image_index[objects]
    per_image = torch.bincount(rows, minlength=len(boxes.image_sizes))
    annotated = torch.bincount(boxes.image_index, minlength=len(boxes.image_sizes)) > 0
    sizes = Counter(f"{int(w)}x{int(h)}" for w, h in boxes.image_sizes.tolist())
    w, h = boxes.boxes[objects, 2], boxes.boxes[objects, 3]
    image_area = boxes.image_sizes.prod(dim=1)[rows]
    names = boxes.split.categories
    counts = Counter(boxes.category_ids[objects].tolist())
    return SplitStatistics(
        images=len(boxes.image_sizes),
        image_sizes=dict(sizes.most_common()),
        objects=int(objects.sum()),
        objects_per_image=quantiles(per_image.double()),
        images_with_objects=int((per_image > 0).sum()),
        empty_images=int((~annotated).sum()),
        crowd_regions=int(boxes.crowd.sum()),
        images_with_crowd=len(set(boxes.image_index[boxes.crowd].tolist())),
        classes={names[category]: counts.get(category, 0) for category in sorted(names)},
        box_width_px=quantiles(w),
        box_height_px=quantiles(h),
        box_size_px=quantiles((w * h).sqrt()),
        box_size_relative=quantiles((w * h / image_area).sqrt()),
    )


@dataclass(frozen=True)
class SmallBoxes:
    """The objects of each split that are smaller than a detector's smallest anchor after resizing: their area
    is under half the anchor's, so their IoU with every anchor is under 0.5 (IoU <= box area / anchor area)."""

    smallest_anchor_px: float
    min_size: int
    max_size: int
    objects: dict[str, int]
    """Split -> its objects smaller than the smallest anchor."""


def small_boxes(config: ExperimentConfig, splits: dict[str, SplitBoxes]) -> SmallBoxes:
    layout = AnchorLayout.of(config)
    counts = {}
    for name, boxes in splits.items():
        xyxy, _ = resized_boxes(boxes, layout.min_size, layout.max_size)
        area = (xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1])
        counts[name] = int((area < layout.smallest_area / 2).sum())
    return SmallBoxes(layout.smallest_area ** 0.5, layout.min_size, layout.max_size, counts)


@dataclass(frozen=True)
class DataStatistics:
    """Both splits' statistics, the objects too small for each detector's anchors, and the warnings."""

    splits: dict[str, SplitStatistics]
    small_boxes: dict[str, SmallBoxes]
    """Detector -> its objects smaller than its smallest anchor."""
    min_val_images: int
    warnings: list[str]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        """The statistics as the terminal shows them."""
        names = list(self.splits)
        rows: list[tuple[str, list[str]]] = [
            ("images", [str(s.images) for s in self.splits.values()]),
            ("image sizes (WxH: images)", [", ".join(f"{k}: {v}" for k, v in list(s.image_sizes.items())[:3])
                                           + (", ..." if len(s.image_sizes) > 3 else "") for s in self.splits.values()]),
            ("objects (not crowd)", [str(s.objects) for s in self.splits.values()]),
            ("images with objects / empty", [f"{s.images_with_objects} / {s.empty_images}" for s in self.splits.values()]),
            ("crowd regions (images)", [f"{s.crowd_regions} ({s.images_with_crowd})" for s in self.splits.values()]),
            *((f"class {name!r}", [str(s.classes[name]) for s in self.splits.values()])
              for name in next(iter(self.splits.values())).classes),
        ]
        lines = ["  " + f"{'':34s}" + "".join(f"{name:>16s}" for name in names)]
        lines += ["  " + f"{label:34s}" + "".join(f"{value:>16s}" for value in values) for label, values in rows]
        lines.append("  quantiles: " + " ".join(QUANTILES))
        for label, field in (("objects per image", "objects_per_image"), ("box width, px", "box_width_px"),
                             ("box height, px", "box_height_px"), ("box size sqrt(w*h), px", "box_size_px"),
                             ("box size / image size", "box_size_relative")):
            for name, split in self.splits.items():
                values = getattr(split, field)
                text = " ".join(f"{v:g}" for v in values.values()) if values else "no objects"
                lines.append(f"  {label + ', ' + name:34s}{text}")
        for detector, small in self.small_boxes.items():
            counts = ", ".join(f"{n} {name}" for name, n in small.objects.items())
            lines.append(f"  {detector}: smallest anchor {small.smallest_anchor_px:g} px (model.min_size "
                         f"{small.min_size}, max_size {small.max_size}); objects smaller than it: {counts}")
        return lines


def data_statistics(train: CocoSplit, val: CocoSplit, configs: dict[str, ExperimentConfig],
                    min_val_images: int) -> DataStatistics:
    """The statistics of the validated splits and the warnings for an ablation of the detectors of ``configs``
    (detector -> its config) reported with ``report.min_val_images`` = ``min_val_images``."""
    splits = {"train": read_split_boxes(train), "val": read_split_boxes(val)}
    stats = {name: split_statistics(boxes) for name, boxes in splits.items()}
    small = {detector: small_boxes(config, splits) for detector, config in configs.items()}
    return DataStatistics(stats, small, min_val_images, warnings(stats, small, min_val_images))


def warnings(stats: dict[str, SplitStatistics], small: dict[str, SmallBoxes], min_val_images: int) -> list[str]:
    """What to fix before an ablation on this set, each with its fix."""
    found = []
    val = stats["val"]
    if val.images < min_val_images:
        found.append(f"{val.images} validation images, fewer than the {min_val_images} the report's intervals need "
                     "(report.min_val_images): every claim of the ablation would be 'not testable'; fix: move images "
                     f"into the validation split or annotate more, to at least {min_val_images}")
    elif val.images_with_objects < min_val_images:
        found.append(f"only {val.images_with_objects} of the {val.images} validation images hold an object, fewer than "
                     f"{min_val_images} (report.min_val_images): the image bootstrap's intervals rest on the images "
                     "with objects; fix: add validation images with objects")
    for name in val.classes:
        counts = {split: s.classes[name] for split, s in stats.items()}
        if not any(counts.values()):
            found.append(f"class {name!r} has no object in any split: the detectors get an output for it that "
                         "nothing trains; fix: drop it from the categories")
        elif not all(counts.values()):
            empty = [split for split, n in counts.items() if n == 0]
            found.append(f"class {name!r} has no object in {' or '.join(empty)} ({counts}): a class without training "
                         "objects is never learned, one without validation objects is not measured (COCO's AP leaves "
                         "it out); fix: move images holding it between the splits, or drop the class")
    for detector, boxes in small.items():
        if any(boxes.objects.values()):
            counts = ", ".join(f"{n} of {stats[split].objects} {split}" for split, n in boxes.objects.items())
            found.append(f"{detector}: {counts} objects are smaller than its smallest anchor "
                         f"({boxes.smallest_anchor_px:g} px; model.min_size {boxes.min_size}, max_size {boxes.max_size}): "
                         "under half its area, no anchor reaches IoU 0.5 with them; fix: fit a profile to the data "
                         "(`libra fit-profile`: input size and anchors from the data) or set model.anchor_sizes / "
                         "model.min_size")
    return found
