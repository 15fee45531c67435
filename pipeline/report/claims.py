"""The papers' claims that the ablation tests, each with a verdict from its two-level interval.

A claim compares two combinations of one detector with a statistic of AP per IoU threshold; the
paper says the difference (claimed - reference) is positive. The verdict reads the interval, given a
region of practical equivalence ±rope (AP points) around 0:

* ``reproduced``: it excludes 0 on the paper's side (low > 0);
* ``contradicted``: it excludes 0 on the other side (high < 0);
* ``equivalent``: it contains 0 and lies inside (-rope, +rope): no effect of practical size;
* ``not resolved``: it contains 0 and reaches past ±rope: too few seeds or images to tell;
* ``not testable``: the evidence cannot carry a verdict (:mod:`pipeline.report.guards`): no interval.

'Equivalent' is declared only where ±rope is at most ``report.equivalence_rope_share`` of the baseline's
AP; a wider rope would call an effect of the paper's relative size 'equivalent' to none, so such an
interval is 'not resolved', with the reason.

Multiplicity: the testable claims are a family of m tests. Each claim also gets a Bonferroni-adjusted
interval (confidence 1 - (1 - confidence) / m; normal, from the two-level resamples' standard
deviation) and the verdict read from it, which holds for all m claims together at the report's
confidence.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from detection.engine.coco_eval import IOU_THRESHOLDS
from pipeline.plan.params import ReportConfig
from pipeline.report.bootstrap import PairedDelta, Statistic, coco_ap
from pipeline.report.power import VarianceSplit

NOT_TESTABLE = "not testable"
VERDICT_CODES = {"reproduced": 1, "not resolved": 0, "contradicted": -1, "equivalent": 2, NOT_TESTABLE: 3}
"""Numeric form of the verdict, so ``dvc metrics diff`` shows when one flips."""


def high_iou_gain_over_ap50(ap: np.ndarray) -> np.ndarray:
    """Mean AP at IoU 0.80 and 0.90 (the thresholds Wu et al. report) minus AP50."""
    high = [IOU_THRESHOLDS.index(t) for t in (0.80, 0.90)]
    return ap[..., high].mean(axis=-1) - ap[..., IOU_THRESHOLDS.index(0.50)]


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


def verdict(low: float, high: float, rope: float, equivalence: bool = True) -> str:
    """The verdict of an interval [low, high] on a claimed positive difference (see the module docstring);
    ``equivalence``: whether ±rope is small enough on the baseline's scale to declare 'equivalent'."""
    if low > 0:
        return "reproduced"
    if high < 0:
        return "contradicted"
    if -rope < low and high < rope and equivalence:
        return "equivalent"
    return "not resolved"


@dataclass(frozen=True)
class ClaimResult:
    """A tested claim: its paired difference, verdicts and power (intervals and effects in AP points)."""

    claim: Claim
    delta: PairedDelta
    verdict: str
    adjusted_low: float
    adjusted_high: float
    """Bonferroni-adjusted interval over the family of tested claims."""
    adjusted_verdict: str
    split: VarianceSplit
    mde: float
    """Minimum detectable effect of this design (two-sided at the report's confidence, the report's power)."""
    reason: str | None
    """Why an interval inside ±rope is 'not resolved' rather than 'equivalent' (None: it is not)."""


@dataclass(frozen=True)
class UntestableClaim:
    """A claim of the design that the evidence cannot carry (:mod:`pipeline.report.guards`)."""

    claim: Claim
    reason: str
    verdict = NOT_TESTABLE
    adjusted_verdict = NOT_TESTABLE


def assess_claims(tested: list[tuple[Claim, PairedDelta]], baseline_ap: dict[str, float], settings: ReportConfig
                  ) -> list[ClaimResult]:
    """Verdicts, Bonferroni-adjusted verdicts and power of the ``tested`` claims (the family);
    ``baseline_ap``: each detector's baseline AP (AP points, mean over seeds), the scale of 'equivalent'."""
    family = max(len(tested), 1)
    adjusted_confidence = 1 - (1 - settings.confidence) / family
    rope = settings.rope
    results = []
    for claim, delta in tested:
        share = rope / baseline_ap[claim.detector]  # a tested claim's baseline learned: its AP is > 0
        equivalence = share <= settings.equivalence_rope_share
        low, high = (100 * v for v in delta.normal_interval(adjusted_confidence))
        plain = (100 * delta.ci_low, 100 * delta.ci_high)
        inside_rope = any(verdict(*interval, rope) == "equivalent" for interval in (plain, (low, high)))
        reason = None if equivalence or not inside_rope else (
            f"not 'equivalent': ±{rope:g} AP (report.rope) is {share:.1%} of the {claim.detector} baseline's "
            f"AP {baseline_ap[claim.detector]:.1f}, more than report.equivalence_rope_share "
            f"{settings.equivalence_rope_share:.0%}")
        split = delta.variance_split()
        results.append(ClaimResult(claim, delta, verdict(*plain, rope, equivalence), low, high,
                                   verdict(low, high, rope, equivalence), split,
                                   split.mde(settings.confidence, settings.power), reason))
    return results
