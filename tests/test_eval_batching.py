"""Evaluation batching and the decoded-image cache change no detection: the same seeded model on the same
validation images gives the same detections (up to float noise) and the same AP at any batch size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from detection.config import load_config
from detection.data import CocoDetectionDataset, collate_detection
from detection.engine.coco_eval import evaluate_coco
from detection.engine.detections import predict
from detection.engine.splits import coco_subset, validation_split
from detection.models.detectors import build_detector

ROOT = Path(__file__).resolve().parents[1]


def _matched(a: list[dict], b: list[dict]) -> bool:
    """Same detections per (image, class), in score order, boxes within 0.02 px and scores within 1e-4."""
    def groups(results):
        out: dict[tuple[int, int], list[dict]] = {}
        for d in results:
            out.setdefault((d["image_id"], d["category_id"]), []).append(d)
        return {k: sorted(v, key=lambda d: -d["score"]) for k, v in out.items()}

    ga, gb = groups(a), groups(b)
    return ga.keys() == gb.keys() and all(
        len(ga[k]) == len(gb[k]) and all(abs(x["score"] - y["score"]) <= 1e-4
                                         and max(abs(p - q) for p, q in zip(x["bbox"], y["bbox"])) <= 0.02
                                         for x, y in zip(ga[k], gb[k]))
        for k in ga)


@pytest.mark.parametrize("detector", ["faster_rcnn", "retinanet"])
def test_eval_batch_size_and_cache_keep_detections_and_ap(detector: str, synthetic_root: Path, tiny_weights: Path) -> None:
    cfg = load_config(ROOT / f"configs/{detector}_tiny.yaml",
                      [f"data.root={synthetic_root}", f"model.backbone.weights={tiny_weights}"])
    split = validation_split(cfg.data)
    gt = coco_subset(split)
    torch.manual_seed(0)
    model = build_detector(cfg, 4)
    if detector == "retinanet":  # a fresh classification head scores nothing over the threshold
        model.score_thresh = 0.0

    def results(batch_size: int, cache_mb: int) -> list[dict]:
        dataset = CocoDetectionDataset(split, cache_mb=cache_mb)
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_detection)
        return predict(model, loader, torch.device("cpu"), dataset.label_to_category_id)

    reference = results(8, 0)  # eval.batch_size 8 (the default), decoding every image
    assert reference
    for batch_size, cache_mb in ((32, 0), (32, 1024), (16, 1024), (3, 1024)):
        other = results(batch_size, cache_mb)
        assert _matched(reference, other), (batch_size, cache_mb)
        assert evaluate_coco(gt, other)["bbox"]["AP"] == pytest.approx(evaluate_coco(gt, reference)["bbox"]["AP"], abs=1e-4)
    assert results(8, 1024) == reference  # the cache alone: the very same detections
