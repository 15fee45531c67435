"""The papers' numbers shown beside ours (COCO AP in percent, as published)."""

from __future__ import annotations

PAPER_ROWS: dict[str, dict[str, dict[str, float]]] = {
    "faster_rcnn": {
        "baseline": {"AP": 35.9, "AP50": 58.0, "AP75": 38.4, "APs": 21.2, "APm": 39.5, "APl": 46.4},
        "IS": {"AP": 36.8, "AP50": 58.0, "AP75": 40.0, "APs": 21.1, "APm": 40.3, "APl": 48.2},
        "IS+BFP": {"AP": 37.7, "AP50": 59.4, "AP75": 40.9, "APs": 22.4, "APm": 41.3, "APl": 49.3},
        "IS+BFP+BL": {"AP": 38.5, "AP50": 59.3, "AP75": 42.0, "APs": 22.9, "APm": 42.1, "APl": 50.5},
    },
    "retinanet": {
        "baseline": {"AP": 35.8},
        "BFP+BL": {"AP": 37.8, "dAP": 2.0},
        "IoU-cls": {"dAP": 0.7},
        "IoU-loc": {"dAP": 0.8},
        "IoU-cls+IoU-loc": {"dAP": 1.3},
    },
}
"""Per detector and combination: the published numbers (ΔAP where only the gain is published)."""

PAPER_SOURCES: dict[str, str] = {
    "faster_rcnn": "Libra R-CNN (Pang et al., CVPR 2019), Table 2: Faster R-CNN R50-FPN, 1x, COCO val2017.",
    "retinanet": ("Libra R-CNN: RetinaNet R50-FPN 1x 35.8 -> Libra RetinaNet (BFP+BL) 37.8, COCO test-dev; "
                  "IoU-balanced losses (Wu et al. 2019), RetinaNet R50: gains only (cls +0.7, loc +0.8, "
                  "both +1.3 AP; best eta = lambda = 1.5)."),
}


def paper_row(detector: str, combo: str) -> dict[str, float]:
    """The published numbers of ``combo`` (empty if none), with ΔAP derived where both APs are known."""
    rows = PAPER_ROWS.get(detector, {})
    row = dict(rows.get(combo, {}))
    base = rows.get("baseline", {}).get("AP")
    if "dAP" not in row and "AP" in row and base is not None and combo != "baseline":
        row["dAP"] = round(row["AP"] - base, 1)
    return row
