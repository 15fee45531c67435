import ast
import dataclasses
import inspect

import pytest
import torch

from detection.components import (
    CombinedSampler,
    InstanceBalancedPositiveSampler,
    IoUBalancedNegativeSampler,
    IoUHistogram,
    RandomNegativeSampler,
    RandomPositiveSampler,
)
from detection.components import sampler as sampler_module, sampling as sampling_module
from detection.config import IoUBalancedSamplingConfig
from detection.models.faster_rcnn import build_negative_sampler


def negative(**fields) -> IoUBalancedNegativeSampler:
    """The IoU-balanced negative sampler of the config's settings (the defaults of detection/config.py but ``fields``)."""
    return build_negative_sampler(IoUBalancedSamplingConfig(enabled=True, **fields))


def spread(counts_and_ranges, seed=0) -> torch.Tensor:
    """IoUs with a known number of values in each ``(count, low, high)`` range, shuffled."""
    generator = torch.Generator().manual_seed(seed)
    parts = [
        low + (high - low) * torch.rand(count, generator=generator)
        for count, low, high in counts_and_ranges
    ]
    values = torch.cat(parts)
    return values[torch.randperm(values.numel(), generator=generator)]


def histogram(iou: torch.Tensor, mask: torch.Tensor, edges: list[float]) -> list[int]:
    """Selected entries per bin ``[e_i, e_{i+1})``, the last bin closed."""
    selected = iou[mask]
    counts = []
    for i, (low, high) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        upper = selected <= high if i == len(edges) - 2 else selected < high
        counts.append(int(((selected >= low) & upper).sum()))
    return counts


def one_image(iou: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return iou[None], torch.ones(1, iou.numel(), dtype=torch.bool)


def generators(count: int = 10):
    return [torch.Generator().manual_seed(seed) for seed in range(count)]


# Negatives spanning [0, 0.45]: bins of width 0.15 under bin_range="negatives".
EDGES = [0.0, 0.15, 0.30, 0.45]


def test_each_bin_gives_its_share():
    iou = torch.cat(
        [spread([(100, 0.01, 0.14), (50, 0.16, 0.29), (40, 0.31, 0.44)]), torch.tensor([0.45])]
    )
    sampler = negative(num_bins=3)
    for generator in generators():
        mask = sampler(*one_image(iou), 60, generator)[0]
        assert histogram(iou, mask, EDGES) == [20, 20, 20]


def test_short_bin_gives_all_and_rest_is_filled_from_others():
    iou = torch.cat(
        [spread([(100, 0.01, 0.14), (50, 0.16, 0.29), (4, 0.31, 0.44)]), torch.tensor([0.45])]
    )
    sampler = negative(num_bins=3)
    fills = []
    for generator in generators(30):
        counts = histogram(iou, sampler(*one_image(iou), 60, generator)[0], EDGES)
        assert counts[2] == 5 and counts[0] >= 20 and counts[1] >= 20 and sum(counts) == 60
        fills.append(counts[0] - 20)
    # The 15 filled at random come from 80 unused in bin 0 and 30 in bin 1: 80/110 on average.
    assert sum(fills) / len(fills) == pytest.approx(15 * 80 / 110, abs=1.5)


def test_floor_above_zero():
    # Floor [0, 0.1); bins over [0.1, 0.4]: [0.1, 0.2), [0.2, 0.3), [0.3, 0.4].
    iou = torch.cat(
        [
            spread([(300, 0.0, 0.099), (40, 0.11, 0.19), (40, 0.21, 0.29), (40, 0.31, 0.39)]),
            torch.tensor([0.4]),
        ]
    )
    sampler = negative(num_bins=3, floor_thr=0.1, floor_fraction=0.4)
    for generator in generators():
        mask = sampler(*one_image(iou), 50, generator)[0]
        assert histogram(iou, mask, [0.0, 0.0999, 0.2, 0.3, 0.4]) == [20, 10, 10, 10]


def test_floor_at_zero():
    iou = torch.cat(
        [
            torch.zeros(300),
            spread([(40, 0.01, 0.09), (40, 0.11, 0.19), (40, 0.21, 0.29)]),
            torch.tensor([0.3]),
        ]
    )
    sampler = negative(num_bins=3, floor_thr=0.0, floor_fraction=0.4)
    for generator in generators():
        mask = sampler(*one_image(iou), 50, generator)[0]
        assert int((mask & (iou == 0)).sum()) == 20
        assert histogram(iou, mask & (iou > 0), [0.0, 0.1, 0.2, 0.3]) == [10, 10, 10]


def test_no_floor_ignores_floor_fraction():
    iou = torch.cat(
        [
            torch.zeros(300),
            spread([(40, 0.01, 0.09), (40, 0.11, 0.19), (40, 0.21, 0.29)]),
            torch.tensor([0.3]),
        ]
    )
    sampler = negative(num_bins=3, floor_thr=-1, floor_fraction=0.4)
    for generator in generators():
        mask = sampler(*one_image(iou), 60, generator)[0]
        assert histogram(iou, mask, [0.0, 0.1, 0.2, 0.3]) == [20, 20, 20]


def test_mmdet_bin_range_empties_upper_bins():
    negatives = torch.cat(
        [spread([(200, 0.01, 0.14), (60, 0.16, 0.29), (60, 0.31, 0.44)]), torch.tensor([0.45])]
    )
    iou = torch.cat([negatives, torch.tensor([0.9, 0.7])])  # two positives, not candidates
    candidates = torch.ones(1, iou.numel(), dtype=torch.bool)
    candidates[0, -2:] = False
    balanced = negative(num_bins=3, bin_range="negatives")
    mmdet = negative(num_bins=3, bin_range="mmdet")
    random_fill = []
    for generator in generators(30):
        mask = balanced(iou[None], candidates, 60, generator)[0]
        assert histogram(iou, mask, EDGES) == [20, 20, 20]
        # mmdet bins over [0, 0.9]: [0, .3), [.3, .6), [.6, .9]; the top one holds no negative.
        counts = histogram(
            iou, mmdet(iou[None], candidates, 60, generator)[0], [0.0, 0.3, 0.6, 0.9]
        )
        assert counts[0] >= 20 and counts[1] >= 20 and counts[2] == 0 and sum(counts) == 60
        random_fill.append(counts[0] - 20)
    # 20 filled at random from 240 unused in [0, .3) and 41 in [.3, .6).
    assert sum(random_fill) / len(random_fill) == pytest.approx(20 * 240 / 281, abs=1.5)


def test_mmdet_bin_range_ignores_invalid_entries():
    iou = torch.cat(
        [spread([(100, 0.01, 0.14), (50, 0.16, 0.29), (40, 0.31, 0.44)]), torch.tensor([0.45, 0.9])]
    )
    candidates = torch.ones(1, iou.numel(), dtype=torch.bool)
    candidates[0, -1] = False
    valid = candidates.clone()  # the 0.9 entry is padding
    sampler = negative(num_bins=3, bin_range="mmdet")
    mask = sampler(iou[None], candidates, 60, torch.Generator().manual_seed(0), valid=valid)[0]
    assert histogram(iou, mask, EDGES) == [20, 20, 20]


def random_batch(seed: int, batch: int = 4, size: int = 300):
    generator = torch.Generator().manual_seed(seed)
    iou = torch.rand(batch, size, generator=generator) ** 3
    candidates = (
        torch.rand(batch, size, generator=generator) < torch.linspace(0.05, 0.9, batch)[:, None]
    )
    gt_index = torch.randint(0, 7, (batch, size), generator=generator)
    gt_index[~candidates] = -1
    return iou, candidates, gt_index


SAMPLERS = {
    "iou_no_floor": lambda iou, cand, gt, num, gen: negative(num_bins=3)(
        iou, cand, num, gen
    ),
    "iou_floor": lambda iou, cand, gt, num, gen: negative(num_bins=3, floor_thr=0.05, floor_fraction=0.5)(
        iou, cand, num, gen
    ),
    "iou_zero_floor": lambda iou, cand, gt, num, gen: negative(num_bins=2, floor_thr=0.0, floor_fraction=0.3)(
        iou, cand, num, gen
    ),
    "iou_mmdet": lambda iou, cand, gt, num, gen: negative(num_bins=4, bin_range="mmdet")(
        iou, cand, num, gen
    ),
    "instance": lambda iou, cand, gt, num, gen: InstanceBalancedPositiveSampler()(
        gt, cand, num, gen
    ),
    "random": lambda iou, cand, gt, num, gen: RandomPositiveSampler()(gt, cand, num, gen),
}


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize(
    "num", [0, 40, torch.tensor([5, 100, 30, 500])], ids=["zero", "int", "per_image"]
)
def test_exact_count_only_candidates(name, num):
    for seed in range(5):
        iou, candidates, gt_index = random_batch(seed)
        mask = SAMPLERS[name](iou, candidates, gt_index, num, torch.Generator().manual_seed(seed))
        assert mask.dtype == torch.bool and mask.shape == candidates.shape
        assert not (mask & ~candidates).any()
        expected = torch.minimum(torch.as_tensor(num).expand(4), candidates.sum(1))
        assert torch.equal(mask.sum(1), expected)


@pytest.mark.parametrize("name", SAMPLERS)
def test_takes_all_when_too_few_candidates(name):
    iou, candidates, gt_index = random_batch(0, size=50)
    mask = SAMPLERS[name](iou, candidates, gt_index, 1000, torch.Generator().manual_seed(0))
    assert torch.equal(mask, candidates)


@pytest.mark.parametrize("name", SAMPLERS)
def test_stateless_same_seed_same_result(name):
    iou, candidates, gt_index = random_batch(3)
    first = SAMPLERS[name](iou, candidates, gt_index, 40, torch.Generator().manual_seed(7))
    for _ in range(3):
        again = SAMPLERS[name](iou, candidates, gt_index, 40, torch.Generator().manual_seed(7))
        assert torch.equal(first, again)
    other = SAMPLERS[name](iou, candidates, gt_index, 40, torch.Generator().manual_seed(8))
    assert not torch.equal(first, other)


def test_sampler_attributes_never_change():
    sampler = negative(num_bins=3, floor_thr=-1, floor_fraction=0.5)
    before = dataclasses.asdict(sampler)
    iou, candidates, _ = random_batch(0)
    sampler(iou, candidates, 40, torch.Generator().manual_seed(0))
    sampler(iou, candidates, 40, torch.Generator().manual_seed(1))
    assert dataclasses.asdict(sampler) == before
    with pytest.raises(dataclasses.FrozenInstanceError):
        sampler.floor_thr = 0.0


def test_padded_batch_matches_single_images():
    """Rows are independent: padding one image does not change what another can take."""
    short = torch.cat(
        [spread([(30, 0.01, 0.14), (30, 0.16, 0.29), (30, 0.31, 0.44)]), torch.tensor([0.45])]
    )
    long = torch.cat(
        [
            spread([(300, 0.01, 0.14), (60, 0.16, 0.29), (10, 0.31, 0.44)], seed=1),
            torch.tensor([0.45]),
        ]
    )
    iou = torch.zeros(2, long.numel())
    iou[0, : short.numel()] = short
    iou[1] = long
    candidates = torch.zeros_like(iou, dtype=torch.bool)
    candidates[0, : short.numel()] = True
    candidates[1] = True
    sampler = negative(num_bins=3)
    for generator in generators():
        mask = sampler(iou, candidates, torch.tensor([30, 60]), generator)
        assert histogram(short, mask[0, : short.numel()], EDGES) == [10, 10, 10]
        counts = histogram(long, mask[1], EDGES)
        assert counts[1] >= 20 and counts[2] == 11 and sum(counts) == 60
        assert not mask[0, short.numel() :].any()


def test_one_bin_without_floor_is_uniform_random():
    rows = 400
    iou = (torch.rand(1, 1000, generator=torch.Generator().manual_seed(0)) ** 4).expand(rows, -1)
    candidates = torch.ones(rows, 1000, dtype=torch.bool)
    mask = negative(num_bins=1)(
        iou, candidates, 100, torch.Generator().manual_seed(1)
    )
    deciles = torch.bucketize(iou[0], torch.linspace(0, 1, 11)[1:-1])
    observed = torch.bincount(deciles, weights=mask.sum(0).double(), minlength=10)
    expected = torch.bincount(deciles, minlength=10).double() * rows * 100 / 1000
    chi_square = ((observed - expected) ** 2 / expected)[expected > 0].sum()
    assert chi_square < 27.9  # 9 degrees of freedom, p = 0.001
    per_entry = mask.double().mean(0)
    assert (per_entry - 0.1).abs().max() < 0.08  # every entry selected with probability 0.1


def test_random_negative_sampler_draws_what_one_bin_without_floor_draws():
    iou, candidates, gt_index = random_batch(3)
    num = torch.tensor([5, 100, 30, 500])
    one_bin = negative(num_bins=1, floor_thr=-1.0)(iou, candidates, num, torch.Generator().manual_seed(7))
    uniform = RandomNegativeSampler()(iou, candidates, num, torch.Generator().manual_seed(7))
    assert torch.equal(one_bin, uniform)
    assert torch.equal(uniform.sum(1), torch.minimum(num, candidates.sum(1)))


def test_instance_balanced_spreads_over_ground_truths():
    sizes = [200, 100, 50, 40]
    gt_index = torch.cat([torch.full((size,), gt) for gt, size in enumerate(sizes)])[None]
    candidates = torch.ones_like(gt_index, dtype=torch.bool)
    instance, uniform = InstanceBalancedPositiveSampler(), RandomPositiveSampler()
    random_counts = torch.zeros(4)
    for generator in generators(40):
        per_gt = torch.bincount(
            gt_index[instance(gt_index, candidates, 64, generator)], minlength=4
        )
        # round(64 / 4) + 1 = 17 each, trimmed at random from 68 to 64.
        assert per_gt.sum() == 64 and per_gt.max() <= 17 and per_gt.min() >= 13
        random_counts += torch.bincount(
            gt_index[uniform(gt_index, candidates, 64, generator)], minlength=4
        )
    proportions = torch.tensor(sizes) / sum(sizes)
    torch.testing.assert_close(random_counts / random_counts.sum(), proportions, atol=0.02, rtol=0)


def test_instance_balanced_small_ground_truth_gives_all_then_top_up():
    sizes = [200, 100, 5]
    gt_index = torch.cat([torch.full((size,), gt + 10) for gt, size in enumerate(sizes)])[None]
    candidates = torch.ones_like(gt_index, dtype=torch.bool)
    for generator in generators():
        mask = InstanceBalancedPositiveSampler()(gt_index, candidates, 60, generator)
        per_gt = torch.bincount(gt_index[mask] - 10, minlength=3)
        # 21 each from the two large ones, all 5 from the small one, 13 topped up at random.
        assert per_gt[2] == 5 and per_gt[0] >= 21 and per_gt[1] >= 21 and per_gt.sum() == 60


def combined_image(short_top_bin: bool = False):
    """One image: 300 positives on 4 GTs (200/50/30/20), then negatives as in the bin tests."""
    negatives = torch.cat(
        [
            spread([(100, 0.01, 0.14), (50, 0.16, 0.29), (4 if short_top_bin else 40, 0.31, 0.44)]),
            torch.tensor([0.45]),
        ]
    )
    iou = torch.cat([torch.full((300,), 0.8), negatives])[None]
    gt_index = torch.cat(
        [torch.full((size,), gt) for gt, size in enumerate([200, 50, 30, 20])]
        + [torch.zeros(negatives.numel(), dtype=torch.long)]
    )[None]
    positives = iou >= 0.5
    return iou, gt_index, positives, ~positives


def test_combined_sampler_draws_both_sets_like_the_separate_samplers():
    iou, gt_index, positives, negatives = combined_image()
    sampler = CombinedSampler(InstanceBalancedPositiveSampler(), negative(num_bins=3))
    for generator in generators():
        pos, neg = sampler(iou, gt_index, positives, negatives, 40, 60, generator)
        assert not (pos & ~positives).any() and not (neg & ~negatives).any()
        assert histogram(iou[0], neg[0], EDGES) == [20, 20, 20]
        per_gt = torch.bincount(gt_index[pos], minlength=4)
        # round(40 / 4) + 1 = 11 each, trimmed at random from 44 to 40.
        assert per_gt.sum() == 40 and per_gt.max() <= 11 and per_gt.min() >= 7


def test_combined_sampler_fills_each_set_from_its_own_unused_candidates():
    iou, gt_index, positives, negatives = combined_image(short_top_bin=True)
    sampler = CombinedSampler(RandomPositiveSampler(), negative(num_bins=3))
    fills, first_gt = [], []
    for generator in generators(30):
        pos, neg = sampler(iou, gt_index, positives, negatives, torch.tensor([40]), 60, generator)
        counts = histogram(iou[0], neg[0], EDGES)
        assert counts[2] == 5 and sum(counts) == 60 and int(pos.sum()) == 40
        fills.append(counts[0] - 20)
        first_gt.append(int((gt_index[pos] == 0).sum()))
    # As in the single-sampler test: 15 filled from 80 unused in bin 0 and 30 in bin 1.
    assert sum(fills) / len(fills) == pytest.approx(15 * 80 / 110, abs=1.5)
    # Uniform positives: 200 of the 300 belong to the first ground truth.
    assert sum(first_gt) / len(first_gt) == pytest.approx(40 * 200 / 300, abs=1.5)


def test_combined_sampler_is_stateless_and_checks_its_inputs():
    iou, gt_index, positives, negatives = combined_image()
    sampler = CombinedSampler(InstanceBalancedPositiveSampler(), negative(num_bins=3))
    first = sampler(iou, gt_index, positives, negatives, 40, 60, torch.Generator().manual_seed(4))
    again = sampler(iou, gt_index, positives, negatives, 40, 60, torch.Generator().manual_seed(4))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    with pytest.raises(ValueError, match="disjoint"):
        sampler(iou, gt_index, positives, positives | negatives, 40, 60)
    with pytest.raises(ValueError, match="gt_index"):
        sampler(iou, gt_index.float(), positives, negatives, 40, 60)


def test_source_uses_no_python_sets_and_output_stays_on_device():
    trees = [ast.parse(inspect.getsource(module)) for module in (sampler_module, sampling_module)]
    for node in (node for tree in trees for node in ast.walk(tree)):
        assert not isinstance(node, (ast.Set, ast.SetComp))
        assert not (
            isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "set"
        )
        assert not (isinstance(node, (ast.Import, ast.ImportFrom)) and "numpy" in ast.unparse(node))
    iou, candidates, gt_index = random_batch(0)
    assert negative()(iou, candidates, 10).device == iou.device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda():
    iou, candidates, gt_index = (t.cuda() for t in random_batch(0))
    generator = torch.Generator(device="cuda").manual_seed(0)
    num = torch.tensor([5, 100, 30, 500], device="cuda")
    for sampler in (
        negative(num_bins=3, floor_thr=0.0, floor_fraction=0.25),
        negative(num_bins=3, bin_range="mmdet"),
    ):
        mask = sampler(iou, candidates, num, generator)
        assert mask.is_cuda and torch.equal(mask.sum(1), torch.minimum(num, candidates.sum(1)))
    mask = InstanceBalancedPositiveSampler()(gt_index, candidates, 40, generator)
    assert mask.is_cuda and not (mask & ~candidates).any()
    pos, neg = CombinedSampler(InstanceBalancedPositiveSampler(), negative())(
        iou, gt_index, candidates & (iou >= 0.5), candidates & (iou < 0.5), 10, num, generator
    )
    assert pos.is_cuda and neg.is_cuda and not (pos & neg).any()
    first = negative()(
        iou, candidates, 40, torch.Generator(device="cuda").manual_seed(3)
    )
    again = negative()(
        iou, candidates, 40, torch.Generator(device="cuda").manual_seed(3)
    )
    assert torch.equal(first, again)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"num_bins": 0}, "num_bins"),
        ({"floor_thr": -0.5}, "floor_thr"),
        ({"floor_thr": 1.0}, "floor_thr"),
        ({"floor_fraction": 1.5}, "floor_fraction"),
        ({"bin_range": "all"}, "bin_range"),
    ],
)
def test_invalid_configuration(kwargs, message):
    with pytest.raises(ValueError, match=message):
        IoUBalancedNegativeSampler(**{**dataclasses.asdict(negative()), **kwargs})


def test_invalid_inputs():
    iou, candidates, gt_index = random_batch(0)
    sampler = negative()
    with pytest.raises(ValueError, match="shape"):
        sampler(iou[0], candidates[0], 10)
    with pytest.raises(ValueError, match="bool"):
        sampler(iou, candidates.long(), 10)
    with pytest.raises(ValueError, match="non-negative"):
        sampler(iou, candidates, -1)
    with pytest.raises(ValueError, match="num must be"):
        sampler(iou, candidates, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="integer"):
        InstanceBalancedPositiveSampler()(gt_index.float(), candidates, 10)


def test_iou_histogram_counts_merges_and_saves():
    histogram_ = IoUHistogram()
    assert histogram_.edges.shape == (21,) and histogram_.counts.shape == (20,)
    histogram_.update(torch.tensor([0.0, 0.01, 0.049, 0.05, 0.5, 0.97, 1.0, -0.1, 1.2]))
    expected = torch.zeros(20, dtype=torch.long)
    expected[0], expected[1], expected[10], expected[19] = 3, 1, 1, 2
    assert torch.equal(histogram_.counts, expected)

    other = IoUHistogram()
    other.update(torch.tensor([[0.01, 0.02]]))
    histogram_.merge(other)
    assert histogram_.counts[0] == 5

    restored = IoUHistogram()
    restored.load_state_dict(histogram_.state_dict())
    assert torch.equal(restored.counts, histogram_.counts)
    with pytest.raises(ValueError, match="edges"):
        histogram_.merge(IoUHistogram(num_bins=10))
    histogram_.reset()
    assert histogram_.counts.sum() == 0
