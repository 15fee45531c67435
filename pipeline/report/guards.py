"""When the evidence can carry a verdict: the guards that make a claim *not testable*.

A claim of the design gets a verdict from its interval only when

* every planned run of both its combinations finished, at the same seeds on both sides (a failed,
  stopped or unevaluated run, or a seed one side lacks, would leave the pairing incomplete);
* its detector's baseline learned: at every seed its AP exceeds that of the same detector before
  training (:func:`untrained_ap`: the same config, seed and so initial weights, backbone weights and
  validation images) by ``report.learned_margin`` AP points; a detector at the floor of AP cannot show
  an effect, so a difference there would read a floor effect as evidence of none;
* the runs were evaluated on at least ``report.min_val_images`` validation images, the fewest the
  image bootstrap's intervals rest on.

Otherwise the claim is *not testable*, with every reason that applies; the Bonferroni family counts
only the testable claims. 'Equivalent' has one more condition, on the baseline's scale (see
:func:`pipeline.report.claims.assess_claims`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.plan.params import ReportConfig
from pipeline.report.claims import Claim
from pipeline.report.results import RunResult, ap_points, runs_of
from pipeline.plan.runplan import RunPlan


def untrained_ap(plan: RunPlan) -> float:
    """COCO AP (AP points) on its validation set of ``plan``'s detector before its first step: built from
    its config, whose seed fixes every module's initial weights (:mod:`detection.models.init_streams`), with
    the same backbone weights and ``model.init_from``, as training starts from them."""
    from detection.engine.coco_eval import evaluate_coco
    from detection.engine.detections import predict
    from detection.engine.evaluate import ValidationData
    from detection.models.detectors import build_detector, init_detector

    cfg = plan.experiment_config()
    data = ValidationData(cfg)
    model = build_detector(cfg, data.num_classes)
    if cfg.model.init_from:
        init_detector(model, cfg.model)
    detections = predict(model, data.val_dataloader(), torch.device("cpu"), data.label_to_category_id)
    return ap_points(evaluate_coco(data.val_gt, detections, cfg.eval.backend)["bbox"]["AP"])


@dataclass(frozen=True)
class BaselineLearning:
    """A detector's baseline runs, by seed: COCO AP trained and before training (AP points)."""

    detector: str
    seeds: tuple[int, ...]
    trained: tuple[float, ...]
    untrained: tuple[float, ...]

    @property
    def gains(self) -> tuple[float, ...]:
        return tuple(t - u for t, u in zip(self.trained, self.untrained))

    @property
    def mean_ap(self) -> float:
        return float(np.mean(self.trained))

    def learned(self, margin: float) -> bool:
        """Whether the baseline gained more than ``margin`` AP points at every seed."""
        return bool(self.seeds) and all(gain > margin for gain in self.gains)

    def reason(self, margin: float) -> str | None:
        """Why its claims are not testable, if the baseline did not learn."""
        if not self.seeds:
            return f"no finished {self.detector} baseline run tells whether the detector learned"
        if self.learned(margin):
            return None
        failed = [f"seed {s}: AP {t:.1f} vs {u:.1f} untrained" for s, t, u, gain
                  in zip(self.seeds, self.trained, self.untrained, self.gains) if gain <= margin]
        return (f"the {self.detector} baseline did not learn ({'; '.join(failed)}; it must gain more than "
                f"{margin:g} AP, report.learned_margin)")


def baseline_learning(results: list[RunResult], detector: str) -> BaselineLearning:
    """``detector``'s finished baseline runs, trained and untrained (:func:`untrained_ap`)."""
    runs = runs_of(results, detector, "baseline")
    return BaselineLearning(detector, tuple(r.plan.seed for r in runs),
                            tuple(ap_points(r.metrics["bbox"]["AP"]) for r in runs),
                            tuple(untrained_ap(r.plan) for r in runs))


def design_reason(claim: Claim, planned: Sequence[RunPlan], unfinished: dict[str, str]) -> str | None:
    """Why ``claim`` is not testable from the runs ``planned`` for it, if one of them has no result
    (``unfinished``: run name -> why) or a seed is planned for one of its combinations only."""
    seeds = {side: {p.seed for p in planned if p.combination == side} for side in (claim.combination, claim.reference)}
    reasons = [f"{name} has no result ({unfinished[name]})" for name in sorted(p.name for p in planned)
               if name in unfinished]
    for side, other in ((claim.combination, claim.reference), (claim.reference, claim.combination)):
        unpaired = sorted(seeds[side] - seeds[other])
        if unpaired:
            reasons.append(f"unpaired seeds: {side} has seed(s) {unpaired} that {other} lacks")
    return "; ".join(reasons) or None


def image_count_reason(num_images: int, settings: ReportConfig) -> str | None:
    """Why no claim is testable on ``num_images`` validation images, if they are too few for the bootstrap."""
    if num_images >= settings.min_val_images:
        return None
    return (f"{num_images} validation images, fewer than the {settings.min_val_images} the image bootstrap "
            "needs (report.min_val_images)")
