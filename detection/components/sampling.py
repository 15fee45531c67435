"""Batched, stateless proposal sampling: the draw every sampler shares, and the random samplers.

This is shared training code: the baseline samples with :class:`RandomPositiveSampler` and
:class:`RandomNegativeSampler`; Libra R-CNN's IoU-balanced samplers
(:mod:`detection.components.sampler`) define only their groups and quotas on top of it.

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
    "QuotaSampler",
    "PositiveSampler",
    "UniformSampler",
    "RandomPositiveSampler",
    "RandomNegativeSampler",
    "CombinedSampler",
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


class QuotaSampler:
    """A sampler that takes up to a quota at random from each group, then fills to ``num``.

    Subclasses say how entries are grouped (:meth:`groups`) and how many each group may give
    (:meth:`quota`); :func:`sample_disjoint` does the drawing, for one sampler or several.
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
        return sample_disjoint([(self, values, candidates, num)], generator, valid)[0]


def sample_disjoint(
    parts: Sequence[tuple[QuotaSampler, Tensor, Tensor, Tensor | int]],
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


class PositiveSampler(QuotaSampler):
    """A sampler of positives: its values are the ground truth each entry is assigned to."""

    values_name = "gt_index"

    def check(self, values: Tensor, candidates: Tensor) -> None:
        super().check(values, candidates)
        if values.is_floating_point() or values.dtype == torch.bool:
            raise ValueError(f"gt_index must be an integer tensor, got {values.dtype}")


class UniformSampler(QuotaSampler):
    """Uniform random sampling: every candidate in one group, whose quota is the number wanted."""

    def groups(self, values: Tensor, candidates: Tensor, valid: Tensor | None) -> Tensor:
        return torch.zeros_like(values, dtype=torch.long)

    def quota(self, group: Tensor, rank: Tensor, candidates: Tensor, num: Tensor) -> Tensor:
        return num[:, None]


@dataclass(frozen=True)
class RandomPositiveSampler(PositiveSampler, UniformSampler):
    """Uniform random sampling of positives (the Faster R-CNN default).

    Called like :class:`detection.components.sampler.InstanceBalancedPositiveSampler`, which it
    can replace; ``gt_index`` is only shape-checked.
    """


@dataclass(frozen=True)
class RandomNegativeSampler(UniformSampler):
    """Uniform random sampling of negatives (the Faster R-CNN default).

    Called like :class:`detection.components.sampler.IoUBalancedNegativeSampler`, which it can
    replace; ``max_iou`` is only shape-checked. It draws what that sampler draws with one bin and
    no floor set.
    """

    values_name = "max_iou"


@dataclass(frozen=True)
class CombinedSampler:
    """Positive and negative sampling of a batch of proposals in one draw (mmdet's
    ``CombinedSampler``), with the same result distribution as calling the two samplers apart.

    Positives and negatives are disjoint, so both samplers share one ranking sort and one fill
    selection instead of one of each per sampler. Checking that the two sets are disjoint is the
    one host synchronisation.
    """

    positive: PositiveSampler
    negative: QuotaSampler

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
        pos, neg = sample_disjoint(
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
