"""What an ablation design can detect: the standard error of a claim's difference, split into its seed
and image parts, the minimum detectable effect, and the seeds and images a target effect needs.

For a difference averaged over S paired seeds on one validation set of N images,

    SE² = s² / S + v · N0 / N

where s is the standard deviation of the per-seed differences (training noise; the same validation
set for every seed) and v is the bootstrap variance over image resamples of the seed-averaged
difference measured on the N0 images the runs were evaluated on. More seeds shrink only the first
part; more validation images only the second (every run sees the same images, so their variation
does not average out over seeds). s is measured on N0 images and keeps the part of the training
noise that shows only on those images, so the seed part is an upper bound for larger sets.

The minimum detectable effect of a two-sided test at level 1 - confidence with the given power is

    MDE = (z_{1 - (1 - confidence)/2} + z_{power}) · SE

(normal approximation: 2.80 · SE for 95% and 80% power).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy.stats import norm


def mde_factor(confidence: float, power: float) -> float:
    """z_{1-(1-confidence)/2} + z_power."""
    if not (0 < confidence < 1 and 0 < power < 1):
        raise ValueError(f"confidence and power must be in (0, 1), got {confidence} and {power}")
    return float(norm.ppf(1 - (1 - confidence) / 2) + norm.ppf(power))


@dataclass(frozen=True)
class VarianceSplit:
    """A claim's difference as measured: its per-seed spread and its image variance, in AP points."""

    seed_sd: float
    """Standard deviation of the per-seed differences (NaN with one seed)."""
    image_se: float
    """Standard error from the validation images: bootstrap sd of the seed-averaged difference."""
    seeds: int
    images: int

    @property
    def seed_se(self) -> float:
        return self.seed_sd / math.sqrt(self.seeds)

    @property
    def images_only(self) -> bool:
        """One seed: the seed part is unknown, so the standard error is its image part alone (a lower bound)."""
        return math.isnan(self.seed_sd)

    def se(self, seeds: int | None = None, images: float | None = None) -> float:
        """Standard error with ``seeds`` seeds and ``images`` validation images (default: as measured);
        the image part alone when :attr:`images_only`."""
        seeds = seeds or self.seeds
        images = images or self.images
        seed_variance = 0.0 if self.images_only else self.seed_sd ** 2 / seeds
        return math.sqrt(seed_variance + self.image_se ** 2 * self.images / images)

    def mde(self, confidence: float, power: float, seeds: int | None = None, images: float | None = None) -> float:
        return mde_factor(confidence, power) * self.se(seeds, images)

    def seeds_needed(self, target_mde: float, confidence: float, power: float,
                     images: float | None = None) -> int | None:
        """The fewest seeds whose MDE is ≤ ``target_mde`` with ``images`` validation images (inf: the seed
        part alone); None when the image part alone exceeds it or the seed spread is unknown."""
        if target_mde <= 0:
            raise ValueError(f"target MDE must be > 0, got {target_mde}")
        images = images or self.images
        allowed = (target_mde / mde_factor(confidence, power)) ** 2 - self.image_se ** 2 * self.images / images
        if allowed <= 0 or self.images_only:
            return None
        return max(2, math.ceil(self.seed_sd ** 2 / allowed))

    def images_needed(self, target_mde: float, confidence: float, power: float, seeds: int) -> float | None:
        """The fewest validation images whose MDE is ≤ ``target_mde`` with ``seeds`` seeds; None when the
        seed part alone exceeds it."""
        allowed = (target_mde / mde_factor(confidence, power)) ** 2 - self.seed_sd ** 2 / seeds
        if allowed <= 0 or self.images_only:
            return None
        return math.ceil(self.image_se ** 2 * self.images / allowed)


def read_splits(metrics: dict) -> dict[str, VarianceSplit]:
    """Per tested claim's key, the variance split a report's ``metrics.json`` (its ``claims``) recorded (a
    claim not testable has none)."""
    from pipeline.report.claims import NOT_TESTABLE  # claims imports this module

    splits = {}
    for key, claim in metrics.get("claims", {}).items():
        if claim.get("verdict") == NOT_TESTABLE:
            continue
        try:
            splits[key] = VarianceSplit(float(claim.get("seed_sd", math.nan)), float(claim["se_image"]),
                                        int(claim["seeds"]), int(claim["images"]))
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"claims.{key}: no se_image/seeds/images; the report predates the power "
                             "columns, rerun `libra report`") from None
    return splits


def power_plan(splits: dict[str, VarianceSplit], target_mde: float, confidence: float, power: float,
               images: list[float]) -> list[dict[str, object]]:
    """Per claim: its MDE as measured, and for each count of validation images in ``images`` the seeds a
    target MDE needs (None: unreachable, the image part alone exceeds it)."""
    return [{"claim": key, "seeds": split.seeds, "images": split.images, "mde": split.mde(confidence, power),
             "seeds_needed": {n: split.seeds_needed(target_mde, confidence, power, n) for n in images}}
            for key, split in splits.items()]
