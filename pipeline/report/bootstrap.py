"""Paired two-level bootstrap for the AP difference of a combination and its baseline.

Two sources of variation separate a measured ΔAP from the true one: which validation images were
evaluated, and the training run's luck (its seed). The interval covers both, in one bootstrap:

* images: every resample draws the validation images with replacement (multinomial counts), and
  the *same* draw is applied to the combination and the baseline of every seed, because all runs are
  evaluated on the one validation set; image-to-image variation the runs share cancels in ΔAP;
* seeds: within the same resample the seed pairs are drawn with replacement (combination seed k stays
  paired with baseline seed k), and the statistic is the mean ΔAP over the drawn pairs.

The interval is the percentile interval of the resampled statistic. The image-only interval (all
seed pairs in every resample) is kept beside it. With S seeds the seed level has only S distinct
values per pair, so with few seeds the interval is coarse and, like every bootstrap over S items,
somewhat narrow (the resampled variance is (S - 1) / S of the sample variance).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy.stats import norm

from pipeline.report.per_image import ImageMatches, average_precision
from pipeline.report.power import VarianceSplit


def resample_counts(num_images: int, resamples: int, seed: int) -> np.ndarray:
    """[R, I] how often each image is drawn in each of ``resamples`` draws of ``num_images`` images."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, num_images, size=(resamples, num_images))
    counts = np.zeros((resamples, num_images), dtype=np.int64)
    np.add.at(counts, (np.arange(resamples)[:, None], draws), 1)
    return counts


@dataclass(frozen=True)
class APSamples:
    """A run's COCO AP per IoU threshold on the full validation set and on each resample."""

    full: np.ndarray
    """[T]"""
    resampled: np.ndarray
    """[R, T]"""
    resampling: str
    """Fingerprint of the images and resample counts, so that only paired samples are compared."""
    num_images: int


def ap_samples(matches: ImageMatches, counts: np.ndarray) -> APSamples:
    """AP of ``matches`` on the full set and on every resample of ``counts`` (see :func:`resample_counts`)."""
    fingerprint = hashlib.sha256(np.asarray(matches.image_ids, dtype=np.int64).tobytes()
                                 + np.ascontiguousarray(counts, dtype=np.int64).tobytes()).hexdigest()
    return APSamples(average_precision(matches)[0], average_precision(matches, counts), fingerprint,
                     matches.num_images)


@dataclass(frozen=True)
class PairedDelta:
    """AP difference (combination - baseline) in AP units (fractions, not percent)."""

    delta: float
    """Seed-averaged difference on the full validation set."""
    ci_low: float
    ci_high: float
    """Two-level (seeds and images) percentile interval."""
    image_ci_low: float
    image_ci_high: float
    """Image-only percentile interval: every seed pair in every resample."""
    per_seed: tuple[float, ...]
    """The difference for each seed pair (full set)."""
    resampled: np.ndarray
    """[R] the two-level statistic of each resample."""
    image_resampled: np.ndarray
    """[R] the image-only statistic of each resample (the mean over every seed pair)."""
    num_images: int
    """How many validation images the runs were evaluated on."""

    @property
    def seed_sd(self) -> float:
        """Sample standard deviation of the per-seed differences (NaN with one seed)."""
        return float(np.std(self.per_seed, ddof=1)) if len(self.per_seed) > 1 else float("nan")

    def normal_interval(self, confidence: float) -> tuple[float, float]:
        """delta ± z · (sd of the two-level resamples) at ``confidence``: for the far tails of a
        multiplicity-adjusted interval, which a percentile of a thousand resamples would rest on a few of."""
        z = float(norm.ppf(1 - (1 - confidence) / 2))
        sd = float(np.std(self.resampled[np.isfinite(self.resampled)], ddof=1))
        return self.delta - z * sd, self.delta + z * sd

    def variance_split(self) -> VarianceSplit:
        """The seed and image parts of the difference's standard error, in AP points."""
        image_se = float(np.std(self.image_resampled[np.isfinite(self.image_resampled)], ddof=1))
        return VarianceSplit(100 * self.seed_sd, 100 * image_se, len(self.per_seed), self.num_images)


Statistic = Callable[[np.ndarray], np.ndarray]
"""AP per IoU threshold [..., T] -> one number per leading index [...]."""


def coco_ap(ap: np.ndarray) -> np.ndarray:
    """COCO AP: the mean over the IoU thresholds 0.50:0.95."""
    return ap.mean(axis=-1)


def _percentile_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1 - confidence) / 2
    finite = values[np.isfinite(values)]
    if not finite.size:
        return float("nan"), float("nan")
    low, high = np.quantile(finite, [tail, 1 - tail])
    return float(low), float(high)


def seed_draws(num_seeds: int, resamples: int, seed: int) -> np.ndarray:
    """[R, S] indices of the seed pairs drawn (with replacement) in each resample."""
    return np.random.default_rng([seed, 1]).integers(0, num_seeds, size=(resamples, num_seeds))


def paired_delta(combination: list[APSamples], baseline: list[APSamples], confidence: float = 0.95,
                 statistic: Statistic = coco_ap, seed: int = 0) -> PairedDelta:
    """Δ ``statistic`` of ``combination`` over ``baseline`` with the two-level and the image-only interval.

    ``combination[s]`` and ``baseline[s]`` are the samples of seed ``s`` of each, all made with the
    same image resample counts; ``seed`` seeds the draws of seed pairs. ``statistic`` maps AP per
    IoU threshold to the compared number: COCO AP by default, e.g. ``lambda ap: ap[..., 0]`` for AP50.
    """
    if len(combination) != len(baseline) or not combination:
        raise ValueError(f"need the same non-zero number of combination and baseline runs, "
                         f"got {len(combination)} and {len(baseline)}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if len({s.resampling for s in (*combination, *baseline)}) != 1:
        raise ValueError("the runs were resampled differently (other images or other counts); cannot pair them")
    per_seed = tuple(float(statistic(c.full) - statistic(b.full)) for c, b in zip(combination, baseline))
    by_seed = np.stack([statistic(c.resampled) - statistic(b.resampled)
                        for c, b in zip(combination, baseline)])  # [S, R]
    resamples = by_seed.shape[1]
    drawn = seed_draws(len(per_seed), resamples, seed)
    two_level = by_seed[drawn, np.arange(resamples)[:, None]].mean(axis=1)
    low, high = _percentile_interval(two_level, confidence)
    image_only = by_seed.mean(axis=0)
    image_low, image_high = _percentile_interval(image_only, confidence)
    return PairedDelta(float(np.mean(per_seed)), low, high, image_low, image_high, per_seed, two_level, image_only,
                       combination[0].num_images)
