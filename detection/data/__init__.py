"""Detection data: COCO-format validation and dataset, and the built-in synthetic set."""

from .dataset import CocoDetectionDataset, collate_detection
from .synthetic import CLASSES, SHAPE_LABELS, render_shape_example, write_synthetic_coco
from .validate import CocoSplit, DatasetError, validate_coco

__all__ = [
    "CLASSES",
    "CocoDetectionDataset",
    "CocoSplit",
    "DatasetError",
    "SHAPE_LABELS",
    "collate_detection",
    "render_shape_example",
    "validate_coco",
    "write_synthetic_coco",
]
