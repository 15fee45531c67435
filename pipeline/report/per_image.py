"""COCO AP of a weighted multiset of images, from one per-image COCO matching.

COCO's evaluation has two steps: ``evaluateImg`` matches the detections of each (image, category)
to its ground truth greedily by score at each IoU threshold, and ``accumulate`` pools the matches
of all images into precision/recall curves. Only the second step depends on which images are
evaluated, so :func:`match_images` runs the first one once (pycocotools, area "all", 100
detections per image) and :func:`average_precision` recomputes the second for any image weights:
an image drawn ``w`` times by a bootstrap resample counts ``w`` times, exactly as if its detections
and ground truth were duplicated under new image ids (up to the order of detections with equal
scores, which COCO breaks by image order). With all weights 1 the result equals COCOeval's AP.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from detection.engine.coco_eval import IOU_THRESHOLDS

RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)
MAX_DETECTIONS = 100
_EPS = np.spacing(1)


@dataclass(frozen=True)
class CategoryMatches:
    """The matched detections of one category, in COCO's pooled order (score descending, stable)."""

    image_index: np.ndarray
    """[D] index of each detection's image in :attr:`ImageMatches.image_ids`."""
    tp: np.ndarray
    """[T, D] bool: matched to a ground truth at IoU threshold t (and not ignored)."""
    fp: np.ndarray
    """[T, D] bool: unmatched and not ignored."""
    gt_count: np.ndarray
    """[I] int: ground truths of the category per image that are not ignored (not crowd)."""


@dataclass(frozen=True)
class ImageMatches:
    image_ids: list[int]
    categories: list[CategoryMatches]

    @property
    def num_images(self) -> int:
        return len(self.image_ids)


# The matching is redone here, with pycocotools, rather than taken from the run's evaluation, because
# faster-coco-eval (1.8) does not give it out: COCOeval_faster keeps its per-image results in C++
# (``evalImgs`` stays empty; with ``separate_eval`` its ``_evalImgs_cpp`` is a list of ImageEvaluation
# objects without readable fields) and ``eval["matched"]`` holds only the detection-ground truth pairs
# of one threshold, with neither the matches at the other nine thresholds nor the ignore flags. The
# weighted AP needs per image and category, at every threshold, dtMatches and dtIgnore, and gtIgnore.
# For the evaluation to write them, every run (tuning trials included) would have to run pycocotools'
# evaluateImg, which is this same second matching, and keep a file of about 3 MB per 1000 images x 100
# detections; here it takes about 1.5 s per such run, and only for the runs a report reads.
def match_images(gt: dict[str, Any], detections: list[dict[str, Any]]) -> ImageMatches:
    """Per-image COCO bbox matching of ``detections`` (results format) on every image of ``gt``."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    image_ids = sorted(im["id"] for im in gt["images"])
    category_ids = sorted(c["id"] for c in gt["categories"])
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes([dict(d) for d in detections]) if detections else COCO()
        if not detections:
            coco_dt.dataset = {"images": gt["images"], "annotations": [], "categories": gt["categories"]}
            coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        params = evaluator.params
        params.imgIds, params.catIds = image_ids, category_ids
        params.areaRng, params.areaRngLbl, params.maxDets = [[0, 1e10]], ["all"], [MAX_DETECTIONS]
        evaluator.evaluate()
    num_images, thresholds = len(image_ids), len(params.iouThrs)
    categories = []
    for k in range(len(category_ids)):
        per_image = evaluator.evalImgs[k * num_images:(k + 1) * num_images]
        index, scores, matched, ignored = [], [], [], []
        gt_count = np.zeros(num_images, dtype=np.int64)
        for i, e in enumerate(per_image):
            if e is None:
                continue
            index.append(np.full(len(e["dtScores"]), i))
            scores.append(np.asarray(e["dtScores"], dtype=float))
            count = len(e["dtScores"])
            matched.append(np.asarray(e["dtMatches"]).reshape(thresholds, count) > 0)
            ignored.append(np.asarray(e["dtIgnore"]).reshape(thresholds, count).astype(bool))
            gt_count[i] = int(np.count_nonzero(np.asarray(e["gtIgnore"]) == 0))
        if index:
            order = np.argsort(-np.concatenate(scores), kind="mergesort")
            image_index = np.concatenate(index)[order]
            matched_all = np.concatenate(matched, axis=1)[:, order]
            ignored_all = np.concatenate(ignored, axis=1)[:, order]
        else:
            image_index = np.zeros(0, dtype=np.int64)
            matched_all = ignored_all = np.zeros((thresholds, 0), dtype=bool)
        categories.append(CategoryMatches(image_index, matched_all & ~ignored_all, ~matched_all & ~ignored_all, gt_count))
    return ImageMatches(image_ids, categories)


def _first_at_least(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """For rows of non-decreasing ``values`` [N, D]: index of the first entry >= each threshold [N, Q]
    (D if none), i.e. ``np.searchsorted(row, thresholds, side="left")`` for every row at once.

    Rows are separated by adding 2·row (values lie in [0, 1]) so that one search covers all rows;
    the offset can only round a value just below a threshold up to it, never the reverse, so the
    few such places are found and searched again row by row, which keeps the result exact.
    """
    rows, width = values.shape
    offset = 2.0 * np.arange(rows)[:, None]
    flat = np.searchsorted((values + offset).ravel(), (thresholds[None, :] + offset).ravel(), side="left")
    index = flat.reshape(rows, -1) - width * np.arange(rows)[:, None]
    found = np.take_along_axis(values, np.minimum(index, width - 1), axis=1)
    wrong = (index < width) & (found < thresholds[None, :])
    for row, q in zip(*np.nonzero(wrong)):
        index[row, q] = np.searchsorted(values[row], thresholds[q], side="left")
    return index


def _category_precision(cat: CategoryMatches, weights: np.ndarray) -> np.ndarray:
    """Mean interpolated precision over the 101 recall points, [R, T], for image weights [R, I].

    Only true positives are visited: recall first reaches a recall point at a true positive, and the
    interpolated precision (the best precision at that recall or beyond) is attained at one, since a
    false positive's precision is below that of the true positive before it. Per threshold that is a
    cumulative sum over its true positives and a lookup of the counted detections before each.
    """
    resamples, thresholds = weights.shape[0], cat.tp.shape[0]
    out = np.zeros((resamples, thresholds))
    if not cat.tp.any():
        return out
    # detections after the last true positive (at the loosest threshold) change no interpolated precision
    last = int(np.nonzero(cat.tp.any(axis=0))[0][-1]) + 1
    tp_flags, counted = cat.tp[:, :last], (cat.tp | cat.fp)[:, :last]
    w = weights[:, cat.image_index[:last]].astype(float)
    shared = (counted == counted[:1]).all()  # no ignored detections: one count of the detections for all t
    seen = np.cumsum(w * counted[0], axis=1) if shared else None
    num_gt = np.maximum((weights @ cat.gt_count).astype(float), 1.0)[:, None]
    for t in range(thresholds):
        positions = np.flatnonzero(tp_flags[t])
        if not positions.size:
            continue
        tp = np.cumsum(w[:, positions], axis=1)
        detections = (seen if shared else np.cumsum(w * counted[t], axis=1))[:, positions]
        precision = np.maximum.accumulate((tp / (detections + _EPS))[:, ::-1], axis=1)[:, ::-1]
        index = _first_at_least(tp / num_gt, RECALL_THRESHOLDS)
        picked = np.take_along_axis(precision, np.minimum(index, positions.size - 1), axis=1)
        picked[index >= positions.size] = 0.0
        out[:, t] = picked.mean(axis=1)
    return out


def average_precision(matches: ImageMatches, weights: np.ndarray | None = None, chunk: int = 50) -> np.ndarray:
    """COCO AP per IoU threshold, [R, T], of the image multisets given by ``weights`` [R, I]
    (non-negative integer counts; ``None``: every image once, R = 1).

    Categories without ground truth in a multiset are left out of its mean, as COCO does; a
    multiset without any ground truth gets NaN. ``AP = result.mean(axis=1)``; AP50 is column 0
    and AP75 column 5.
    """
    if weights is None:
        weights = np.ones((1, matches.num_images), dtype=np.int64)
    weights = np.asarray(weights)
    if weights.ndim != 2 or weights.shape[1] != matches.num_images:
        raise ValueError(f"weights must have shape [R, {matches.num_images}], got {weights.shape}")
    out = np.empty((weights.shape[0], len(IOU_THRESHOLDS)))
    for start in range(0, weights.shape[0], chunk):
        w = weights[start:start + chunk]
        total = np.zeros((w.shape[0], len(IOU_THRESHOLDS)))
        valid = np.zeros(w.shape[0])
        for cat in matches.categories:
            has_gt = (w @ cat.gt_count) > 0
            if not has_gt.any():
                continue
            total += np.where(has_gt[:, None], _category_precision(cat, w), 0.0)
            valid += has_gt
        with np.errstate(invalid="ignore", divide="ignore"):
            out[start:start + chunk] = total / valid[:, None]
    return out
