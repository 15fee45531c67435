"""COCO bbox evaluation: faster-coco-eval by default, pycocotools as the cross-check."""

from __future__ import annotations

import contextlib
import io
from typing import Any, Literal

import numpy as np

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
"""COCOeval's 12 summary numbers, in its order."""
BOX_METRICS = STAT_NAMES[:6]
"""The AP numbers of ``bbox``: the ones each run logs (``val/<name>``), a study maximises and the report tabulates."""
IOU_THRESHOLDS = tuple(round(float(t), 2) for t in np.linspace(0.5, 0.95, 10))
"""COCO's IoU thresholds 0.50:0.05:0.95, in the order of every array of AP per threshold."""
IOU_KEYS = tuple(f"{t:.2f}" for t in IOU_THRESHOLDS)
"""The keys of ``ap_per_iou``, ``"0.50"`` ... ``"0.95"``."""
Backend = Literal["faster_coco_eval", "pycocotools"]


def _api(backend: Backend):
    if backend == "faster_coco_eval":
        from faster_coco_eval import COCO, COCOeval_faster

        return COCO, COCOeval_faster
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval
    raise ValueError(f"unknown COCO evaluation backend {backend!r}: use faster_coco_eval or pycocotools")


def _empty_metrics() -> dict[str, Any]:
    return {
        "bbox": {k: 0.0 for k in BOX_METRICS},
        "stats": {k: 0.0 for k in STAT_NAMES},
        "ap_per_iou": {t: 0.0 for t in IOU_KEYS},
    }


def _mean_valid(x: np.ndarray) -> float:
    valid = x[x > -1]
    return float(valid.mean()) if valid.size else 0.0


def evaluate_coco(gt: dict[str, Any], detections: list[dict[str, Any]], backend: Backend = "faster_coco_eval",
                  image_ids: list[int] | None = None) -> dict[str, Any]:
    """COCO bbox metrics of ``detections`` (results format) against the ground-truth dict ``gt``.

    Returns ``{"bbox": {AP, AP50, AP75, APs, APm, APl}, "stats": {all 12}, "ap_per_iou": {"0.50": ...}}``
    as fractions in [0, 1] (COCO's -1, "no ground truth in this area range", is reported as 0).
    ``image_ids`` restricts the evaluation to those images (default: all of ``gt``).
    """
    if not detections:
        return _empty_metrics()
    coco_cls, eval_cls = _api(backend)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = coco_cls()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes([dict(d) for d in detections])  # loadRes adds keys to the dicts it gets
        evaluator = eval_cls(coco_gt, coco_dt, "bbox")
        if image_ids is not None:
            evaluator.params.imgIds = sorted(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = {name: max(0.0, float(v)) for name, v in zip(STAT_NAMES, evaluator.stats[:12])}
    precision = evaluator.eval["precision"]  # [T, R, K, A, M]; area "all", maxDets 100
    per_iou = {t: _mean_valid(precision[i, :, :, 0, -1]) for i, t in enumerate(IOU_KEYS)}
    return {"bbox": {k: stats[k] for k in BOX_METRICS}, "stats": stats, "ap_per_iou": per_iou}
