"""The ablation table: schema, ours beside the paper, ΔAP and its interval, markdown."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import ROOT
from detection.config import read_yaml
from pipeline.plan.params import parse_params
from pipeline.plan.ablation import plan_ablation
from pipeline.plan.params import ReportConfig
from detection.engine.coco_eval import IOU_KEYS
from pipeline.report.bootstrap import PairedDelta
from pipeline.report.claims import CLAIMS, assess_claims
from pipeline.report.guards import BaselineLearning
from pipeline.report.results import RunResult
from pipeline.report.tables import COLUMNS, ablation_table, detector_markdown, summary_metrics


def _metrics(ap: float) -> dict:
    bbox = {"AP": ap, "AP50": ap + 0.2, "AP75": ap - 0.05, "APs": ap / 2, "APm": ap, "APl": ap * 1.5}
    return {"bbox": bbox, "stats": bbox, "ap_per_iou": {t: ap + 0.3 - 0.06 * i for i, t in enumerate(IOU_KEYS)},
            "num_images": 96, "num_detections": 10}


@pytest.fixture
def table() -> tuple[pd.DataFrame, dict]:
    params = read_yaml(ROOT / "params.yaml")
    params["ablation"]["seeds"] = [0, 1]
    ablation = plan_ablation(parse_params(params), ROOT / "configs")
    summary = ablation.summary()
    ap = {"baseline": 0.30, "IS": 0.32, "IS+BFP": 0.33, "IS+BFP+BL": 0.35}
    results = [RunResult(r, _metrics(ap.get(r.combination, 0.25) + 0.01 * r.seed), [], pd.DataFrame(), None)
               for r in ablation.runs]
    deltas = {("faster_rcnn", "IS+BFP+BL"): PairedDelta(0.05, 0.03, 0.07, 0.04, 0.06, (0.05, 0.05), np.zeros(3),
                                                        np.zeros(3), 96)}
    correlations = {("retinanet", "IoU-cls"): {"pearson": 0.4, "spearman": 0.35}}
    learning = {"faster_rcnn": BaselineLearning("faster_rcnn", (0, 1), (30.0, 31.0), (0.5, 0.7))}
    return ablation_table(summary, results, deltas, correlations, learning), summary


def test_schema_rows_and_units(table):
    frame, _ = table
    assert list(frame.columns) == list(COLUMNS)
    ours = frame[frame.source == "ours"]
    assert len(ours) == 9 and (ours.seeds == 2).all()
    row = ours.set_index(["detector", "combination"]).loc[("faster_rcnn", "IS+BFP+BL")]
    assert row["AP"] == pytest.approx(35.5) and row["AP_sd"] == pytest.approx(np.std([35, 36], ddof=1))
    assert (row["dAP"], row["dAP_ci_low"], row["dAP_ci_high"]) == pytest.approx((5.0, 3.0, 7.0))
    assert (row["dAP_image_ci_low"], row["dAP_image_ci_high"]) == pytest.approx((4.0, 6.0))
    assert row["dAP_sd"] == pytest.approx(0.0)
    assert bool(row["IS"]) and bool(row["BFP"]) and bool(row["BL"]) and pd.isna(row["IoU-cls"])
    assert row["AP@0.50"] == pytest.approx(65.5) and row["AP@0.95"] == pytest.approx(65.5 - 54)
    paper = frame[frame.source == "paper"].set_index(["detector", "combination"])
    assert paper.loc[("faster_rcnn", "baseline"), "AP"] == 35.9
    assert paper.loc[("faster_rcnn", "IS+BFP"), "dAP"] == pytest.approx(1.8)
    assert paper.loc[("retinanet", "IoU-cls+IoU-loc"), "dAP"] == pytest.approx(1.3)
    assert pd.isna(paper.loc[("retinanet", "IoU-cls+IoU-loc"), "AP"])
    retina = ours.set_index(["detector", "combination"]).loc[("retinanet", "IoU-cls")]
    assert retina["score_iou_pearson"] == pytest.approx(0.4) and pd.isna(retina["IS"]) and bool(retina["IoU-cls"])
    # rows keep the design's order, each paper row right after ours
    faster = frame[frame.detector == "faster_rcnn"]
    assert list(zip(faster.combination, faster.source))[:3] == [("baseline", "ours"), ("baseline", "paper"),
                                                                 ("IS", "ours")]


def test_summary_metrics_and_markdown(table):
    frame, _ = table
    claim = CLAIMS[2]
    # two seeds 1 AP point apart; image resamples with sd 0.5 AP points
    image_resampled = np.array([-0.025, -0.015] * 50)
    delta = PairedDelta(-0.02, -0.03, -0.01, -0.025, -0.015, (-0.025, -0.015), np.linspace(-0.03, -0.01, 101),
                        image_resampled, 96)
    [assessed] = assess_claims([(claim, delta)], {"faster_rcnn": 30.5}, ReportConfig())
    metrics = summary_metrics(frame, [assessed])
    assert set(metrics) == {"faster_rcnn", "retinanet", "claims"}
    image_se = 100 * np.std(image_resampled, ddof=1)
    seed_se = 100 * np.std([-0.025, -0.015], ddof=1) / np.sqrt(2)
    se = np.hypot(image_se, seed_se)
    sd = 100 * np.std(np.linspace(-0.03, -0.01, 101), ddof=1)  # one claim: Bonferroni changes nothing
    assert metrics["claims"] == {claim.key: {
        "delta": -2.0, "ci_low": -3.0, "ci_high": -1.0, "verdict": "contradicted", "verdict_code": -1,
        "adjusted_ci_low": round(-2.0 - 1.959964 * sd, 3), "adjusted_ci_high": round(-2.0 + 1.959964 * sd, 3), "adjusted_verdict": "contradicted",
        "adjusted_verdict_code": -1, "se": round(se, 3), "se_seed": round(seed_se, 3),
        "se_image": round(image_se, 3), "seed_sd": round(seed_se * np.sqrt(2), 3),
        "mde": round(2.8015852 * se, 3), "seeds": 2, "images": 96}}
    assert metrics["faster_rcnn"]["IS+BFP+BL"]["dAP"] == pytest.approx(5.0)
    assert "dAP" not in metrics["faster_rcnn"]["baseline"]
    lines = "\n".join(detector_markdown(frame, "faster_rcnn", 0.95))
    assert "| combination | IS | BFP | BL | source | AP |" in lines
    assert "| IS+BFP+BL | ✓ | ✓ | ✓ | ours | 35.5 ± 0.7 |" in lines
    assert "5.0 ± 0.0 | [3.0, 7.0] | [4.0, 6.0] |" in lines
    assert "|  | ✓ | ✓ | ✓ | paper | 38.5 | 59.3 | 42.0 | 22.9 | 42.1 | 50.5 | 2.6 |  |  |" in lines


def test_one_seed_claims_are_over_images_only_and_summarised(table):
    """With one seed the seed part of the SE is unknown: SE and MDE are the image part alone, the power
    table says so, and `libra report`'s console summary prints the claim."""
    from pipeline.report.tables import power_markdown
    from stages.report import summary_lines

    frame, _ = table
    image_resampled = np.array([0.005, 0.015] * 50)
    delta = PairedDelta(0.01, 0.004, 0.016, 0.004, 0.016, (0.01,), image_resampled, image_resampled, 96)
    [assessed] = assess_claims([(CLAIMS[0], delta)], {"faster_rcnn": 30.5}, ReportConfig())
    image_se = 100 * np.std(image_resampled, ddof=1)
    assert assessed.split.images_only and assessed.split.se() == pytest.approx(image_se)
    assert assessed.mde == pytest.approx(2.8015852 * image_se)
    metrics = summary_metrics(frame, [assessed])
    claim = metrics["claims"][CLAIMS[0].key]
    assert "se_seed" not in claim and claim["mde"] == round(2.8015852 * image_se, 3) and claim["seeds"] == 1
    assert "| — (one seed) |" in "\n".join(power_markdown([assessed], 0.95, 0.8, 1.0))
    [printed] = [line for line in summary_lines(metrics) if line.startswith(CLAIMS[0].key)]
    assert "SE seeds unknown, one seed" in printed and f"MDE {claim['mde']:.2f}" in printed
