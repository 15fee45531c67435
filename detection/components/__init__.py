"""Balanced-learning components: pure PyTorch, importing nothing else from ``pipeline``."""

from detection.components.bfp import BalancedFeaturePyramid, NonLocalBlock2d
from detection.components.balanced_l1 import balanced_l1_loss
from detection.components.iou_balanced import (
    IoUBalancedLocWeight,
    iou_balanced_cls_weights,
    iou_balanced_loc_weights,
)
from detection.components.sampler import InstanceBalancedPositiveSampler, IoUBalancedNegativeSampler
from detection.components.sampling import (
    CombinedSampler,
    IoUHistogram,
    RandomNegativeSampler,
    RandomPositiveSampler,
)

__all__ = [
    "BalancedFeaturePyramid",
    "NonLocalBlock2d",
    "balanced_l1_loss",
    "iou_balanced_cls_weights",
    "iou_balanced_loc_weights",
    "IoUBalancedLocWeight",
    "CombinedSampler",
    "IoUBalancedNegativeSampler",
    "InstanceBalancedPositiveSampler",
    "RandomPositiveSampler",
    "RandomNegativeSampler",
    "IoUHistogram",
]
