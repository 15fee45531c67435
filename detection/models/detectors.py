"""Detector builders: a validated config in, a torchvision detector with the components wired in out."""

from typing import Callable

from torch import nn

from detection.config import ExperimentConfig, ModelConfig
from detection.models.backbone import backbone_weights_fix
from detection.models.faster_rcnn import build_faster_rcnn
from detection.models.init_from import InitReport, load_detector_weights
from detection.models.retinanet import build_retinanet
from detection.models.weights import require_file

BUILDERS: dict[str, Callable[[ExperimentConfig, int], nn.Module]] = {
    "faster_rcnn": build_faster_rcnn,
    "retinanet": build_retinanet,
}
CLASS_LAYERS: dict[str, tuple[str, ...]] = {
    "faster_rcnn": ("roi_heads.box_predictor.",),
    "retinanet": ("head.classification_head.cls_logits.",),
}
"""Each detector's tensors whose shape follows the number of classes (``model.init_reset_heads``)."""
RUN_STATISTICS = ("roi_heads.sampled_negative_iou.",)
"""Buffers that record a run rather than hold weights: never taken from ``model.init_from``."""


def build_detector(cfg: ExperimentConfig, num_classes: int) -> nn.Module:
    """Build ``cfg.model.detector`` for ``num_classes`` object classes (background excluded)."""
    return BUILDERS[cfg.model.detector](cfg, num_classes)


def check_backbone_weights(cfg: ModelConfig) -> None:
    """Fails, naming ``model.backbone.weights``, if the file it names is absent (before any data is read)."""
    if cfg.backbone.weights is not None:
        require_file(cfg.backbone.weights, "model.backbone.weights", backbone_weights_fix(cfg.backbone))


def init_detector(model: nn.Module, cfg: ModelConfig) -> InitReport:
    """Load ``cfg.init_from`` into the freshly built ``model`` (see :mod:`detection.models.init_from`)."""
    return load_detector_weights(model, cfg.init_from, CLASS_LAYERS[cfg.detector], cfg.init_reset_heads,
                                 not_weights=RUN_STATISTICS)
