"""The boxes of a validated COCO split, as tensors: what the statistics and the anchor fit read."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from detection.data import CocoSplit
from detection.data.validate import load_coco_json


@dataclass(frozen=True)
class SplitBoxes:
    """Every annotation of a split's selected images (crowd regions included, flagged).

    ``image_sizes`` is ``[images, 2]`` (width, height) from the annotation file, in the order of
    ``split.image_ids``; ``boxes`` is ``[n, 4]`` COCO ``x, y, w, h`` in pixels, ``image_index`` the row of
    each box's image, ``category_ids`` its category and ``crowd`` whether it is a crowd region.
    """

    split: CocoSplit
    image_sizes: Tensor
    boxes: Tensor
    image_index: Tensor
    category_ids: Tensor
    crowd: Tensor

    @property
    def objects(self) -> Tensor:
        """The rows of the boxes a detector trains and is evaluated on: every box that is not a crowd region."""
        return ~self.crowd

    def xyxy(self) -> Tensor:
        """The boxes as ``x1, y1, x2, y2``."""
        x, y, w, h = self.boxes.unbind(1)
        return torch.stack([x, y, x + w, y + h], dim=1)


def read_split_boxes(split: CocoSplit) -> SplitBoxes:
    """The annotations of ``split``'s selected images, read from its (validated) annotation file."""
    coco = load_coco_json(split.annotation_file)
    row = {image_id: index for index, image_id in enumerate(split.image_ids)}
    sizes = {record["id"]: (record["width"], record["height"]) for record in coco["images"]}
    kept = [record for record in coco["annotations"] if record["image_id"] in row]
    return SplitBoxes(
        split=split,
        image_sizes=torch.tensor([sizes[image_id] for image_id in split.image_ids], dtype=torch.float64),
        boxes=torch.tensor([record["bbox"] for record in kept], dtype=torch.float64).reshape(-1, 4),
        image_index=torch.tensor([row[record["image_id"]] for record in kept], dtype=torch.int64),
        category_ids=torch.tensor([record["category_id"] for record in kept], dtype=torch.int64),
        crowd=torch.tensor([bool(record.get("iscrowd", 0)) for record in kept], dtype=torch.bool),
    )
