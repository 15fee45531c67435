"""The guards that keep a verdict from evidence that cannot carry it (pipeline/report/guards.py): each on
synthetic runs, then a real ablation trained for one step, whose detectors cannot have learned."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from pipeline.plan.params import ReportConfig
from pipeline.report.bootstrap import ap_samples, resample_counts
from pipeline.report.build import evaluate_claims
from pipeline.report.claims import CLAIMS, NOT_TESTABLE, VERDICT_CODES, ClaimResult, UntestableClaim
from pipeline.report.guards import BaselineLearning
from pipeline.report.per_image import match_images
from pipeline.report.power import read_splits
from pipeline.report.tables import COLUMNS, claims_markdown, summary_metrics
from pipeline.tracking.ablation import report_metrics
from stages.report import summary_lines

IS_CLAIM, BFP_CLAIM = CLAIMS[0], CLAIMS[1]  # IS vs baseline, IS+BFP vs IS (Faster R-CNN)
SETTINGS = ReportConfig(bootstrap_resamples=300)


def _set(num_images: int) -> dict:
    images = [{"id": i + 1, "width": 100, "height": 100, "file_name": f"{i}.png"} for i in range(num_images)]
    annotations = [{"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [10, 10, 30, 30], "area": 900,
                    "iscrowd": 0} for i in range(num_images)]
    return {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "a"}]}


def _runs(found: dict[str, int], seeds=(0, 1), num_images: int = 60):
    """Faster R-CNN runs, one per combination and seed, that find the objects of the first ``found[c]``
    images exactly (AP ≈ found / images)."""
    gt = _set(num_images)
    counts = resample_counts(num_images, SETTINGS.bootstrap_resamples, seed=0)
    results, samples = [], {}
    for combination, images in found.items():
        detections = [{"image_id": i, "category_id": 1, "bbox": [10, 10, 30, 30], "score": 0.9}
                      for i in range(1, images + 1)]
        sample = ap_samples(match_images(gt, detections), counts)
        for seed in seeds:
            name = f"faster_rcnn/{combination}/seed{seed}"
            results.append(SimpleNamespace(name=name, plan=_plan(combination, seed)))
            samples[name] = sample
    return results, samples


def _plan(combination: str, seed: int) -> SimpleNamespace:
    return SimpleNamespace(detector="faster_rcnn", combination=combination, seed=seed,
                           name=f"faster_rcnn/{combination}/seed{seed}")


def _learned(ap: float = 50.0, untrained: float = 0.1, seeds=(0, 1)) -> dict[str, BaselineLearning]:
    return {"faster_rcnn": BaselineLearning("faster_rcnn", tuple(seeds), (ap,) * len(seeds),
                                            (untrained,) * len(seeds))}


def _by_key(claims) -> dict:
    return {c.claim.key: c for c in claims}


def test_learned_is_a_margin_over_the_untrained_detector_at_every_seed():
    baseline = BaselineLearning("faster_rcnn", (0, 1, 2), (30.0, 4.0, 31.0), (0.2, 0.1, 0.3))
    assert baseline.gains == pytest.approx((29.8, 3.9, 30.7))
    assert baseline.learned(margin=3.0) and not baseline.learned(margin=5.0)
    assert baseline.reason(5.0) == ("the faster_rcnn baseline did not learn (seed 1: AP 4.0 vs 0.1 untrained; it must "
                                    "gain more than 5 AP, report.learned_margin)")
    assert baseline.reason(3.0) is None
    assert "no finished faster_rcnn baseline run" in BaselineLearning("faster_rcnn", (), (), ()).reason(5.0)


def test_a_baseline_that_did_not_learn_makes_its_claims_not_testable():
    results, samples = _runs({"baseline": 30, "IS": 60})
    [claim] = evaluate_claims(results, samples, SETTINGS, _learned(ap=3.0, untrained=0.5), [])
    assert isinstance(claim, UntestableClaim) and claim.claim == IS_CLAIM
    assert (claim.verdict, claim.adjusted_verdict) == (NOT_TESTABLE, NOT_TESTABLE)
    assert "the faster_rcnn baseline did not learn (seed 0: AP 3.0 vs 0.5 untrained; seed 1:" in claim.reason
    [tested] = evaluate_claims(results, samples, SETTINGS, _learned(), [])
    assert isinstance(tested, ClaimResult) and tested.verdict == "reproduced" and tested.reason is None


def test_too_few_validation_images_make_every_claim_not_testable():
    results, samples = _runs({"baseline": 10, "IS": 20}, num_images=20)
    [claim] = evaluate_claims(results, samples, SETTINGS, _learned(), [])
    assert isinstance(claim, UntestableClaim)
    assert claim.reason == "20 validation images, fewer than the 30 the image bootstrap needs (report.min_val_images)"
    [tested] = evaluate_claims(results, samples, ReportConfig(bootstrap_resamples=300, min_val_images=20),
                               _learned(), [])
    assert isinstance(tested, ClaimResult)


def test_a_failed_or_missing_run_and_unpaired_seeds_are_named():
    """IS seed 1 failed and IS+BFP seed 1 was never evaluated: both claims lose their pairing. A seed
    that only one side planned (IS seed 2, no baseline seed 2) is refused the same way."""
    results, samples = _runs({"baseline": 30, "IS": 60, "IS+BFP": 60})
    results = [r for r in results if r.name not in ("faster_rcnn/IS/seed1", "faster_rcnn/IS+BFP/seed1")]
    unfinished = [(_plan("IS", 1), "train exited with 1: non-finite loss"), (_plan("IS+BFP", 1), "not evaluated"),
                  (_plan("IS", 2), "not evaluated")]
    claims = _by_key(evaluate_claims(results, samples, SETTINGS, _learned(), unfinished))
    assert claims[IS_CLAIM.key].reason == (
        "faster_rcnn/IS/seed1 has no result (train exited with 1: non-finite loss); faster_rcnn/IS/seed2 has no "
        "result (not evaluated); unpaired seeds: IS has seed(s) [2] that baseline lacks")
    assert claims[BFP_CLAIM.key].reason == (
        "faster_rcnn/IS+BFP/seed1 has no result (not evaluated); faster_rcnn/IS/seed1 has no result (train exited "
        "with 1: non-finite loss); faster_rcnn/IS/seed2 has no result (not evaluated); unpaired seeds: IS has "
        "seed(s) [2] that IS+BFP lacks")
    assert all(isinstance(c, UntestableClaim) for c in claims.values())


def test_the_bonferroni_family_counts_only_the_testable_claims():
    """Two claims of the design, one not testable (a failed run): the tested one's adjusted interval is the
    family-of-one interval, Δ ± z(0.975) · sd, and the table says ×1."""
    results, samples = _runs({"baseline": 30, "IS": 60, "IS+BFP": 60})
    results = [r for r in results if r.name != "faster_rcnn/IS+BFP/seed1"]
    claims = evaluate_claims(results, samples, SETTINGS, _learned(), [(_plan("IS+BFP", 1), "failed")])
    tested, untestable = _by_key(claims)[IS_CLAIM.key], _by_key(claims)[BFP_CLAIM.key]
    assert isinstance(tested, ClaimResult) and isinstance(untestable, UntestableClaim)
    sd = 100 * np.std(tested.delta.resampled, ddof=1)
    assert (tested.adjusted_low, tested.adjusted_high) == pytest.approx(
        (100 * tested.delta.delta - 1.959964 * sd, 100 * tested.delta.delta + 1.959964 * sd))
    assert "Bonferroni 95% CI (×1)" in claims_markdown(claims, 0.95, 0.5)[0]


@pytest.mark.parametrize("baseline_ap, expected", [(50.0, "equivalent"), (10.0, "not resolved")])
def test_equivalent_needs_a_rope_small_on_the_baselines_scale(baseline_ap, expected):
    """The same null difference (IS = baseline) on a baseline of 50 AP (rope 0.5 is 1% of it) and of 10 AP (5%,
    above report.equivalence_rope_share = 2%): equivalent only on the first."""
    results, samples = _runs({"baseline": 60, "IS": 60})
    [claim] = evaluate_claims(results, samples, SETTINGS, _learned(ap=baseline_ap), [])
    assert (claim.verdict, claim.adjusted_verdict) == (expected, expected)
    if expected == "equivalent":
        assert claim.reason is None
    else:
        assert claim.reason == ("not 'equivalent': ±0.5 AP (report.rope) is 5.0% of the faster_rcnn baseline's "
                                "AP 10.0, more than report.equivalence_rope_share 2%")


def test_not_testable_in_metrics_table_console_mlflow_and_power():
    results, samples = _runs({"baseline": 30, "IS": 60})
    claims = evaluate_claims(results, samples, SETTINGS, _learned(ap=2.0), [])
    metrics = summary_metrics(pd.DataFrame(columns=list(COLUMNS)), claims)
    reason = claims[0].reason
    assert metrics["claims"] == {IS_CLAIM.key: {"verdict": NOT_TESTABLE, "verdict_code": VERDICT_CODES[NOT_TESTABLE],
                                                "adjusted_verdict": NOT_TESTABLE,
                                                "adjusted_verdict_code": VERDICT_CODES[NOT_TESTABLE],
                                                "reason": reason}}
    assert VERDICT_CODES[NOT_TESTABLE] not in {code for verdict, code in VERDICT_CODES.items() if verdict != NOT_TESTABLE}
    row = claims_markdown(claims, 0.95, 0.5)[2]
    assert f"| **{NOT_TESTABLE}** | — | {NOT_TESTABLE} | — | {reason} |" in row
    assert summary_lines(metrics) == [f"{IS_CLAIM.key:28s} not testable: {reason}"]
    flat, tags = report_metrics(metrics)
    assert tags[f"libra.reason.{IS_CLAIM.key}"] == reason and tags[f"libra.verdict.{IS_CLAIM.key}"] == NOT_TESTABLE
    assert flat[f"claims/{IS_CLAIM.key}/verdict_code"] == VERDICT_CODES[NOT_TESTABLE]
    assert read_splits(metrics) == {}, "a claim not testable has no variance split to plan seeds with"


def _one_step_ablation(root, tmp_path, pairs: tuple[tuple[str, str], ...]) -> tuple[dict, str]:
    """Seed 0 of the baseline and one combination of each detector in ``pairs``, every run trained for a
    single step on the built-in set, then reported: (metrics.json, ablation.md). The 16
    validation images pass the image guard here (min_val_images 16), so that the learning guard decides."""
    from test_dispatch import _dispatch, _plan as run_plan, _write_ablation

    from pipeline.report.build import write_report

    plans = [run_plan(root, detector, combination, 0, **{"train.max_steps": 1})
             for detector, combination in pairs for combination in ("baseline", combination)]
    _write_ablation(tmp_path, plans)
    assert _dispatch(tmp_path, "inline").exit_code == 0
    write_report(tmp_path / "runs/plan", tmp_path / "reports", ReportConfig(bootstrap_resamples=50, min_val_images=16),
                 root=tmp_path, index=tmp_path / "runs/index.json")
    return json.loads((tmp_path / "reports/metrics.json").read_text()), (tmp_path / "reports/ablation.md").read_text()


def _assert_every_claim_not_testable(metrics: dict, markdown: str, keys: set[str]) -> None:
    assert set(metrics["claims"]) == keys
    for key, claim in metrics["claims"].items():
        detector = "faster_rcnn" if key.startswith("frcnn") else "retinanet"
        assert claim["verdict"] == claim["adjusted_verdict"] == NOT_TESTABLE and "delta" not in claim
        assert claim["verdict_code"] == claim["adjusted_verdict_code"] == VERDICT_CODES[NOT_TESTABLE]
        assert claim["reason"].startswith(f"the {detector} baseline did not learn (seed 0: AP ")
        assert f"| **not testable** | — | not testable | — | {claim['reason']} |" in markdown
        assert metrics[detector]["baseline"]["untrained_AP"] >= 0
    assert "| detector | seed | AP untrained | AP trained | gain | learned (gain > 5) |" in markdown
    assert "**Not testable**" in markdown and "What this design can detect" not in markdown


@pytest.mark.trains
def test_a_detector_trained_for_one_step_makes_its_claim_not_testable(synthetic_root, tmp_path):
    """Faster R-CNN, baseline and IS, one step each: its baseline cannot have learned (about 40 s)."""
    _assert_every_claim_not_testable(*_one_step_ablation(synthetic_root, tmp_path, (("faster_rcnn", "IS"),)),
                                     {"frcnn_IS_gt_baseline"})


@pytest.mark.slow  # fast: the Faster R-CNN test above
@pytest.mark.trains
def test_detectors_trained_for_one_step_make_every_claim_not_testable(synthetic_root, tmp_path):
    """Both detectors, a claim each, every run trained for one step (about 75 s)."""
    _assert_every_claim_not_testable(
        *_one_step_ablation(synthetic_root, tmp_path, (("faster_rcnn", "IS"), ("retinanet", "IoU-cls"))),
        {"frcnn_IS_gt_baseline", "retina_IoU_cls_gt_baseline"})
