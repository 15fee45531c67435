"""A torch ``Dataset`` over a validated COCO-format split, in torchvision's detection format."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .validate import CocoSplit, DatasetError, load_coco_json, read_image

__all__ = ["CocoDetectionDataset", "collate_detection"]


class CocoDetectionDataset(Dataset):
    """Images and box targets of a :class:`CocoSplit`.

    Each item is ``(image, target)``: ``image`` float32 ``[3, H, W]`` in [0, 1] (grayscale and
    RGBA files are converted to RGB) and ``target`` with ``boxes`` float32 ``[n, 4]`` in absolute
    ``x1, y1, x2, y2`` clamped to the image, ``labels`` int64 ``[n]`` in ``1..num_classes``
    (categories in sorted id order; 0 is background) and ``image_id``. Crowd annotations are left
    out of the targets. An image file that cannot be read (changed since validation) raises a
    :class:`DatasetError` naming the annotation file and the image id.

    With ``train=True`` the image is flipped horizontally with probability ``hflip_prob``, decided
    by a generator seeded from ``(seed, epoch, index)``: the same image in the same epoch is
    augmented identically whatever the worker, shard or restart. Call :meth:`set_epoch` before
    each epoch (before the loader's workers are created, as with ``DistributedSampler``).

    With ``drop_empty=True`` the images of the split without any annotation (crowd ones count, as in
    mmdet's ``filter_empty_gt``) are left out; ``image_ids`` lists the images the dataset holds.

    With ``cache_mb > 0`` each image is decoded once and kept in memory as its float32 tensor, if the
    dataset's images as float32 (by the ``width``/``height`` of the annotation file) take at most
    ``cache_mb`` MiB (:attr:`cached` says whether they do): later epochs read no file. The tensors are the
    ones the uncached path gives, bit for bit (PNG/JPEG decoding is deterministic); an unflipped
    item's image *is* the cached tensor, so callers must not modify images in place (torchvision's
    detectors do not: their transform normalises into a new tensor). The cache fills as items are
    read; :meth:`preload` fills it at once (before a loader forks workers, whose own fills are lost).
    """

    def __init__(self, split: CocoSplit, train: bool = False, hflip_prob: float = 0.5, seed: int = 0,
                 drop_empty: bool = False, cache_mb: int = 0) -> None:
        if not 0.0 <= hflip_prob <= 1.0:
            raise ValueError(f"hflip_prob must be in [0, 1], got {hflip_prob}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.split = split
        self.train = train
        self.hflip_prob = hflip_prob
        self.seed = seed
        self.epoch = 0
        self.category_id_to_label = {
            category_id: label for label, category_id in enumerate(sorted(split.categories), start=1)
        }
        self.label_to_category_id = {label: cid for cid, label in self.category_id_to_label.items()}
        self.num_classes = len(self.category_id_to_label)

        coco = load_coco_json(split.annotation_file)
        images = {record["id"]: record for record in coco["images"]}
        boxes: dict[int, list[list[float]]] = defaultdict(list)
        labels: dict[int, list[int]] = defaultdict(list)
        for record in coco["annotations"]:
            if record.get("iscrowd", 0):
                continue
            x, y, w, h = record["bbox"]
            boxes[record["image_id"]].append([x, y, x + w, y + h])
            labels[record["image_id"]].append(self.category_id_to_label[record["category_id"]])
        annotated = {record["image_id"] for record in coco["annotations"]}
        self.image_ids = [i for i in split.image_ids if i in annotated or not drop_empty]
        if not self.image_ids:
            raise DatasetError(f"{split.annotation_file}: none of the {len(split.image_ids)} selected images has an "
                               "annotation, so data.filter_empty leaves nothing to train on; "
                               "set data.filter_empty: false or select annotated images")
        self._paths = [split.image_dir / images[image_id]["file_name"] for image_id in self.image_ids]
        self._boxes = [
            torch.tensor(boxes[image_id], dtype=torch.float32).reshape(-1, 4) for image_id in self.image_ids
        ]
        self._labels = [torch.tensor(labels[image_id], dtype=torch.int64) for image_id in self.image_ids]
        if cache_mb < 0:
            raise ValueError(f"cache_mb must be >= 0, got {cache_mb}")
        self.cache_bytes = decoded_bytes([images[image_id] for image_id in self.image_ids])
        self.cached = cache_mb > 0 and self.cache_bytes is not None and self.cache_bytes <= cache_mb * 2**20
        self._images: list[Tensor | None] = [None] * len(self.image_ids)

    def __len__(self) -> int:
        return len(self.image_ids)

    def _decode(self, index: int) -> Tensor:
        where = f"{self.split.annotation_file}: image id {self.image_ids[index]}"
        pixels = np.asarray(read_image(self._paths[index], where, self.split.max_image_pixels))
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div_(255.0)

    def _image(self, index: int) -> Tensor:
        if not self.cached:
            return self._decode(index)
        image = self._images[index]
        if image is None:
            image = self._images[index] = self._decode(index)
        return image

    def preload(self) -> None:
        """Decode every image not cached yet (nothing without a cache)."""
        if self.cached:
            for index in range(len(self)):
                self._image(index)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        image = self._image(index)
        height, width = image.shape[-2:]
        boxes = self._boxes[index].clone()
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0.0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0.0, height)
        if self.train and self._flips(index):
            image = image.flip(-1)
            boxes[:, 0::2] = width - boxes[:, [2, 0]]
        labels = self._labels[index].clone()
        return image, {"boxes": boxes, "labels": labels, "image_id": self.image_ids[index]}

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation of ``epoch`` (>= 0)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch

    def _flips(self, index: int) -> bool:
        state = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(2, np.uint32)
        generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        return bool(torch.rand((), generator=generator) < self.hflip_prob)


def decoded_bytes(records: list[dict[str, Any]]) -> int | None:
    """Bytes of the images of these COCO ``images`` records as float32 RGB tensors (None: a size is missing)."""
    try:
        return sum(3 * 4 * int(r["width"]) * int(r["height"]) for r in records)
    except (KeyError, TypeError, ValueError):
        return None


def collate_detection(
    batch: list[tuple[Tensor, dict[str, Any]]],
) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """Collate into lists, the input format of torchvision's detection models."""
    return [image for image, _ in batch], [target for _, target in batch]
