"""Power of the ablation design: MDE against its closed form and a simulation, seeds and images needed."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.report.power import VarianceSplit, mde_factor


def test_mde_factor_closed_form():
    assert mde_factor(0.95, 0.8) == pytest.approx(1.959964 + 0.841621, abs=1e-5)
    assert mde_factor(0.99, 0.9) == pytest.approx(2.575829 + 1.281552, abs=1e-5)
    with pytest.raises(ValueError, match="power"):
        mde_factor(0.95, 1.0)


def test_standard_error_splits_into_a_seed_and_an_image_part():
    split = VarianceSplit(seed_sd=1.2, image_se=0.6, seeds=3, images=96)
    assert split.seed_se == pytest.approx(1.2 / math.sqrt(3))
    assert split.se() == pytest.approx(math.sqrt(1.2 ** 2 / 3 + 0.6 ** 2))
    # 4x the images halves the image part; 4x the seeds halves the seed part
    assert split.se(images=384) == pytest.approx(math.sqrt(1.2 ** 2 / 3 + 0.3 ** 2))
    assert split.se(seeds=12) == pytest.approx(math.sqrt(1.2 ** 2 / 12 + 0.6 ** 2))
    assert split.mde(0.95, 0.8) == pytest.approx(mde_factor(0.95, 0.8) * split.se())


def test_seeds_and_images_needed_reach_the_target_and_no_fewer_would():
    split = VarianceSplit(seed_sd=1.2, image_se=0.6, seeds=3, images=96)
    for images in (96, 384, 1536, math.inf):
        seeds = split.seeds_needed(1.5, 0.95, 0.8, images)
        if seeds is None:
            assert split.mde(0.95, 0.8, 10 ** 9, images) > 1.5
            continue
        assert split.mde(0.95, 0.8, seeds, images) <= 1.5 + 1e-9
        assert seeds == 2 or split.mde(0.95, 0.8, seeds - 1, images) > 1.5
    assert split.seeds_needed(1.0, 0.95, 0.8, 96) is None  # the image part alone is 2.8 * 0.6 = 1.68 > 1.0
    images = split.images_needed(1.5, 0.95, 0.8, seeds=20)
    assert split.mde(0.95, 0.8, 20, images) <= 1.5 + 1e-9 < split.mde(0.95, 0.8, 20, images - 1)
    assert split.images_needed(0.5, 0.95, 0.8, seeds=3) is None  # the seed part alone exceeds it
    assert VarianceSplit(float("nan"), 0.1, 1, 96).seeds_needed(1.0, 0.95, 0.8) is None


def test_an_effect_of_the_mde_is_detected_with_the_stated_power():
    """Simulated designs: per-seed noise and a shared image effect with the split's sizes, true effect =
    the MDE; a two-sided 95% z-test then rejects in 80% of designs (binomial sd over 4000: 0.6%)."""
    split = VarianceSplit(seed_sd=1.0, image_se=0.4, seeds=5, images=200)
    rng = np.random.default_rng(0)
    designs = 4000
    effect = split.mde(0.95, 0.8)
    seed_noise = rng.normal(0, split.seed_sd, size=(designs, split.seeds)).mean(axis=1)
    image_noise = rng.normal(0, split.image_se, size=designs)
    observed = effect + seed_noise + image_noise
    rejected = np.abs(observed / split.se()) > 1.959964
    assert rejected.mean() == pytest.approx(0.8, abs=0.025)


def _metrics_file(path, claims):
    import json

    path.write_text(json.dumps({"claims": claims}))
    return path


def test_libra_plan_power_prints_the_seeds_a_target_needs(tmp_path):
    from conftest import libra

    split = VarianceSplit(seed_sd=1.2, image_se=0.6, seeds=3, images=96)
    report = _metrics_file(tmp_path / "metrics.json", {
        "c1": {"seed_sd": 1.2, "se_image": 0.6, "seeds": 3, "images": 96},
        "c2": {"seed_sd": 0.3, "se_image": 0.1, "seeds": 3, "images": 96}})
    out = libra("plan", "--power", "--report", str(report), "--target-mde", "2.0", "--images", "96", "inf").stdout
    seeds_c1 = split.seeds_needed(2.0, 0.95, 0.8, 96), split.seeds_needed(2.0, 0.95, 0.8, math.inf)
    assert seeds_c1[0] > seeds_c1[1] >= 2
    c1 = next(line for line in out.splitlines() if line.startswith("c1 ")).split()
    assert c1 == ["c1", f"{split.mde(0.95, 0.8):.2f}", str(seeds_c1[0]), str(seeds_c1[1])]
    assert f"every claim with 96 images: {seeds_c1[0]} seeds" in out
    unreachable = libra("plan", "--power", "--report", str(report), "--target-mde", "1.0", "--images", "96").stdout
    assert "every claim with 96 images: unreachable" in unreachable


@pytest.mark.parametrize("claims, message", [
    (None, "No such file"),
    ({"c1": {"delta": 1.0}}, "claims.c1: no se_image/seeds/images"),
    ({}, "no claim was tested"),
])
def test_libra_plan_power_bad_report_is_a_clear_error(tmp_path, claims, message):
    from conftest import libra

    report = tmp_path / "metrics.json"
    if claims is not None:
        _metrics_file(report, claims)
    proc = libra("plan", "--power", "--report", str(report), check=False)
    assert proc.returncode == 2 and message in proc.stderr and str(report) in proc.stderr
