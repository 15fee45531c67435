"""Balanced-learning components: pure PyTorch, importing nothing else from ``pipeline``."""

from pipeline.components.bfp import BalancedFeaturePyramid, NonLocalBlock2d
from pipeline.components.balanced_l1 import balanced_l1_loss
from pipeline.components.iou_balanced import (
    IoUBalancedLocWeight,
    iou_balanced_cls_weights,
    iou_balanced_loc_weights,
)
from pipeline.components.sampler import InstanceBalancedPositiveSampler, IoUBalancedNegativeSampler
from pipeline.components.sampling import (
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
