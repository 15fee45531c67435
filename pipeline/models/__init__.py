"""Detector builders: a validated config in, a torchvision detector with the components wired in out."""

from typing import Callable

from torch import nn

from pipeline.config import ExperimentConfig
from pipeline.models.faster_rcnn import build_faster_rcnn
from pipeline.models.retinanet import build_retinanet

BUILDERS: dict[str, Callable[[ExperimentConfig, int], nn.Module]] = {
    "faster_rcnn": build_faster_rcnn,
    "retinanet": build_retinanet,
}


def build_detector(cfg: ExperimentConfig, num_classes: int) -> nn.Module:
    """Build ``cfg.model.detector`` for ``num_classes`` object classes (background excluded)."""
    return BUILDERS[cfg.model.detector](cfg, num_classes)
