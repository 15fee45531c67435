"""How well detection scores rank localization quality: each detection's IoU with its best-matching
ground truth of the same class, and the score-IoU correlation (what IoU-balanced losses target)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np


def _iou_xywh(boxes: np.ndarray, gts: np.ndarray) -> np.ndarray:
    """[N, 4] x [G, 4] xywh boxes -> [N, G] IoU."""
    ax1, ay1 = boxes[:, 0:1], boxes[:, 1:2]
    ax2, ay2 = ax1 + boxes[:, 2:3], ay1 + boxes[:, 3:4]
    bx1, by1 = gts[None, :, 0], gts[None, :, 1]
    bx2, by2 = bx1 + gts[None, :, 2], by1 + gts[None, :, 3]
    inter = np.clip(np.minimum(ax2, bx2) - np.maximum(ax1, bx1), 0, None) * \
        np.clip(np.minimum(ay2, by2) - np.maximum(ay1, by1), 0, None)
    union = boxes[:, 2:3] * boxes[:, 3:4] + (gts[:, 2] * gts[:, 3])[None] - inter
    return inter / np.maximum(union, 1e-12)


def detection_ious(gt: dict[str, Any], detections: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, ious)``: for every detection its score and its largest IoU with a ground-truth box of
    the same image and category (0 where there is none). Crowd boxes are not matched."""
    by_key: dict[tuple[int, int], list[list[float]]] = defaultdict(list)
    for ann in gt["annotations"]:
        if not ann.get("iscrowd", 0):
            by_key[(ann["image_id"], ann["category_id"])].append(ann["bbox"])
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, det in enumerate(detections):
        groups[(det["image_id"], det["category_id"])].append(i)
    scores = np.array([d["score"] for d in detections], dtype=float)
    ious = np.zeros(len(detections))
    for key, index in groups.items():
        if key in by_key:
            boxes = np.array([detections[i]["bbox"] for i in index], dtype=float)
            ious[index] = _iou_xywh(boxes, np.array(by_key[key], dtype=float)).max(axis=1)
    return scores, ious


def score_iou_correlation(scores: np.ndarray, ious: np.ndarray) -> dict[str, float]:
    """Pearson and Spearman correlation of scores and IoUs (NaN with fewer than 3 detections or no spread)."""
    from scipy.stats import pearsonr, spearmanr

    if len(scores) < 3 or np.ptp(scores) == 0 or np.ptp(ious) == 0:
        return {"pearson": float("nan"), "spearman": float("nan")}
    return {"pearson": float(pearsonr(scores, ious)[0]), "spearman": float(spearmanr(scores, ious)[0])}


DETECTION_IOU_EDGES = np.linspace(0.0, 1.0, 11)
"""IoU bins (tenths) of a run's detections in :func:`iou_distributions`."""


def iou_distributions(scores: np.ndarray, ious: np.ndarray,
                      negative_iou: tuple[np.ndarray, np.ndarray] | None) -> list[tuple[str, int, float]]:
    """A run's IoU distributions as curves over IoU bins, (curve, bin's lower edge in IoU percent, value):

    * ``eval/detections_by_IoU``: share of the run's detections whose IoU (:func:`detection_ious`) is in the bin;
    * ``eval/score_by_IoU``: the mean score of those detections (bins holding any);
    * ``train/sampled_negatives_by_IoU``: share of the negatives the R-CNN sampler drew during training
      (``negative_iou``: the checkpoint's histogram, Faster R-CNN only).

    ``libra track`` logs each curve as an MLflow metric with step = IoU, so runs overlay in one chart.
    """
    counts, _ = np.histogram(ious, DETECTION_IOU_EDGES)
    score_sums, _ = np.histogram(ious, DETECTION_IOU_EDGES, weights=scores)
    lower = [round(100 * edge) for edge in DETECTION_IOU_EDGES[:-1]]
    curves = [("eval/detections_by_IoU", step, float(n / max(1, len(ious)))) for step, n in zip(lower, counts)]
    curves += [("eval/score_by_IoU", step, float(s / n)) for step, s, n in zip(lower, score_sums, counts) if n]
    if negative_iou is not None:
        edges, negatives = negative_iou
        curves += [("train/sampled_negatives_by_IoU", round(100 * float(edge)), float(n / max(1, negatives.sum())))
                   for edge, n in zip(edges[:-1], negatives)]
    return curves
