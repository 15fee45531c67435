"""Batched, stateless proposal samplers from Libra R-CNN (Pang et al., CVPR 2019).

Every sampler works on a whole padded batch at once: entries are ``[B, N]`` tensors, one row per
image, and padding entries are simply not candidates. Selection is done with one group-rank
primitive: a random permutation gives every entry a distinct priority, every row is sorted by
(group id, priority), and an entry's rank inside its group is its sorted position minus the
position where its group starts.
Taking the entries whose rank is below a per-group quota is then a uniform random draw of that
many entries from every group, without Python loops, sets or host synchronisation.

Randomness comes only from the ``generator`` argument (which must live on the tensors' device),
so the same generator state always gives the same selection; no sampler changes its attributes.
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "IoUBalancedNegativeSampler",
    "InstanceBalancedPositiveSampler",
    "RandomPositiveSampler",
    "IoUHistogram",
]

# Sort key of entries that take no part in a ranking: after every active entry, all tied.
_INACTIVE = torch.iinfo(torch.int64).max


def _random_ranks(group: Tensor, active: Tensor, generator: torch.Generator | None) -> Tensor:
    """Uniformly random rank of each active entry among the active entries of its row in its group.

    The priorities are a random permutation of the whole batch, so the keys
    ``group * B·N + priority`` are unique, each row's order within a group is uniform and
    independent of the other rows, and the sort needs no stability to be deterministic.
    Inactive entries share one key, which also keeps them cheap for the sort.

    Args:
        group: int64 ``[B, N]`` group ids.
        active: bool ``[B, N]``, the entries to rank; the ranks of the others are meaningless.

    Returns:
        int64 ``[B, N]``: within every (row, group) the active entries' ranks are a random
        permutation of ``0 .. count - 1``.
    """
    rows, width = group.shape
    size = rows * width
    priority = torch.randperm(size, generator=generator, device=group.device).view(rows, width)
    order = torch.where(active, group * size + priority, _INACTIVE).argsort(dim=1)
    sorted_group = group.gather(1, order)
    position = torch.arange(width, device=group.device).expand_as(order)
    starts_group = torch.ones_like(sorted_group, dtype=torch.bool)
    starts_group[:, 1:] = sorted_group[:, 1:] != sorted_group[:, :-1]
    group_start = torch.where(starts_group, position, 0).cummax(dim=1).values
    return torch.empty_like(order).scatter_(1, order, position - group_start)


def _fill(
    preferred: Tensor, candidates: Tensor, num: Tensor, generator: torch.Generator | None
) -> Tensor:
    """Pick ``num[b]`` candidates of row ``b``: preferred ones first, then the others, at random.

    If a row has more than ``num[b]`` preferred candidates, a random ``num[b]`` of them are kept
    (a random trim); otherwise all are kept and the rest is a random draw from the other
    candidates (a random top-up).
    """
    preferred = preferred & candidates
    rank = _random_ranks((~preferred).long(), candidates, generator)
    num = num[:, None]
    from_others = num - preferred.sum(dim=1, keepdim=True)
    return candidates & torch.where(preferred, rank < num, rank < from_others)


def _clipped_num(num: Tensor | int, candidates: Tensor) -> Tensor:
    """Per-image number to take: ``min(num_b, number of candidates_b)`` as int64 ``[B]``."""
    if isinstance(num, int) and num < 0:
        raise ValueError(f"num must be non-negative, got {num}")
    available = candidates.sum(dim=1)
    wanted = torch.as_tensor(num, dtype=torch.long, device=candidates.device)
    if wanted.dim() > 1 or (wanted.dim() == 1 and wanted.shape[0] != available.shape[0]):
        raise ValueError(
            f"num must be an int or a tensor of shape [{available.shape[0]}], got shape "
            f"{tuple(wanted.shape)}"
        )
    return torch.minimum(wanted, available)


def _check_batch(values: Tensor, candidates: Tensor, values_name: str) -> None:
    if values.dim() != 2 or values.shape != candidates.shape:
        raise ValueError(
            f"{values_name} and candidates must both have shape [B, N], got "
            f"{tuple(values.shape)} and {tuple(candidates.shape)}"
        )
    if candidates.dtype != torch.bool:
        raise ValueError(f"candidates must be a bool tensor, got {candidates.dtype}")


@dataclass(frozen=True)
class IoUBalancedNegativeSampler:
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
    """

    num_bins: int = 3
    floor_thr: float = -1.0
    floor_fraction: float = 0.0
    bin_range: str = "negatives"

    def __post_init__(self) -> None:
        if not isinstance(self.num_bins, int) or self.num_bins < 1:
            raise ValueError(f"num_bins must be a positive int, got {self.num_bins!r}")
        if not (self.floor_thr == -1 or 0 <= self.floor_thr < 1):
            raise ValueError(f"floor_thr must be -1 (no floor) or in [0, 1), got {self.floor_thr}")
        if not 0 <= self.floor_fraction <= 1:
            raise ValueError(f"floor_fraction must be in [0, 1], got {self.floor_fraction}")
        if self.bin_range not in ("negatives", "mmdet"):
            raise ValueError(f"bin_range must be 'negatives' or 'mmdet', got {self.bin_range!r}")

    def __call__(
        self,
        max_iou: Tensor,
        candidates: Tensor,
        num: Tensor | int,
        generator: torch.Generator | None = None,
        valid: Tensor | None = None,
    ) -> Tensor:
        """Select negatives for a batch.

        Args:
            max_iou: float ``[B, N]``, each entry's largest IoU with any ground truth.
            candidates: bool ``[B, N]``, entries eligible as negatives (False on padding).
            num: negatives wanted per image, an int or int64 ``[B]``.
            generator: source of randomness, on ``max_iou``'s device.
            valid: bool ``[B, N]``, the real (non-padding) entries; used only by
                ``bin_range="mmdet"`` to find each image's largest IoU. Defaults to all entries.

        Returns:
            bool ``[B, N]`` with exactly ``min(num_b, candidates_b.sum())`` True entries per row.
        """
        _check_batch(max_iou, candidates, "max_iou")
        num = _clipped_num(num, candidates)
        k = self.num_bins

        if self.floor_thr > 0:
            in_floor = max_iou < self.floor_thr
        elif self.floor_thr == 0:
            in_floor = max_iou == 0
        else:
            in_floor = torch.zeros_like(candidates)
        binned = candidates & ~in_floor

        if self.bin_range == "negatives":
            spans_bins = binned
        else:
            spans_bins = torch.ones_like(candidates) if valid is None else valid
        lo = max(self.floor_thr, 0.0)
        hi = torch.where(spans_bins, max_iou, -torch.inf).amax(dim=1, keepdim=True)
        bins_per_iou = torch.where(hi > lo, k / (hi - lo), 0.0)
        # Truncation is the floor here: binned entries have IoU >= lo.
        bin_index = ((max_iou - lo) * bins_per_iou).clamp(0, k - 1).long()

        rank = _random_ranks(torch.where(in_floor, 0, bin_index + 1), candidates, generator)

        if self.floor_thr >= 0:
            floor_quota = (num * self.floor_fraction).long()
        else:
            floor_quota = torch.zeros_like(num)
        bin_quota = torch.div(num - floor_quota, k, rounding_mode="floor")
        quota = torch.where(in_floor, floor_quota[:, None], bin_quota[:, None])
        return _fill(candidates & (rank < quota), candidates, num, generator)


@dataclass(frozen=True)
class RandomPositiveSampler:
    """Uniform random sampling of positives (the Faster R-CNN default)."""

    def __call__(
        self,
        gt_index: Tensor,
        candidates: Tensor,
        num: Tensor | int,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Select ``min(num_b, candidates_b.sum())`` candidates of each image uniformly at random.

        ``gt_index`` is accepted (and shape-checked) only so that this sampler can replace
        :class:`InstanceBalancedPositiveSampler`.
        """
        _check_batch(gt_index, candidates, "gt_index")
        num = _clipped_num(num, candidates)
        return _fill(torch.zeros_like(candidates), candidates, num, generator)


@dataclass(frozen=True)
class InstanceBalancedPositiveSampler:
    """Instance-balanced positive sampling (Libra R-CNN; mmdet's ``InstanceBalancedPosSampler``).

    Per image with ``n`` positives wanted and ``n_gt`` distinct ground truths among its
    candidates: if it has no more candidates than ``n``, all are taken; otherwise each ground
    truth gives up to ``round(n / n_gt) + 1`` of its candidates at random, and the result is
    trimmed at random to ``n`` or topped up at random from the unused candidates.
    """

    def __call__(
        self,
        gt_index: Tensor,
        candidates: Tensor,
        num: Tensor | int,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Select positives for a batch.

        Args:
            gt_index: integer ``[B, N]``, the ground truth each entry is assigned to; ignored
                where not a candidate.
            candidates: bool ``[B, N]``, entries eligible as positives (False on padding).
            num: positives wanted per image, an int or int64 ``[B]``.
            generator: source of randomness, on ``gt_index``'s device.

        Returns:
            bool ``[B, N]`` with exactly ``min(num_b, candidates_b.sum())`` True entries per row.
        """
        _check_batch(gt_index, candidates, "gt_index")
        if gt_index.is_floating_point() or gt_index.dtype == torch.bool:
            raise ValueError(f"gt_index must be an integer tensor, got {gt_index.dtype}")
        num = _clipped_num(num, candidates)
        rank = _random_ranks(gt_index.long(), candidates, generator)
        num_gt = (candidates & (rank == 0)).sum(dim=1).clamp_min(1)
        per_gt = torch.round(num / num_gt).long() + 1
        return _fill(candidates & (rank < per_gt[:, None]), candidates, num, generator)


class IoUHistogram(nn.Module):
    """Counts of IoU values over fixed equal-width bins, kept as buffers (saved in state_dict).

    Bins are ``[e_i, e_{i+1})`` over ``edges``, the last one closed; values outside
    ``[edges[0], edges[-1]]`` are not counted. Meant for recording the IoUs of sampled
    negatives; updating never synchronises with the host.
    """

    edges: Tensor
    counts: Tensor

    def __init__(self, num_bins: int = 20, low: float = 0.0, high: float = 1.0) -> None:
        super().__init__()
        if num_bins < 1 or not low < high:
            raise ValueError(f"need num_bins >= 1 and low < high, got {num_bins}, {low}, {high}")
        self.register_buffer("edges", torch.linspace(low, high, num_bins + 1))
        self.register_buffer("counts", torch.zeros(num_bins, dtype=torch.long))

    def update(self, iou_values: Tensor) -> None:
        """Add every value of ``iou_values`` (any shape) to the counts."""
        values = iou_values.detach().flatten().to(self.edges)
        inside = (values >= self.edges[0]) & (values <= self.edges[-1])
        num_bins = self.counts.numel()
        index = torch.bucketize(values, self.edges[1:-1], right=True)
        # Values outside the edges go to an extra bin that is dropped: no host sync, deterministic.
        index = torch.where(inside, index, num_bins)
        self.counts += torch.bincount(index, minlength=num_bins + 1)[:num_bins]

    def merge(self, other: "IoUHistogram") -> None:
        """Add the counts of another histogram with the same edges."""
        if not torch.equal(self.edges, other.edges.to(self.edges)):
            raise ValueError("cannot merge IoU histograms with different edges")
        self.counts += other.counts.to(self.counts)

    def reset(self) -> None:
        """Set all counts to zero."""
        self.counts.zero_()
