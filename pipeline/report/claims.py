"""The papers' claims that the ablation tests, each with a verdict from its two-level interval.

A claim compares two combinations of one detector with a statistic of AP per IoU threshold; the
paper says the difference (claimed - reference) is positive. The verdict reads the interval:

* ``reproduced``: it excludes 0 on the paper's side (low > 0);
* ``contradicted``: it excludes 0 on the other side (high < 0);
* ``not resolved``: it contains 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.report.bootstrap import PairedDelta, Statistic, coco_ap

VERDICT_CODES = {"reproduced": 1, "not resolved": 0, "contradicted": -1}
"""Numeric form of the verdict, so ``dvc metrics diff`` shows when one flips."""


def high_iou_gain_over_ap50(ap: np.ndarray) -> np.ndarray:
    """Mean AP at IoU 0.80 and 0.90 (the thresholds Wu et al. report) minus AP50."""
    return ap[..., [6, 8]].mean(axis=-1) - ap[..., 0]


@dataclass(frozen=True)
class Claim:
    key: str
    """Short identifier, used in ``metrics.json`` and MLflow."""
    text: str
    detector: str
    combination: str
    reference: str
    """The combination that ``combination`` is compared with (Δ = ``combination`` - ``reference``)."""
    statistic: Statistic
    measure: str
    """What the statistic is, in words."""
    paper: str
    """What the paper measured (COCO, R50-FPN, 1x)."""


CLAIMS: tuple[Claim, ...] = (
    Claim("frcnn_IS_gt_baseline", "IoU-balanced sampling improves Faster R-CNN", "faster_rcnn", "IS", "baseline",
          coco_ap, "ΔAP", "+0.9 AP (Libra R-CNN, Table 2)"),
    Claim("frcnn_BFP_gt_IS", "Balanced Feature Pyramid adds to IoU-balanced sampling", "faster_rcnn", "IS+BFP", "IS",
          coco_ap, "ΔAP", "+0.9 AP (Libra R-CNN, Table 2)"),
    Claim("frcnn_BL_gt_IS_BFP", "Balanced L1 adds to IS+BFP", "faster_rcnn", "IS+BFP+BL", "IS+BFP",
          coco_ap, "ΔAP", "+0.8 AP (Libra R-CNN, Table 2)"),
    Claim("retina_BFP_BL_gt_baseline", "Libra RetinaNet (BFP+BL) improves RetinaNet", "retinanet", "BFP+BL", "baseline",
          coco_ap, "ΔAP", "+2.0 AP (Libra R-CNN, RetinaNet 35.8 -> 37.8)"),
    Claim("retina_IoU_cls_gt_baseline", "IoU-balanced classification loss improves RetinaNet", "retinanet",
          "IoU-cls", "baseline", coco_ap, "ΔAP", "+0.7 AP (Wu et al., Table 2)"),
    Claim("retina_IoU_loc_gt_baseline", "IoU-balanced localization loss improves RetinaNet", "retinanet",
          "IoU-loc", "baseline", coco_ap, "ΔAP", "+0.8 AP (Wu et al., Table 2)"),
    Claim("retina_both_gt_IoU_cls", "Both IoU-balanced losses beat the classification loss alone", "retinanet",
          "IoU-cls+IoU-loc", "IoU-cls", coco_ap, "ΔAP", "+0.6 AP (+1.3 vs +0.7, Wu et al., Table 2)"),
    Claim("retina_both_gt_IoU_loc", "Both IoU-balanced losses beat the localization loss alone", "retinanet",
          "IoU-cls+IoU-loc", "IoU-loc", coco_ap, "ΔAP", "+0.5 AP (+1.3 vs +0.8, Wu et al., Table 2)"),
    Claim("retina_IoU_loc_high_iou", "The IoU-balanced localization loss helps AP at high IoU more than AP50",
          "retinanet", "IoU-loc", "baseline", high_iou_gain_over_ap50,
          "Δ(mean of AP@0.80, AP@0.90) − ΔAP50", "AP80 +2.1, AP90 +2.3 vs AP +0.8 (Wu et al., Table 3)"),
)


def verdict(delta: PairedDelta) -> str:
    if delta.ci_low > 0:
        return "reproduced"
    if delta.ci_high < 0:
        return "contradicted"
    return "not resolved"
