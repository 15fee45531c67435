"""Batched, stateless proposal samplers from Libra R-CNN (Pang et al., CVPR 2019).

Every sampler works on a whole padded batch at once: entries are ``[B, N]`` tensors, one row per
image, and padding entries are simply not candidates. A draw has two steps, without Python
loops, sets or host synchronisation:

1. Group quotas. A random permutation gives every entry a distinct priority, every row is sorted
   by (group id, priority), and an entry's rank inside its group is its sorted position minus
   the position where its group starts. Entries ranked below their group's quota are a uniform
   random draw of that many from every group.
2. Fill. Each sampler's pool keeps, by a fresh random priority, its quota entries first and then
   others up to the number wanted: a selection (``kthvalue``), not a second sort.

Samplers whose candidates are disjoint (positives and negatives: :class:`CombinedSampler`)
share both steps, so a whole R-CNN batch costs one sort and one selection.

Randomness comes only from the ``generator`` argument (which must live on the tensors' device),
so the same generator state always gives the same selection; no sampler changes its attributes.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "CombinedSampler",
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
    preferred: Tensor, pool: Tensor, candidates: Tensor, num: Tensor, generator: torch.Generator | None
) -> Tensor:
    """Pick ``num[b, p]`` candidates of pool ``p`` in row ``b``: preferred ones first, then at random.

    If a pool has more than ``num[b, p]`` preferred candidates, a random ``num[b, p]`` of them are
    kept (a random trim); otherwise all are kept and the rest is a random draw from the pool's
    other candidates (a random top-up). Both come from one rule: every candidate gets the unique
    key ``is_other · B·N + priority`` (priorities a random permutation) and each pool keeps its
    ``num`` smallest keys.

    The ``num``-th smallest key is found by selection, not sorting. ``kthvalue`` takes one ``k``
    for all rows, so each (row, pool) is padded with ``N - num`` keys below every real key, which
    makes its wanted key the ``N``-th smallest.

    Args:
        preferred: bool ``[B, N]``.
        pool: int64 ``[B, N]`` pool ids in ``0 .. P - 1``.
        candidates: bool ``[B, N]``.
        num: int64 ``[B, P]``, at most the pool's number of candidates.
    """
    rows, width = pool.shape
    size = rows * width
    device = pool.device
    priority = torch.randperm(size, generator=generator, device=device).view(rows, 1, width)
    in_pool = candidates[:, None] & (pool[:, None] == torch.arange(num.shape[1], device=device)[:, None])
    key = torch.where(in_pool, (~preferred[:, None]).long() * size + priority, _INACTIVE)
    padding = torch.where(torch.arange(width, device=device) < width - num[..., None], -1, _INACTIVE)
    threshold = torch.cat([padding, key], dim=2).kthvalue(width, dim=2).values
    return (key <= threshold[..., None]).any(dim=1)


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


class _QuotaSampler:
    """A sampler that takes up to a quota at random from each group, then fills to ``num``.

    Subclasses say how entries are grouped (:meth:`groups`) and how many each group may give
    (:meth:`quota`); :func:`_sample_disjoint` does the drawing, for one sampler or several.
    """

    values_name = "values"

    def groups(self, values: Tensor, candidates: Tensor, valid: Tensor | None) -> Tensor:
        """int64 ``[B, N]`` group id of every entry (meaningless where not a candidate)."""
        raise NotImplementedError

    def quota(self, group: Tensor, rank: Tensor, candidates: Tensor, num: Tensor) -> Tensor:
        """int64, broadcastable to ``[B, N]``: how many of each entry's group to take first.

        ``rank`` is each candidate's uniformly random rank inside its group, ``num`` int64 ``[B]``.
        """
        raise NotImplementedError

    def check(self, values: Tensor, candidates: Tensor) -> None:
        _check_batch(values, candidates, self.values_name)

    def __call__(
        self,
        values: Tensor,
        candidates: Tensor,
        num: Tensor | int,
        generator: torch.Generator | None = None,
        valid: Tensor | None = None,
    ) -> Tensor:
        self.check(values, candidates)
        return _sample_disjoint([(self, values, candidates, num)], generator, valid)[0]


def _sample_disjoint(
    parts: Sequence[tuple[_QuotaSampler, Tensor, Tensor, Tensor | int]],
    generator: torch.Generator | None,
    valid: Tensor | None,
) -> list[Tensor]:
    """Run several samplers, given as ``(sampler, values, candidates, num)``, on one batch.

    Their candidate sets must be disjoint: every (sampler, group) pair then becomes one group of
    a single ranking, and every sampler one pool of a single fill, so the whole draw costs one
    sort and one selection however many samplers share it.
    """
    count = len(parts)
    nums = [_clipped_num(num, candidates) for _, _, candidates, num in parts]
    groups = [sampler.groups(values, cand, valid) for sampler, values, cand, _ in parts]
    pool = torch.zeros_like(groups[0])
    group = torch.zeros_like(groups[0])
    any_candidate = torch.zeros_like(parts[0][2])
    for index, ((_, _, candidates, _), own_group) in enumerate(zip(parts, groups, strict=True)):
        pool = torch.where(candidates, index, pool)
        group = torch.where(candidates, own_group * count + index, group)
        any_candidate |= candidates

    rank = _random_ranks(group, any_candidate, generator)
    preferred = torch.zeros_like(any_candidate)
    for (sampler, _, candidates, _), own_group, num in zip(parts, groups, nums, strict=True):
        preferred |= candidates & (rank < sampler.quota(own_group, rank, candidates, num))

    keep = _fill(preferred, pool, any_candidate, torch.stack(nums, dim=1), generator)
    return [keep & candidates for _, _, candidates, _ in parts]


@dataclass(frozen=True)
class IoUBalancedNegativeSampler(_QuotaSampler):
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


class _PositiveSampler(_QuotaSampler):
    values_name = "gt_index"

    def check(self, values: Tensor, candidates: Tensor) -> None:
        super().check(values, candidates)
        if values.is_floating_point() or values.dtype == torch.bool:
            raise ValueError(f"gt_index must be an integer tensor, got {values.dtype}")


@dataclass(frozen=True)
class RandomPositiveSampler(_PositiveSampler):
    """Uniform random sampling of positives (the Faster R-CNN default).

    Called like :class:`InstanceBalancedPositiveSampler`, which it can replace; ``gt_index`` is
    only shape-checked.
    """

    def groups(self, values: Tensor, candidates: Tensor, valid: Tensor | None) -> Tensor:
        return torch.zeros_like(values, dtype=torch.long)

    def quota(self, group: Tensor, rank: Tensor, candidates: Tensor, num: Tensor) -> Tensor:
        return num[:, None]


@dataclass(frozen=True)
class InstanceBalancedPositiveSampler(_PositiveSampler):
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


PositiveSampler = RandomPositiveSampler | InstanceBalancedPositiveSampler


@dataclass(frozen=True)
class CombinedSampler:
    """Positive and negative sampling of a batch of proposals in one draw (mmdet's
    ``CombinedSampler``), with the same result distribution as calling the two samplers apart.

    Positives and negatives are disjoint, so both samplers share one ranking sort and one fill
    selection instead of one of each per sampler. Checking that the two sets are disjoint is the
    one host synchronisation.
    """

    positive: PositiveSampler
    negative: IoUBalancedNegativeSampler

    def __call__(
        self,
        max_iou: Tensor,
        gt_index: Tensor,
        positives: Tensor,
        negatives: Tensor,
        num_pos: Tensor | int,
        num_neg: Tensor | int,
        generator: torch.Generator | None = None,
        valid: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Select positives and negatives for a batch.

        Args:
            max_iou: float ``[B, N]``, each entry's largest IoU with any ground truth.
            gt_index: integer ``[B, N]``, the ground truth each entry is assigned to.
            positives, negatives: disjoint bool ``[B, N]`` candidate sets.
            num_pos, num_neg: how many of each to take per image, an int or int64 ``[B]``.
            generator: source of randomness, on the tensors' device.
            valid: bool ``[B, N]``, the real (non-padding) entries, for ``bin_range="mmdet"``.

        Returns:
            The positive and the negative selection, bool ``[B, N]`` each.
        """
        self.positive.check(gt_index, positives)
        self.negative.check(max_iou, negatives)
        if bool((positives & negatives).any()):
            raise ValueError("positives and negatives must be disjoint candidate sets")
        pos, neg = _sample_disjoint(
            [(self.positive, gt_index, positives, num_pos), (self.negative, max_iou, negatives, num_neg)],
            generator,
            valid,
        )
        return pos, neg


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
