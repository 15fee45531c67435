import math

import pytest
import torch

from detection.components import balanced_l1_loss
from detection.config import BalancedL1Config

ALPHA, GAMMA = 0.5, 1.5
B = math.exp(GAMMA / ALPHA) - 1
BETAS = [1.0, 0.11, 1 / 9]


def paper_loss(pred: torch.Tensor, target: torch.Tensor, **changes) -> torch.Tensor:
    """Balanced L1 with the paper's alpha and gamma, beta 1 and the exact formula, but ``changes``."""
    return balanced_l1_loss(pred, target, **{"alpha": ALPHA, "gamma": GAMMA, "beta": 1.0, "formula": "exact", **changes})


def exact_closed_form(x: float, beta: float) -> tuple[float, float]:
    """Loss and gradient of DESIGN §5's Balanced L1, written out per scalar."""
    a = abs(x)
    sign = math.copysign(1.0, x) if x != 0 else 0.0
    if a < beta:
        u = B * a / beta + 1
        return ALPHA * beta / B * u * math.log(u) - ALPHA * a, ALPHA * math.log(u) * sign
    return GAMMA * a + GAMMA * beta / B - ALPHA * beta, GAMMA * sign


def mmdet_closed_form(x: float, beta: float) -> tuple[float, float]:
    a = abs(x)
    sign = math.copysign(1.0, x) if x != 0 else 0.0
    if a < beta:
        u = B * a / beta + 1
        loss = ALPHA / B * (B * a + 1) * math.log(u) - ALPHA * a
        grad = ALPHA * math.log(u) + ALPHA / B * (B * a + 1) * (B / beta) / u - ALPHA
        return loss, grad * sign
    return GAMMA * a + GAMMA / B - ALPHA * beta, GAMMA * sign


def loss_and_grad(x: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    loss = paper_loss(x, torch.zeros_like(x), reduction="none", **kwargs)
    loss.sum().backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize(
    "formula,closed_form", [("exact", exact_closed_form), ("mmdet", mmdet_closed_form)]
)
@pytest.mark.parametrize("beta", BETAS)
def test_loss_and_gradient_match_closed_form(beta, formula, closed_form):
    x = torch.linspace(-3 * beta, 3 * beta, 601, dtype=torch.float64)
    loss, grad = loss_and_grad(x, beta=beta, formula=formula)
    expected = torch.tensor([closed_form(v, beta) for v in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(loss, expected[:, 0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected[:, 1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("formula", ["exact", "mmdet"])
@pytest.mark.parametrize("beta", BETAS)
def test_autograd_matches_finite_differences(beta, formula):
    generator = torch.Generator().manual_seed(0)
    x = (torch.rand(40, generator=generator, dtype=torch.float64) * 2 - 1) * 3 * beta
    x = x[((x.abs() - beta).abs() > 1e-3 * beta) & (x.abs() > 1e-3 * beta)]
    x.requires_grad_(True)
    target = torch.zeros_like(x)
    assert torch.autograd.gradcheck(
        lambda p: paper_loss(p, target, beta=beta, formula=formula, reduction="none"), (x,)
    )


@pytest.mark.parametrize("beta", BETAS)
def test_exact_is_continuous_at_beta(beta):
    eps = 1e-9 * beta
    x = torch.tensor([beta - eps, beta + eps, -beta + eps, -beta - eps], dtype=torch.float64)
    loss, grad = loss_and_grad(x, beta=beta)
    assert abs(loss[0] - loss[1]) < 1e-6 and abs(loss[2] - loss[3]) < 1e-6
    assert abs(grad[0] - grad[1]) < 1e-6 and abs(grad[2] - grad[3]) < 1e-6
    assert grad[1].item() == pytest.approx(GAMMA)


@pytest.mark.parametrize("beta", BETAS)
def test_exact_gradient_vanishes_at_zero(beta):
    x = torch.tensor([0.0, 1e-9, -1e-9, 1e-6], dtype=torch.float64)
    loss, grad = loss_and_grad(x, beta=beta)
    assert loss[0] == 0 and grad[0] == 0
    assert grad[1:3].abs().max() < 1e-6
    assert grad[3] < 1e-4


def test_mmdet_formula_jumps_at_small_beta():
    beta = 0.11
    x = torch.tensor([beta - 1e-9, beta + 1e-9, 1e-9], dtype=torch.float64)
    _, grad = loss_and_grad(x, beta=beta, formula="mmdet")
    assert grad[0].item() == pytest.approx(1.70, abs=0.01)
    assert grad[1].item() == pytest.approx(1.50, abs=1e-9)
    assert grad[2].item() > 1.0  # far from 0 next to 0


def test_both_formulas_equal_paper_formula_at_beta_one():
    x = torch.linspace(-3, 3, 301, dtype=torch.float64)
    a = x.abs()
    paper = torch.where(
        a < 1,
        ALPHA / B * (B * a + 1) * torch.log(B * a + 1) - ALPHA * a,
        GAMMA * a + GAMMA / B - ALPHA,
    )
    for formula in ("exact", "mmdet"):
        loss, _ = loss_and_grad(x, beta=1.0, formula=formula)
        torch.testing.assert_close(loss, paper, rtol=1e-12, atol=1e-12)


def test_reductions_and_weight():
    generator = torch.Generator().manual_seed(1)
    pred = torch.randn(6, 4, generator=generator)
    target = torch.randn(6, 4, generator=generator)
    elementwise = paper_loss(pred, target, reduction="none")
    assert elementwise.shape == (6, 4)
    torch.testing.assert_close(paper_loss(pred, target, reduction="sum"), elementwise.sum())
    torch.testing.assert_close(paper_loss(pred, target), elementwise.mean())

    weight = torch.rand(6, 1, generator=generator)
    torch.testing.assert_close(
        paper_loss(pred, target, reduction="sum", weight=weight), (elementwise * weight).sum()
    )
    torch.testing.assert_close(
        paper_loss(pred, target, weight=weight), (elementwise * weight).mean()
    )

    empty = torch.zeros(0, 4, requires_grad=True)
    assert paper_loss(empty, empty.detach()).item() == 0.0


def test_loss_is_symmetric_and_nonnegative():
    x = torch.linspace(-2, 2, 101, dtype=torch.float64)
    for beta in BETAS:
        loss, _ = loss_and_grad(x, beta=beta)
        assert (loss >= -1e-12).all()
        torch.testing.assert_close(loss, loss.flip(0))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"formula": "smooth"}, "formula"),
        ({"reduction": "avg"}, "reduction"),
        ({"alpha": 0.0}, "alpha"),
        ({"beta": -1.0}, "beta"),
    ],
)
def test_invalid_arguments(kwargs, message):
    x = torch.zeros(3)
    with pytest.raises(ValueError, match=message):
        paper_loss(x, x, **kwargs)


def test_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        paper_loss(torch.zeros(3, 4), torch.zeros(4))
