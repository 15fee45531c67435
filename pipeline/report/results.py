"""The evaluated runs of an ablation, read back from their run directories."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from detection.engine.completion import cut_short
from detection.engine.curves import read_curves
from detection.run_dir import RunDir
from pipeline.plan.runplan import PlanSummary, RunPlan, read_plan_summary, read_run_plan

AP_UNIT = "AP points, 0-100"
"""The one unit of AP (and AR) wherever results are compared: the report, DVC metrics and plots, MLflow
runs and Optuna values. The run files (``metrics.json``, ``metrics.csv``) keep COCO's fractions (0-1)."""
NEGATIVE_IOU_BUFFER = "model.roi_heads.sampled_negative_iou"
"""Prefix, in a Faster R-CNN checkpoint's state_dict, of the IoUHistogram the R-CNN sampler fills."""


@dataclass(frozen=True)
class RunResult:
    plan: RunPlan
    metrics: dict[str, Any]
    """``metrics.json``: bbox (AP..APl), stats (12 COCO numbers), ap_per_iou, counts."""
    detections: list[dict[str, Any]]
    curves: pd.DataFrame
    """Per-epoch training curves (see :func:`detection.engine.curves.epoch_curves`)."""
    negative_iou: tuple[np.ndarray, np.ndarray] | None
    """(bin edges [K+1], counts [K]) of the IoUs of the negatives sampled during training (Faster R-CNN)."""

    @property
    def name(self) -> str:
        return self.plan.name


def ap_points(fraction: float | None) -> float:
    """A COCO AP or AR fraction (0-1, as pycocotools and the run files hold it) in :data:`AP_UNIT`; NaN for a
    missing or non-finite value."""
    return 100.0 * fraction if fraction is not None and math.isfinite(fraction) else float("nan")


def negative_iou_histogram(checkpoint: Path) -> tuple[np.ndarray, np.ndarray] | None:
    from detection.engine.checkpoint import read_checkpoint

    state = read_checkpoint(checkpoint)["state_dict"]
    edges, counts = state.get(f"{NEGATIVE_IOU_BUFFER}.edges"), state.get(f"{NEGATIVE_IOU_BUFFER}.counts")
    if edges is None or counts is None:
        return None
    return edges.numpy().astype(float), counts.numpy().astype(np.int64)


def load_run(plan: RunPlan, root: Path = Path(".")) -> RunResult:
    run = RunDir(root / plan.run_dir)
    metrics_file = run.metrics
    if not metrics_file.exists():
        raise FileNotFoundError(f"{metrics_file}: {plan.name} is not evaluated; run `dvc repro` "
                                "(or `libra dispatch`) to finish it")
    metrics = json.loads(metrics_file.read_text())
    detections = json.loads(run.detections.read_text())
    checkpoint = run.checkpoint("last")
    histogram = negative_iou_histogram(checkpoint) if plan.detector == "faster_rcnn" and checkpoint.exists() else None
    return RunResult(plan, metrics, detections, read_curves(run), histogram)


def runs_of(results: list[RunResult], detector: str, combination: str) -> list[RunResult]:
    """The runs of ``combination`` of ``detector``, in the order of ``results``."""
    return [r for r in results if r.plan.detector == detector and r.plan.combination == combination]


def load_results(plan_dir: Path, failures: dict[str, str], root: Path = Path(".")
                 ) -> tuple[PlanSummary, list[RunResult], list[tuple[RunPlan, str]]]:
    """The ablation summary, the results of every planned run in plan order, and the planned runs without
    one, with why: named in ``failures`` (run name -> reason), not evaluated, or evaluated after a stop."""
    summary = read_plan_summary(plan_dir)
    results, unfinished = [], []
    for entry in summary.runs:
        plan = read_run_plan(root / entry.plan)
        if entry.name in failures:
            unfinished.append((plan, failures[entry.name]))
            continue
        try:
            result = load_run(plan, root)
        except FileNotFoundError:
            unfinished.append((plan, "not evaluated"))
            continue
        reason = cut_short(result.metrics)
        if reason:
            unfinished.append((plan, f"not finished: {reason}"))
        else:
            results.append(result)
    return summary, results, unfinished


def validation_ground_truth(plan: RunPlan) -> dict[str, Any]:
    """The validation annotations a run was evaluated on (its ``data`` settings, ``max_images`` applied)."""
    from detection.engine.splits import coco_subset, validation_split

    return coco_subset(validation_split(plan.experiment_config().data))
