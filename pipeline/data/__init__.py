"""Detection data: COCO-format validation and dataset, and the built-in synthetic set."""

from .dataset import CocoDetectionDataset, collate_detection
from .synthetic import CLASSES, write_synthetic_coco
from .validate import CocoSplit, DatasetError, validate_coco

__all__ = [
    "CLASSES",
    "CocoDetectionDataset",
    "CocoSplit",
    "DatasetError",
    "collate_detection",
    "validate_coco",
    "write_synthetic_coco",
]
