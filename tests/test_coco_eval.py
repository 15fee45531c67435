"""faster-coco-eval and pycocotools give the same 12 numbers and per-IoU APs on the same detections."""

import json

import numpy as np
import pytest

from detection.engine.coco_eval import IOU_KEYS, STAT_NAMES, evaluate_coco


def _noisy_detections(gt: dict, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    dets = []
    for ann in gt["annotations"]:
        x, y, w, h = ann["bbox"]
        for _ in range(2):
            jitter = rng.normal(0, 0.12, 4) * [w, h, w, h]
            dets.append({"image_id": ann["image_id"], "category_id": ann["category_id"],
                         "bbox": [x + jitter[0], y + jitter[1], max(1, w + jitter[2]), max(1, h + jitter[3])],
                         "score": float(rng.uniform())})
    cats = [c["id"] for c in gt["categories"]]
    for im in gt["images"]:
        for _ in range(3):
            dets.append({"image_id": im["id"], "category_id": int(rng.choice(cats)),
                         "bbox": [float(v) for v in rng.uniform(0, 60, 4) + [0, 0, 4, 4]],
                         "score": float(rng.uniform(0, 0.5))})
    return dets


@pytest.fixture
def gt(synthetic_root):
    return json.loads((synthetic_root / "annotations" / "instances_val.json").read_text())


def test_backends_agree(gt):
    dets = _noisy_detections(gt, seed=0)
    fast = evaluate_coco(gt, dets, "faster_coco_eval")
    ref = evaluate_coco(gt, dets, "pycocotools")
    for name in STAT_NAMES:
        assert fast["stats"][name] == pytest.approx(ref["stats"][name], abs=1e-6), name
    for t in IOU_KEYS:
        assert fast["ap_per_iou"][t] == pytest.approx(ref["ap_per_iou"][t], abs=1e-6), t
    assert 0.05 < fast["bbox"]["AP"] < 0.95
    assert fast["ap_per_iou"]["0.50"] >= fast["ap_per_iou"]["0.95"]
    assert fast["bbox"]["AP"] == pytest.approx(np.mean(list(fast["ap_per_iou"].values())), abs=1e-6)


def test_perfect_and_empty_detections(gt):
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in gt["annotations"]]
    assert evaluate_coco(gt, perfect)["bbox"]["AP"] == pytest.approx(1.0)
    empty = evaluate_coco(gt, [])
    assert empty["bbox"]["AP"] == 0.0 and set(empty["ap_per_iou"]) == set(IOU_KEYS)
