"""Weighted COCO AP and the paired bootstrap interval, on cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binom

from detection.engine.coco_eval import IOU_KEYS, IOU_THRESHOLDS, evaluate_coco
from pipeline.report.bootstrap import PairedDelta, ap_samples, paired_delta, resample_counts, seed_draws
from pipeline.report.claims import high_iou_gain_over_ap50, verdict
from pipeline.report.per_image import RECALL_THRESHOLDS, average_precision, match_images

CATEGORIES = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}]


def _noisy_set(seed: int, num_images: int = 40):
    """Ground truth with several classes and crowd boxes, detections with jitter, confusions and clutter."""
    rng = np.random.default_rng(seed)
    images = [{"id": i + 1, "width": 128, "height": 128, "file_name": f"{i}.png"} for i in range(num_images)]
    annotations, detections = [], []
    for im in images:
        for _ in range(rng.integers(0, 5)):
            w, h = rng.uniform(6, 50, 2)
            x, y = rng.uniform(0, 128 - w), rng.uniform(0, 128 - h)
            crowd = int(rng.random() < 0.05)
            annotations.append({"id": len(annotations) + 1, "image_id": im["id"], "category_id": int(rng.integers(1, 4)),
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": crowd})
            for _ in range(rng.integers(0, 3)):
                j = rng.normal(0, 0.12, 4) * [w, h, w, h]
                cat = annotations[-1]["category_id"] if rng.random() < 0.85 else int(rng.integers(1, 4))
                detections.append({"image_id": im["id"], "category_id": cat, "score": float(rng.random()),
                                   "bbox": [x + j[0], y + j[1], max(1.0, w + j[2]), max(1.0, h + j[3])]})
        for _ in range(rng.integers(0, 6)):
            detections.append({"image_id": im["id"], "category_id": int(rng.integers(1, 4)), "score": float(rng.random()),
                               "bbox": [*rng.uniform(0, 100, 2).tolist(), *rng.uniform(4, 30, 2).tolist()]})
    return {"images": images, "annotations": annotations, "categories": CATEGORIES}, detections


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_unit_weights_reproduce_cocoeval(backend):
    gt, detections = _noisy_set(0)
    reference = evaluate_coco(gt, detections, backend)
    ap = average_precision(match_images(gt, detections))[0]
    assert ap.mean() == pytest.approx(reference["bbox"]["AP"], abs=1e-12)
    assert ap[0] == pytest.approx(reference["bbox"]["AP50"], abs=1e-12)
    assert ap[5] == pytest.approx(reference["bbox"]["AP75"], abs=1e-12)
    assert ap == pytest.approx([reference["ap_per_iou"][t] for t in IOU_KEYS], abs=1e-12)


def test_weights_equal_evaluating_the_duplicated_multiset():
    """Counting an image w times = evaluating a set in which it appears w times under new ids."""
    gt, detections = _noisy_set(1, num_images=30)
    matches = match_images(gt, detections)
    counts = resample_counts(len(gt["images"]), 3, seed=5)
    for weights in counts:
        images, annotations, dets = [], [], []
        for index, image in enumerate(sorted(gt["images"], key=lambda im: im["id"])):
            for copy in range(weights[index]):
                new_id = len(images) + 1
                images.append({**image, "id": new_id})
                annotations += [{**a, "id": len(annotations) + k + 1, "image_id": new_id}
                                for k, a in enumerate(a for a in gt["annotations"] if a["image_id"] == image["id"])]
                dets += [{**d, "image_id": new_id} for d in detections if d["image_id"] == image["id"]]
        reference = evaluate_coco({"images": images, "annotations": annotations, "categories": CATEGORIES}, dets)
        ap = average_precision(matches, weights[None])[0]
        assert ap.mean() == pytest.approx(reference["bbox"]["AP"], abs=1e-9)
        assert ap[0] == pytest.approx(reference["bbox"]["AP50"], abs=1e-9)


def _one_box_per_image(num_images: int):
    images = [{"id": i + 1, "width": 100, "height": 100, "file_name": f"{i}.png"} for i in range(num_images)]
    annotations = [{"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [10, 10, 30, 30], "area": 900, "iscrowd": 0}
                   for i in range(num_images)]
    return {"images": images, "annotations": annotations, "categories": CATEGORIES[:1]}


def _perfect(image_ids):
    return [{"image_id": i, "category_id": 1, "bbox": [10, 10, 30, 30], "score": 0.9} for i in image_ids]


def test_known_answer_half_the_objects_missed():
    """Baseline finds every object exactly (AP = 1 on any resample); the combination finds those of the
    first half of the images only. On a resample with k of its n = 100 draws in the first half, the
    combination's recall is k/100 at precision 1, so its AP is the share of the 101 recall points <= k/100
    and ΔAP = (k + 1)/101 - 1, with k ~ Binomial(100, 1/2): the interval is known in closed form."""
    n = 100
    gt = _one_box_per_image(n)
    baseline = match_images(gt, _perfect(range(1, n + 1)))
    combination = match_images(gt, _perfect(range(1, n // 2 + 1)))
    counts = resample_counts(n, 4000, seed=0)
    delta = paired_delta([ap_samples(combination, counts)], [ap_samples(baseline, counts)], confidence=0.95)

    def expected(k):
        return np.count_nonzero(RECALL_THRESHOLDS <= k / n) / 101 - 1.0

    assert delta.delta == pytest.approx(expected(n // 2)) and delta.delta == pytest.approx(51 / 101 - 1)
    k = counts[:, : n // 2].sum(axis=1)
    assert delta.resampled == pytest.approx(np.array([expected(x) for x in k]), abs=1e-12)
    low, high = binom.ppf([0.025, 0.975], n, 0.5)  # 40 and 60
    assert delta.ci_low == pytest.approx(expected(low), abs=1.01 / 101)
    assert delta.ci_high == pytest.approx(expected(high), abs=1.01 / 101)
    assert delta.ci_low < delta.delta < delta.ci_high
    assert np.isnan(delta.seed_sd)


def test_identical_runs_have_a_zero_width_interval():
    """Pairing: the same detections on the same resamples differ by exactly 0, however noisy AP is."""
    gt, detections = _noisy_set(2)
    matches = match_images(gt, detections)
    counts = resample_counts(len(gt["images"]), 300, seed=1)
    samples = ap_samples(matches, counts)
    assert samples.resampled.mean(axis=1).std() > 0.005  # the AP itself does vary across resamples
    delta = paired_delta([samples], [samples])
    assert (delta.delta, delta.ci_low, delta.ci_high) == (0.0, 0.0, 0.0)


def test_seeds_are_paired_and_averaged():
    n = 60
    gt = _one_box_per_image(n)
    counts = resample_counts(n, 500, seed=3)
    baseline = ap_samples(match_images(gt, _perfect(range(1, n + 1))), counts)
    combinations = [ap_samples(match_images(gt, _perfect(range(1, m + 1))), counts) for m in (30, 45)]
    delta = paired_delta(combinations, [baseline, baseline])
    per_seed = [np.count_nonzero(RECALL_THRESHOLDS <= m / n) / 101 - 1 for m in (30, 45)]
    assert delta.per_seed == pytest.approx(per_seed)
    assert delta.delta == pytest.approx(np.mean(per_seed))
    assert delta.seed_sd == pytest.approx(np.std(per_seed, ddof=1))


def test_unpaired_samples_are_refused():
    gt = _one_box_per_image(20)
    matches = match_images(gt, _perfect(range(1, 21)))
    a = ap_samples(matches, resample_counts(20, 50, seed=0))
    b = ap_samples(matches, resample_counts(20, 50, seed=1))
    with pytest.raises(ValueError, match="resampled differently"):
        paired_delta([a], [b])


def test_no_detections_and_resample_counts():
    gt = _one_box_per_image(10)
    assert average_precision(match_images(gt, []))[0] == pytest.approx(np.zeros(10))
    counts = resample_counts(10, 100, seed=0)
    assert counts.shape == (100, 10) and (counts.sum(axis=1) == 10).all()
    assert (resample_counts(10, 100, seed=0) == counts).all()


def _seed_spread_case(recalled: tuple[int, ...], n: int = 60, resamples: int = 2000):
    """Baseline perfect; combination seed k finds the objects of the first ``recalled[k]`` images."""
    gt = _one_box_per_image(n)
    counts = resample_counts(n, resamples, seed=3)
    baseline = ap_samples(match_images(gt, _perfect(range(1, n + 1))), counts)
    combinations = [ap_samples(match_images(gt, _perfect(range(1, m + 1))), counts) for m in recalled]
    return combinations, [baseline] * len(recalled)


def test_two_level_statistic_draws_seed_pairs_within_each_image_resample():
    combinations, baselines = _seed_spread_case((20, 40, 55), resamples=300)
    delta = paired_delta(combinations, baselines, seed=7)
    by_seed = np.stack([v.resampled.mean(axis=1) - b.resampled.mean(axis=1) for v, b in zip(combinations, baselines)])
    drawn = seed_draws(3, 300, seed=7)
    expected = np.array([by_seed[drawn[r], r].mean() for r in range(300)])
    assert delta.resampled == pytest.approx(expected, abs=1e-12)
    assert sorted(np.unique(drawn)) == [0, 1, 2]


def test_seed_spread_widens_the_interval_beyond_the_image_only_one():
    """Three seeds far apart: the image-only interval is the sampling error of their mean; the
    two-level interval adds the seed spread, so it contains the image-only one and is wider."""
    combinations, baselines = _seed_spread_case((20, 40, 55))
    delta = paired_delta(combinations, baselines)
    assert delta.ci_low < delta.image_ci_low < delta.delta < delta.image_ci_high < delta.ci_high
    assert (delta.ci_high - delta.ci_low) > 1.5 * (delta.image_ci_high - delta.image_ci_low)


def test_one_seed_two_level_equals_image_only():
    combinations, baselines = _seed_spread_case((40,))
    delta = paired_delta(combinations, baselines)
    assert (delta.ci_low, delta.ci_high) == (delta.image_ci_low, delta.image_ci_high)


@pytest.mark.parametrize("low, high, expected", [(0.1, 0.5, "reproduced"), (-0.5, -0.1, "contradicted"),
                                                 (-0.1, 0.5, "not resolved"), (0.0, 0.5, "not resolved"),
                                                 (-0.4, 0.3, "equivalent"), (-0.5, 0.3, "not resolved"),
                                                 (0.1, 0.3, "reproduced"), (-0.3, -0.1, "contradicted")])
def test_verdicts_read_the_interval(low, high, expected):
    assert verdict(low, high, rope=0.5) == expected


def test_high_iou_statistic_selects_its_thresholds_by_value():
    """With AP at each IoU threshold equal to the threshold, the statistic is (0.80 + 0.90) / 2 - 0.50."""
    ap = np.array(IOU_THRESHOLDS) * np.array([[1.0], [0.5]])  # [2, T]: AP = t and AP = t / 2
    assert high_iou_gain_over_ap50(ap) == pytest.approx([0.35, 0.175], abs=1e-12)


def test_claims_are_tested_where_both_combinations_ran_and_get_their_verdict():
    """IS finds every object (AP 1) and the baseline those of the first 30 of 60 images, seeds 0
    and 1: 'IS > baseline' is reproduced; nothing else was run, so no other claim is tested."""
    from types import SimpleNamespace

    from pipeline.plan.params import ReportConfig
    from pipeline.report.build import evaluate_claims
    from pipeline.report.guards import BaselineLearning

    n = 60
    gt = _one_box_per_image(n)
    counts = resample_counts(n, 500, seed=0)
    perfect, half = (ap_samples(match_images(gt, _perfect(range(1, m + 1))), counts) for m in (n, n // 2))
    results, samples = [], {}
    for combination, sample in (("IS", perfect), ("baseline", half)):
        for seed in (0, 1):
            name = f"faster_rcnn/{combination}/seed{seed}"
            plan = SimpleNamespace(detector="faster_rcnn", combination=combination, seed=seed, name=name)
            results.append(SimpleNamespace(name=name, plan=plan))
            samples[name] = sample
    learning = {"faster_rcnn": BaselineLearning("faster_rcnn", (0, 1), (100 * 51 / 101,) * 2, (0.0, 0.0))}
    tested = evaluate_claims(results, samples, ReportConfig(bootstrap_resamples=500), learning, [])
    assert [c.claim.key for c in tested] == ["frcnn_IS_gt_baseline"]
    assert tested[0].delta.delta == pytest.approx(1 - 51 / 101)
    assert tested[0].verdict == "reproduced" and tested[0].adjusted_verdict == "reproduced"
    # one claim: the Bonferroni interval is the normal 95% one; identical seeds: no seed part of the SE
    sd = 100 * np.std(tested[0].delta.resampled, ddof=1)
    assert (tested[0].adjusted_low, tested[0].adjusted_high) == pytest.approx(
        (100 * tested[0].delta.delta - 1.959964 * sd, 100 * tested[0].delta.delta + 1.959964 * sd))
    assert tested[0].split.seed_sd == pytest.approx(0) and tested[0].split.images == n


def test_bonferroni_intervals_widen_with_the_number_of_claims_and_verdicts_follow():
    """Two claims at 95%: each adjusted interval is Δ ± z(1 - 0.05/4) · sd; a claim whose plain interval
    excludes 0 but whose adjusted one does not is reproduced alone, not resolved in the family."""
    from pipeline.plan.params import ReportConfig
    from pipeline.report.claims import CLAIMS, assess_claims

    rng = np.random.default_rng(0)
    resampled = 0.01 + 0.0048 * rng.standard_normal(4000)  # Δ = 1 AP point, sd 0.48: 95% excludes 0, 98.75% not
    low, high = np.quantile(resampled, [0.025, 0.975])
    delta = PairedDelta(0.01, low, high, low, high, (0.01, 0.01), resampled, resampled, 100)
    results = assess_claims([(CLAIMS[0], delta), (CLAIMS[1], delta)], {"faster_rcnn": 40.0}, ReportConfig())
    z = 2.241403  # norm.ppf(1 - 0.05 / 4)
    sd = 100 * np.std(resampled, ddof=1)
    for result in results:
        assert (result.adjusted_low, result.adjusted_high) == pytest.approx((1 - z * sd, 1 + z * sd), abs=1e-4)
        assert result.verdict == "reproduced" and result.adjusted_verdict == "not resolved"
