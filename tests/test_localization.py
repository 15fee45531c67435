"""A run's IoU distributions: the curves over IoU that MLflow overlays across runs."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.report.localization import iou_distributions


def test_iou_distributions_share_and_mean_score_per_bin_and_sampled_negatives():
    scores, ious = np.array([0.9, 0.7, 0.2, 0.4]), np.array([0.85, 0.8, 0.05, 1.0])
    negatives = (np.array([0.0, 0.25, 0.5]), np.array([3, 1]))
    curves = iou_distributions(scores, ious, negatives)

    shares = {step: value for name, step, value in curves if name == "eval/detections_by_IoU"}
    assert list(shares) == list(range(0, 100, 10)) and sum(shares.values()) == pytest.approx(1.0)
    assert shares[80] == 0.5 and shares[0] == 0.25 and shares[90] == 0.25, "IoU 1.0 falls in the last bin"
    mean_scores = {step: value for name, step, value in curves if name == "eval/score_by_IoU"}
    assert mean_scores == {0: pytest.approx(0.2), 80: pytest.approx(0.8), 90: pytest.approx(0.4)}, "empty bins left out"
    assert [(step, value) for name, step, value in curves if name == "train/sampled_negatives_by_IoU"] == [
        (0, 0.75), (25, 0.25)]
    assert not any(name.startswith("train/") for name, _, _ in iou_distributions(scores, ious, None))
