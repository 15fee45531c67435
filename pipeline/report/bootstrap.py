"""Paired bootstrap over validation images for the AP difference of a variant and its baseline.

Every resample draws the validation images with replacement (multinomial counts); the *same*
resample is applied to the variant's and the baseline's detections, so what varies between
resamples is only which images are evaluated, and the image-to-image variation both detectors
share cancels in the difference. With several seeds, the statistic of one resample is the mean
over seeds of ``AP(variant, seed s) - AP(baseline, seed s)`` (runs paired by seed), so the
interval covers the image sampling of the seed-averaged difference; the spread over seeds is
reported separately as a standard deviation. The interval is the percentile interval of the
resampled statistic.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from pipeline.report.per_image import ImageMatches, average_precision


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


def ap_samples(matches: ImageMatches, counts: np.ndarray) -> APSamples:
    """AP of ``matches`` on the full set and on every resample of ``counts`` (see :func:`resample_counts`)."""
    fingerprint = hashlib.sha256(np.asarray(matches.image_ids, dtype=np.int64).tobytes()
                                 + np.ascontiguousarray(counts, dtype=np.int64).tobytes()).hexdigest()
    return APSamples(average_precision(matches)[0], average_precision(matches, counts), fingerprint)


@dataclass(frozen=True)
class PairedDelta:
    """AP difference (variant - baseline) in AP units (fractions, not percent)."""

    delta: float
    """Seed-averaged difference on the full validation set."""
    ci_low: float
    ci_high: float
    per_seed: tuple[float, ...]
    """The difference for each seed pair (full set)."""
    resampled: np.ndarray
    """[R] the statistic of each resample."""

    @property
    def seed_sd(self) -> float:
        """Sample standard deviation of the per-seed differences (NaN with one seed)."""
        return float(np.std(self.per_seed, ddof=1)) if len(self.per_seed) > 1 else float("nan")


def _pick(ap: np.ndarray, metric: slice | int) -> np.ndarray:
    picked = ap[..., metric]
    return picked if isinstance(metric, int) else picked.mean(axis=-1)


def paired_delta(variant: list[APSamples], baseline: list[APSamples], confidence: float = 0.95,
                 metric: slice | int = slice(None)) -> PairedDelta:
    """ΔAP of ``variant`` over ``baseline`` with a paired percentile bootstrap interval.

    ``variant[s]`` and ``baseline[s]`` are the samples of seed ``s`` of each, all made with the
    same resample counts. ``metric`` picks IoU thresholds of the AP per threshold: all (COCO AP,
    the default), ``0`` for AP50, ``5`` for AP75.
    """
    if len(variant) != len(baseline) or not variant:
        raise ValueError(f"need the same non-zero number of variant and baseline runs, got {len(variant)} and {len(baseline)}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if len({s.resampling for s in (*variant, *baseline)}) != 1:
        raise ValueError("the runs were resampled differently (other images or other counts); cannot pair them")
    per_seed = tuple(float(_pick(v.full, metric) - _pick(b.full, metric)) for v, b in zip(variant, baseline))
    resampled = np.mean([_pick(v.resampled, metric) - _pick(b.resampled, metric)
                         for v, b in zip(variant, baseline)], axis=0)
    tail = (1 - confidence) / 2
    finite = resampled[np.isfinite(resampled)]
    low, high = np.quantile(finite, [tail, 1 - tail]) if finite.size else (np.nan, np.nan)
    return PairedDelta(float(np.mean(per_seed)), float(low), float(high), per_seed, resampled)
