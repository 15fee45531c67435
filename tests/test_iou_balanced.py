import pytest
import torch

from detection.components import (
    IoUBalancedLocWeight,
    iou_balanced_cls_weights,
    iou_balanced_loc_weights,
)


def positives(seed: int = 0, count: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    iou = torch.rand(count, generator=generator) * 0.5 + 0.5
    loss = (torch.rand(count, generator=generator) * 2).requires_grad_(True)
    return iou, loss


def test_cls_eta_zero_is_plain_loss():
    iou, loss = positives()
    weights = iou_balanced_cls_weights(iou, loss, eta=0.0)
    assert torch.equal(weights * loss, loss)


def test_cls_keeps_total_and_favours_high_iou():
    iou, loss = positives()
    weights = iou_balanced_cls_weights(iou, loss, eta=1.5)
    torch.testing.assert_close((weights * loss).sum(), loss.sum())
    order = iou.argsort()
    assert (weights[order].diff() > 0).all()
    assert not weights.requires_grad


def test_cls_gradient_goes_through_loss_only():
    iou, loss = positives()
    iou.requires_grad_(True)
    weights = iou_balanced_cls_weights(iou, loss, eta=1.5)
    (weights * loss).sum().backward()
    torch.testing.assert_close(loss.grad, weights)
    assert iou.grad is None


def test_cls_zero_denominator_gives_ones():
    weights = iou_balanced_cls_weights(torch.zeros(4), torch.ones(4), eta=1.0)
    assert torch.equal(weights, torch.ones(4))
    assert torch.equal(
        iou_balanced_cls_weights(torch.ones(0), torch.ones(0), eta=1.0), torch.ones(0)
    )


def test_loc_lambda_zero_unit_weight_is_plain_loss():
    iou, loss = positives()
    assert torch.equal(iou_balanced_loc_weights(iou, lam=0.0, w_loc=1.0), torch.ones_like(iou))
    assert torch.equal(IoUBalancedLocWeight(lam=0.0, w_loc=1.0)(iou, loss), loss)


def test_loc_weights_are_detached_power_of_iou():
    iou, loss = positives()
    iou.requires_grad_(True)
    weights = iou_balanced_loc_weights(iou, lam=1.5, w_loc=2.0)
    assert not weights.requires_grad
    torch.testing.assert_close(weights, 2.0 * iou.detach() ** 1.5)
    weighted = IoUBalancedLocWeight(lam=1.5, w_loc=2.0)(iou, loss)
    weighted.sum().backward()
    torch.testing.assert_close(loss.grad, weights)
    assert iou.grad is None


def test_loc_auto_sets_once_and_survives_state_dict():
    module = IoUBalancedLocWeight(lam=1.5, w_loc="auto")
    assert torch.isnan(module.w_loc)

    iou, loss = positives(seed=0)
    first = module(iou, loss)
    torch.testing.assert_close(first.sum(), loss.sum())
    w_loc = module.w_loc.clone()
    assert torch.isfinite(w_loc) and w_loc > 1

    iou2, loss2 = positives(seed=1)
    second = module(iou2, loss2)
    assert torch.equal(module.w_loc, w_loc)
    torch.testing.assert_close(second, w_loc * iou2**1.5 * loss2)

    resumed = IoUBalancedLocWeight(lam=1.5, w_loc="auto")
    resumed.load_state_dict(module.state_dict())
    assert torch.equal(resumed.w_loc, w_loc)
    resumed(iou2, loss2)
    assert torch.equal(resumed.w_loc, w_loc)


def test_loc_auto_waits_for_a_step_with_positives():
    module = IoUBalancedLocWeight(lam=1.0, w_loc="auto")
    out = module(torch.zeros(0), torch.zeros(0))
    assert out.numel() == 0 and torch.isnan(module.w_loc)
    iou, loss = positives()
    module(iou, loss)
    assert torch.isfinite(module.w_loc)


@pytest.mark.parametrize("w_loc", ["fixed", 0.0, -1.0])
def test_loc_invalid_w_loc(w_loc):
    with pytest.raises(ValueError, match="w_loc"):
        IoUBalancedLocWeight(lam=1.0, w_loc=w_loc)


def test_invalid_exponents():
    with pytest.raises(ValueError, match="eta"):
        iou_balanced_cls_weights(torch.ones(2), torch.ones(2), eta=-1.0)
    with pytest.raises(ValueError, match="lam"):
        IoUBalancedLocWeight(lam=-0.5, w_loc=1.0)
    with pytest.raises(ValueError, match="same shape"):
        IoUBalancedLocWeight(lam=1.0, w_loc=1.0)(torch.ones(3), torch.ones(3, 4))
