"""Libra R-CNN's IoU-balanced samplers (Pang et al., CVPR 2019, Sec. 3.1).

Both are groups and quotas on the shared batched draw of :mod:`detection.components.sampling`:
IoU-balanced negative sampling groups negatives by IoU bin, instance-balanced positive sampling
groups positives by their ground truth. Randomness comes only from the ``generator`` argument.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from detection.components.sampling import PositiveSampler, QuotaSampler

__all__ = ["IoUBalancedNegativeSampler", "InstanceBalancedPositiveSampler"]


@dataclass(frozen=True)
class IoUBalancedNegativeSampler(QuotaSampler):
    """IoU-balanced negative sampling (Libra R-CNN, CVPR 2019, Sec. 3.1).

    Per image, with ``n`` negatives wanted: if it has no more candidates than ``n``, all are
    taken. Otherwise ``⌊floor_fraction · n⌋`` come at random from the floor set and the rest
    from the binned set, split into ``num_bins`` equal-width IoU bins that each give
    ``⌊(n - n_floor) / K⌋`` entries at random (all they hold if fewer); the shortfall is filled
    at random from the candidates not yet taken. The floor set is IoU in ``[0, floor_thr)`` if
    ``floor_thr > 0``, IoU ``== 0`` if ``floor_thr == 0``, and empty if ``floor_thr == -1``
    (then ``floor_fraction`` is ignored). With ``num_bins=1, floor_thr=-1`` this is plain
    uniform random sampling.

    Bins span ``[lo, hi]`` with ``lo = max(floor_thr, 0)``; the top bin is closed, so the
    largest IoU belongs to it. ``bin_range="negatives"`` (the paper's intent) sets ``hi`` to the
    image's largest candidate IoU; ``"mmdet"`` sets it to the largest IoU over all valid entries
    of the image (positives and ground-truth boxes included), as mmdet does, which leaves the
    bins above the negative IoU threshold empty and moves their share into the random fill.

    Unlike mmdet's ``IoUBalancedNegSampler`` the sampler keeps no state (mmdet rewrites its own
    ``floor_thr`` on the first call).

    Called as ``sampler(max_iou, candidates, num, generator=None, valid=None)``:

    - ``max_iou``: float ``[B, N]``, each entry's largest IoU with any ground truth;
    - ``candidates``: bool ``[B, N]``, entries eligible as negatives (False on padding);
    - ``num``: negatives wanted per image, an int or int64 ``[B]``;
    - ``generator``: source of randomness, on ``max_iou``'s device;
    - ``valid``: bool ``[B, N]``, the real (non-padding) entries; used only by
      ``bin_range="mmdet"`` to find each image's largest IoU. Defaults to all entries.

    Returns bool ``[B, N]`` with exactly ``min(num_b, candidates_b.sum())`` True entries per row.
    """

    num_bins: int
    floor_thr: float
    floor_fraction: float
    bin_range: str
    values_name = "max_iou"

    def __post_init__(self) -> None:
        if not isinstance(self.num_bins, int) or self.num_bins < 1:
            raise ValueError(f"num_bins must be a positive int, got {self.num_bins!r}")
        if not (self.floor_thr == -1 or 0 <= self.floor_thr < 1):
            raise ValueError(f"floor_thr must be -1 (no floor) or in [0, 1), got {self.floor_thr}")
        if not 0 <= self.floor_fraction <= 1:
            raise ValueError(f"floor_fraction must be in [0, 1], got {self.floor_fraction}")
        if self.bin_range not in ("negatives", "mmdet"):
            raise ValueError(f"bin_range must be 'negatives' or 'mmdet', got {self.bin_range!r}")

    def groups(self, values: Tensor, candidates: Tensor, valid: Tensor | None) -> Tensor:
        """0 for the floor set, ``1 .. K`` for the IoU bins."""
        max_iou, k = values, self.num_bins
        if self.floor_thr > 0:
            in_floor = max_iou < self.floor_thr
        elif self.floor_thr == 0:
            in_floor = max_iou == 0
        else:
            in_floor = torch.zeros_like(candidates)

        if self.bin_range == "negatives":
            spans_bins = candidates & ~in_floor
        else:
            spans_bins = torch.ones_like(candidates) if valid is None else valid
        lo = max(self.floor_thr, 0.0)
        hi = torch.where(spans_bins, max_iou, -torch.inf).amax(dim=1, keepdim=True)
        bins_per_iou = torch.where(hi > lo, k / (hi - lo), 0.0)
        # Truncation is the floor here: binned entries have IoU >= lo.
        bin_index = ((max_iou - lo) * bins_per_iou).clamp(0, k - 1).long()
        return torch.where(in_floor, 0, bin_index + 1)

    def quota(self, group: Tensor, rank: Tensor, candidates: Tensor, num: Tensor) -> Tensor:
        """``⌊floor_fraction · n⌋`` for the floor, ``⌊(n - n_floor) / K⌋`` for each bin."""
        if self.floor_thr >= 0:
            floor_quota = (num * self.floor_fraction).long()
        else:
            floor_quota = torch.zeros_like(num)
        bin_quota = torch.div(num - floor_quota, self.num_bins, rounding_mode="floor")
        return torch.where(group == 0, floor_quota[:, None], bin_quota[:, None])


@dataclass(frozen=True)
class InstanceBalancedPositiveSampler(PositiveSampler):
    """Instance-balanced positive sampling (Libra R-CNN; mmdet's ``InstanceBalancedPosSampler``).

    Per image with ``n`` positives wanted and ``n_gt`` distinct ground truths among its
    candidates: if it has no more candidates than ``n``, all are taken; otherwise each ground
    truth gives up to ``round(n / n_gt) + 1`` of its candidates at random, and the result is
    trimmed at random to ``n`` or topped up at random from the unused candidates.

    Called as ``sampler(gt_index, candidates, num, generator=None)``: ``gt_index`` integer
    ``[B, N]``, the ground truth each entry is assigned to (ignored where not a candidate);
    ``candidates`` bool ``[B, N]``; ``num`` an int or int64 ``[B]``; ``generator`` on
    ``gt_index``'s device. Returns bool ``[B, N]`` with exactly ``min(num_b, candidates_b.sum())``
    True entries per row.
    """

    def groups(self, values: Tensor, candidates: Tensor, valid: Tensor | None) -> Tensor:
        return values.long()

    def quota(self, group: Tensor, rank: Tensor, candidates: Tensor, num: Tensor) -> Tensor:
        num_gt = (candidates & (rank == 0)).sum(dim=1).clamp_min(1)
        return (torch.round(num / num_gt).long() + 1)[:, None]
