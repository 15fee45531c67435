"""The anchors a detector places on a data set's images, and their best possible recall of its boxes.

Best possible recall (BPR) at threshold ``t``: the fraction of the training boxes (crowd regions left out)
that have at least one anchor with IoU >= ``t``, after the images are resized as the detector resizes
them::

    BPR(t) = |{ b : max_a IoU(b, a) >= t }| / |boxes|

with ``t`` the IoU at which the detector's assigner takes an anchor as a positive: RetinaNet's
``model.retinanet.fg_iou_thresh``; for Faster R-CNN the box head's, ``model.roi_heads.fg_iou_thresh``, which
assigns the RPN's proposals (its anchors moved by its regression). A box below ``t`` is trained only
through the assigner's low-quality match, its single best anchor. The RPN's own threshold
(:data:`RPN_POSITIVE_IOU`, 0.7) is not the test: the RPN also takes every box's best anchor as a positive,
and on the built-in set, where the tiny Faster R-CNN learns to 58 AP, only 12 % of the boxes reach 0.7
while anchors far too large for its objects reach 41 %. Ultralytics' AutoAnchor reports the same fraction
with a width/height-ratio test in place of the IoU.

The anchors are torchvision's (``AnchorGenerator``) as the detectors of :mod:`detection.models` build them:
an image of ``w x h`` is scaled by ``min(min_size / short side, max_size / long side)`` to
``floor(w·scale) x floor(h·scale)`` and padded to a multiple of 32; pyramid level ``P_k`` has
``ceil(padded / 2^k)`` cells per side at stride ``padded // cells``, each cell's anchors centred on its
top-left corner. Exact, without enumerating the anchors: along each axis the overlap of two intervals of
fixed lengths only shrinks as their centres move apart, so of the anchors of one shape on one level the
best for a box is the one centred on the grid point nearest the box's centre.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.models.detection import FasterRCNN

from detection.config import ExperimentConfig
from pipeline.own_data.boxes import SplitBoxes

SIZE_DIVISIBLE = 32
"""torchvision's detectors pad every batch to a multiple of this (``GeneralizedRCNNTransform``)."""
FASTER_RCNN_FIRST_LEVEL = 2
"""Faster R-CNN's pyramid is P2-P6 (``detection.models.backbone.faster_rcnn_backbone``)."""
RPN_POSITIVE_IOU: float = inspect.signature(FasterRCNN.__init__).parameters["rpn_fg_iou_thresh"].default
"""The RPN's positive IoU: torchvision's default, which ``detection.models.faster_rcnn`` keeps (reported, not
tested: see the module docstring)."""


@dataclass(frozen=True)
class AnchorLayout:
    """A detector's anchors: per pyramid level ``k`` (stride ``2^k``) the anchor sizes, every size at every
    aspect ratio (height / width), and the IoU its best possible recall is measured at (module docstring)."""

    detector: str
    min_size: int
    max_size: int
    levels: tuple[int, ...]
    sizes: tuple[tuple[float, ...], ...]
    aspect_ratios: tuple[float, ...]
    positive_iou: float
    positive_iou_source: str

    @classmethod
    def of(cls, cfg: ExperimentConfig) -> AnchorLayout:
        """The layout ``cfg``'s detector builds (:mod:`detection.models.faster_rcnn`, :mod:`~.retinanet`)."""
        m = cfg.model
        if m.detector == "faster_rcnn":
            first, sizes = FASTER_RCNN_FIRST_LEVEL, tuple((float(s),) for s in m.anchor_sizes)
            threshold, source = m.roi_heads.fg_iou_thresh, "model.roi_heads.fg_iou_thresh, the box head's"
        else:
            n = m.retinanet.scales_per_octave
            first, sizes = m.retinanet.min_level, tuple(tuple(s * 2 ** (i / n) for i in range(n)) for s in m.anchor_sizes)
            threshold, source = m.retinanet.fg_iou_thresh, "model.retinanet.fg_iou_thresh"
        return cls(m.detector, m.min_size, m.max_size, tuple(range(first, first + len(sizes))), sizes,
                   tuple(m.aspect_ratios), threshold, source)

    @property
    def smallest_area(self) -> float:
        """The area of the smallest anchor (an anchor of size ``s`` covers ``s²`` at every aspect ratio)."""
        return min(min(level) for level in self.sizes) ** 2


def resize_scales(image_sizes: Tensor, min_size: int, max_size: int) -> Tensor:
    """Per image (rows ``width, height``), the factor the detector resizes it by."""
    short, long = image_sizes.min(dim=1).values, image_sizes.max(dim=1).values
    return torch.minimum(min_size / short, max_size / long)


def resized_boxes(boxes: SplitBoxes, min_size: int, max_size: int) -> tuple[Tensor, Tensor]:
    """The objects' boxes (``x1, y1, x2, y2``, float32, clamped to their image as the dataset clamps them)
    after resizing, and the resized size (``width, height``) of the image of each."""
    sizes = boxes.image_sizes
    resized = torch.floor(sizes * resize_scales(sizes, min_size, max_size)[:, None])
    rows = boxes.image_index[boxes.objects]
    xyxy = boxes.xyxy()[boxes.objects]
    xyxy = torch.minimum(xyxy.clamp(min=0), sizes[rows].repeat(1, 2))
    ratios = (resized.float() / sizes.float())[rows]
    return xyxy.float() * ratios.repeat(1, 2), resized.float()[rows]


def anchor_half_extents(sizes: tuple[float, ...], aspect_ratios: tuple[float, ...]) -> tuple[Tensor, Tensor]:
    """The rounded offsets of one cell's anchors from its centre, ``[shapes, 2]`` left/top and right/bottom,
    computed as torchvision's ``AnchorGenerator.generate_anchors`` computes them (float32, rounded)."""
    scales = torch.as_tensor(sizes, dtype=torch.float32)
    h_ratios = torch.sqrt(torch.as_tensor(aspect_ratios, dtype=torch.float32))
    widths = ((1 / h_ratios)[:, None] * scales[None, :]).reshape(-1)
    heights = (h_ratios[:, None] * scales[None, :]).reshape(-1)
    low = torch.stack([-widths, -heights], dim=1) / 2
    high = torch.stack([widths, heights], dim=1) / 2
    return low.round(), high.round()


def paired_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of ``a[..., i]`` with ``b[..., i]`` (``x1, y1, x2, y2``, broadcast), not every pair."""
    overlap = (torch.minimum(a[..., 2:], b[..., 2:]) - torch.maximum(a[..., :2], b[..., :2])).clamp(min=0)
    intersection = overlap[..., 0] * overlap[..., 1]
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return intersection / (area_a + area_b - intersection)


def best_anchor_iou(layout: AnchorLayout, boxes: SplitBoxes) -> Tensor:
    """Per object (crowd regions left out), the largest IoU any anchor of ``layout`` reaches with its box."""
    xyxy, image_sizes = resized_boxes(boxes, layout.min_size, layout.max_size)
    padded = torch.ceil(image_sizes / SIZE_DIVISIBLE) * SIZE_DIVISIBLE
    centres = (xyxy[:, :2] + xyxy[:, 2:]) / 2
    best = torch.zeros(len(xyxy))
    for level, sizes in zip(layout.levels, layout.sizes):
        cells = torch.ceil(padded / 2**level)
        stride = torch.div(padded, cells, rounding_mode="floor")
        nearest = torch.minimum(torch.round(centres / stride), cells - 1) * stride
        low, high = anchor_half_extents(sizes, layout.aspect_ratios)
        anchors = torch.cat([nearest[:, None, :] + low[None], nearest[:, None, :] + high[None]], dim=2)
        best = torch.maximum(best, paired_iou(xyxy[:, None, :], anchors).max(dim=1).values)
    return best


def best_possible_recall(layout: AnchorLayout, boxes: SplitBoxes, iou: float | None = None) -> float:
    """BPR at ``iou`` (default: the layout's ``positive_iou``; see the module docstring); NaN for no objects."""
    best = best_anchor_iou(layout, boxes)
    threshold = layout.positive_iou if iou is None else iou
    return float((best >= threshold).float().mean()) if len(best) else math.nan
