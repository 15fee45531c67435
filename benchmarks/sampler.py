"""Benchmark: batched torch samplers vs a per-image numpy + Python-set reference.

Both sample a batch of R-CNN proposals the same way (instance-balanced positives, IoU-balanced
negatives); the reference works one image at a time, as mmdet's samplers do (``np.random.choice``
per bin, set differences), after copying the IoUs to the host. Prints human-readable lines, then
one JSON object on the last line.

    python benchmarks/sampler.py --device cpu
    python benchmarks/sampler.py --device cuda --step-seconds 0.45
"""

import argparse
import json
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from torchvision.ops import box_iou

from detection.components import (
    CombinedSampler,
    InstanceBalancedPositiveSampler,
    IoUBalancedNegativeSampler,
)
from detection.config import IoUBalancedSamplingConfig, RoIHeadsConfig

POSITIVE_IOU = 0.5


def make_batch(
    images: int, proposals: int, seed: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Max IoU and assigned GT of proposals: 60% jittered around 2-20 GTs, 40% random boxes."""
    generator = torch.Generator().manual_seed(seed)
    max_iou, gt_index = [], []
    for _ in range(images):
        num_gt = int(torch.randint(2, 21, (1,), generator=generator))
        centers = torch.rand(num_gt, 2, generator=generator) * 800
        sizes = 20 + torch.rand(num_gt, 2, generator=generator) * 280
        gts = torch.cat([centers - sizes / 2, centers + sizes / 2], dim=1)

        jittered = int(proposals * 0.6)
        owner = torch.randint(0, num_gt, (jittered,), generator=generator)
        shift = torch.randn(jittered, 2, generator=generator) * 0.3 * sizes[owner]
        scale = torch.exp(torch.randn(jittered, 2, generator=generator) * 0.3)
        near_centers, near_sizes = centers[owner] + shift, sizes[owner] * scale
        random_centers = torch.rand(proposals - jittered, 2, generator=generator) * 800
        random_sizes = 10 + torch.rand(proposals - jittered, 2, generator=generator) * 300
        all_centers = torch.cat([near_centers, random_centers])
        all_sizes = torch.cat([near_sizes, random_sizes])
        boxes = torch.cat([all_centers - all_sizes / 2, all_centers + all_sizes / 2], dim=1)

        iou, index = box_iou(boxes, gts).max(dim=1)
        max_iou.append(iou)
        gt_index.append(index)
    return torch.stack(max_iou).to(device), torch.stack(gt_index).to(device)


def ours(
    max_iou: torch.Tensor,
    gt_index: torch.Tensor,
    samples: int,
    positive_fraction: float,
    negative_sampler: IoUBalancedNegativeSampler,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole batch in one call; returns (positive mask, negative mask)."""
    positives = max_iou >= POSITIVE_IOU
    num_pos = positives.sum(dim=1).clamp(max=int(samples * positive_fraction))
    sampler = CombinedSampler(InstanceBalancedPositiveSampler(), negative_sampler)
    return sampler(max_iou, gt_index, positives, ~positives, num_pos, samples - num_pos, generator)


def _indices(values: set[int]) -> np.ndarray:
    return np.fromiter(values, dtype=np.int64, count=len(values))


def reference_positives(
    gt_index: np.ndarray, pos_inds: np.ndarray, num: int, rng: np.random.Generator
) -> np.ndarray:
    if len(pos_inds) <= num:
        return pos_inds
    gts = np.unique(gt_index[pos_inds])
    per_gt = int(round(num / len(gts)) + 1)
    sampled = []
    for gt in gts:
        inds = pos_inds[gt_index[pos_inds] == gt]
        sampled.append(rng.choice(inds, per_gt, replace=False) if len(inds) > per_gt else inds)
    chosen = np.concatenate(sampled)
    if len(chosen) < num:
        extra = _indices(set(pos_inds.tolist()) - set(chosen.tolist()))
        chosen = np.concatenate([chosen, rng.choice(extra, num - len(chosen), replace=False)])
    elif len(chosen) > num:
        chosen = rng.choice(chosen, num, replace=False)
    return chosen


def reference_negatives(
    max_iou: np.ndarray,
    neg_inds: np.ndarray,
    num: int,
    sampler: IoUBalancedNegativeSampler,
    rng: np.random.Generator,
) -> np.ndarray:
    """Same algorithm as IoUBalancedNegativeSampler (bin_range="negatives"), with sets."""
    if len(neg_inds) <= num:
        return neg_inds
    negatives = set(neg_inds.tolist())
    floor_thr, k = sampler.floor_thr, sampler.num_bins
    if floor_thr > 0:
        floor_set = set(np.where(max_iou < floor_thr)[0].tolist()) & negatives
    elif floor_thr == 0:
        floor_set = set(np.where(max_iou == 0)[0].tolist()) & negatives
    else:
        floor_set = set()
    binned = negatives - floor_set
    num_floor = int(np.floor(num * sampler.floor_fraction)) if floor_thr >= 0 else 0

    chosen: set[int] = set()
    if floor_set:
        floor_list = _indices(floor_set)
        chosen |= set(
            rng.choice(floor_list, min(num_floor, len(floor_list)), replace=False).tolist()
        )
    if binned:
        low = max(floor_thr, 0.0)
        high = float(max_iou[_indices(binned)].max())
        width = (high - low) / k
        per_bin = (num - num_floor) // k
        for i in range(k):
            start, end = low + i * width, low + (i + 1) * width
            upper = max_iou <= high if i == k - 1 else max_iou < end
            start_ok = max_iou >= start if i > 0 else max_iou >= low
            in_bin = _indices(set(np.where(start_ok & upper)[0].tolist()) & binned)
            if len(in_bin) > per_bin:
                in_bin = rng.choice(in_bin, per_bin, replace=False)
            chosen |= set(in_bin.tolist())
    if len(chosen) < num:
        rest = _indices(negatives - chosen)
        chosen |= set(rng.choice(rest, num - len(chosen), replace=False).tolist())
    return _indices(chosen)


def reference(
    max_iou: torch.Tensor,
    gt_index: torch.Tensor,
    samples: int,
    positive_fraction: float,
    negative_sampler: IoUBalancedNegativeSampler,
    rng: np.random.Generator,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One image at a time on the host; sampled indices go back to the IoUs' device."""
    device = max_iou.device
    iou_host, gt_host = max_iou.cpu().numpy(), gt_index.cpu().numpy()
    positives, negatives = [], []
    for iou, gts in zip(iou_host, gt_host, strict=True):
        pos_inds = np.where(iou >= POSITIVE_IOU)[0]
        neg_inds = np.where(iou < POSITIVE_IOU)[0]
        pos = reference_positives(gts, pos_inds, int(samples * positive_fraction), rng)
        neg = reference_negatives(iou, neg_inds, samples - len(pos), negative_sampler, rng)
        positives.append(torch.as_tensor(pos, device=device))
        negatives.append(torch.as_tensor(neg, device=device))
    return positives, negatives


def bin_counts(
    max_iou: torch.Tensor, neg_mask: torch.Tensor, sampler: IoUBalancedNegativeSampler
) -> list[int]:
    """Sampled negatives per [floor, bin 1, ..., bin K] over the batch.

    Both selections are binned by the sampler's own grouping, so they are measured with one ruler;
    the reference's selection itself shares no code with ours.
    """
    index = sampler.groups(max_iou, max_iou < POSITIVE_IOU, None)
    return torch.bincount(index[neg_mask], minlength=sampler.num_bins + 1).tolist()


def median_ms(
    functions: list[Callable[[], object]], device: torch.device, warmup: int, repeats: int
) -> list[float]:
    """Median wall time of each function, timed in alternation so that all see the same load."""

    def timed(function: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(warmup):
        for function in functions:
            timed(function)
    times = [[timed(function) for function in functions] for _ in range(repeats)]
    return [statistics.median(column) * 1000 for column in zip(*times, strict=True)]


def counts_agree(ours_counts: list[list[int]], reference_counts: list[list[int]]) -> bool:
    """Per-bin means agree within 5 standard errors (exactly when both are deterministic)."""
    a, b = np.array(ours_counts, dtype=float), np.array(reference_counts, dtype=float)
    tolerance = 5 * np.sqrt(a.var(axis=0) / len(a) + b.var(axis=0) / len(b))
    return bool(np.all(np.abs(a.mean(axis=0) - b.mean(axis=0)) <= tolerance + 1e-9))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="where the IoUs live and ours runs"
    )
    parser.add_argument("--images", type=int, default=8, help="images per batch")
    parser.add_argument("--proposals", type=int, default=2000, help="proposals per image")
    heads, sampling = RoIHeadsConfig(), IoUBalancedSamplingConfig()  # the defaults of detection/config.py
    parser.add_argument("--samples", type=int, default=heads.batch_size_per_image,
                        help="sampled RoIs per image (default: model.roi_heads.batch_size_per_image)")
    parser.add_argument("--positive-fraction", type=float, default=heads.positive_fraction,
                        help="share of positives wanted (default: model.roi_heads.positive_fraction)")
    parser.add_argument("--num-bins", type=int, default=sampling.num_bins,
                        help="IoU bins K of the negative sampler (default: the config's)")
    parser.add_argument("--floor-thr", type=float, default=sampling.floor_thr,
                        help="floor threshold (-1 no floor, 0, or >0; default: the config's)")
    parser.add_argument("--floor-fraction", type=float, default=sampling.floor_fraction,
                        help="share of negatives from the floor (default: the config's)")
    parser.add_argument("--repeats", type=int, default=50, help="timed repeats (median reported)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed warm-up calls")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch's default)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and both samplers")
    parser.add_argument(
        "--step-seconds",
        type=float,
        default=None,
        help="seconds of one training step, for the sampler's share",
    )
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    sampler = IoUBalancedNegativeSampler(args.num_bins, args.floor_thr, args.floor_fraction, "negatives")
    max_iou, gt_index = make_batch(args.images, args.proposals, args.seed, device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    def call_ours() -> tuple[torch.Tensor, torch.Tensor]:
        return ours(max_iou, gt_index, args.samples, args.positive_fraction, sampler, generator)

    def call_reference() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return reference(max_iou, gt_index, args.samples, args.positive_fraction, sampler, rng)

    ours_ms, reference_ms = median_ms(
        [call_ours, call_reference], device, args.warmup, args.repeats
    )

    ours_counts, reference_counts = [], []
    for _ in range(args.repeats):
        ours_counts.append(bin_counts(max_iou, call_ours()[1], sampler))
        reference_mask = torch.zeros_like(max_iou, dtype=torch.bool)
        for image, indices in enumerate(call_reference()[1]):
            reference_mask[image, indices] = True
        reference_counts.append(bin_counts(max_iou, reference_mask, sampler))
    match = counts_agree(ours_counts, reference_counts)
    share = ours_ms / 1000 / args.step_seconds if args.step_seconds else None

    positives = (max_iou >= POSITIVE_IOU).sum(dim=1).tolist()
    threads = torch.get_num_threads()
    print(f"device {device}, {threads} threads, {args.images} images x {args.proposals} proposals")
    print(f"positive candidates per image: {positives}")
    print(f"K={args.num_bins}, floor_thr={args.floor_thr}, floor_fraction={args.floor_fraction}")
    print(
        "mean sampled negatives per [floor, bins...]: "
        f"ours {np.mean(ours_counts, axis=0).round(1).tolist()}, "
        f"reference {np.mean(reference_counts, axis=0).round(1).tolist()}"
    )
    print(
        f"ours (batched torch): {ours_ms:.2f} ms; reference (numpy + sets): {reference_ms:.2f} ms; "
        f"ratio {reference_ms / ours_ms:.1f}x"
    )
    print(
        json.dumps(
            {
                "device": str(device),
                "ours_ms": round(ours_ms, 3),
                "reference_ms": round(reference_ms, 3),
                "ratio": round(reference_ms / ours_ms, 2),
                "bin_counts_match": match,
                "sampler_share_of_step": share,
            }
        )
    )


if __name__ == "__main__":
    main()
