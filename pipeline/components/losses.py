"""Balanced L1 loss (Libra R-CNN, CVPR 2019) and IoU-balanced loss weights (Wu et al. 2019)."""

import math

import torch
from torch import Tensor, nn

__all__ = [
    "balanced_l1_loss",
    "iou_balanced_cls_weights",
    "iou_balanced_loc_weights",
    "IoUBalancedLocWeight",
]

_REDUCTIONS = ("none", "mean", "sum")


def balanced_l1_loss(
    pred: Tensor,
    target: Tensor,
    alpha: float = 0.5,
    gamma: float = 1.5,
    beta: float = 1.0,
    formula: str = "exact",
    reduction: str = "mean",
    weight: Tensor | None = None,
) -> Tensor:
    """Balanced L1 loss (Libra R-CNN, Pang et al., CVPR 2019, Eq. 8-10) of x = pred - target.

    With ``b = e^(γ/α) - 1`` (so that ``α·ln(b + 1) = γ``), ``formula="exact"`` is::

        |x| < β:  L = (αβ/b)(b|x|/β + 1)·ln(b|x|/β + 1) - α|x|     dL/d|x| = α·ln(b|x|/β + 1)
        else:     L = γ|x| + γβ/b - αβ                             dL/d|x| = γ

    which is the paper's loss rescaled to the threshold ``β``: loss and gradient are continuous
    at ``β`` and the gradient is 0 at ``x = 0`` for every ``β``. ``formula="mmdet"`` reproduces
    mmdet's ``balanced_l1_loss``::

        |x| < β:  L = (α/b)(b|x| + 1)·ln(b|x|/β + 1) - α|x|
        else:     L = γ|x| + γ/b - αβ

    which equals the exact form at ``β = 1`` but otherwise has a non-zero gradient at 0 and a
    jump at ``β`` (1.70 inside vs 1.50 outside for α=0.5, γ=1.5, β=0.11).

    Args:
        pred, target: tensors of the same shape.
        alpha, gamma, beta: the loss parameters, ``alpha > 0`` and ``beta > 0``.
        formula: ``"exact"`` or ``"mmdet"``.
        reduction: ``"none"``, ``"mean"`` (over all elements; 0 for empty input) or ``"sum"``.
        weight: optional elementwise weights broadcastable to ``pred``, applied before reduction.
    """
    if formula not in ("exact", "mmdet"):
        raise ValueError(f"formula must be 'exact' or 'mmdet', got {formula!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if pred.shape != target.shape:
        raise ValueError(
            "pred and target must have the same shape, got "
            f"{tuple(pred.shape)} and {tuple(target.shape)}"
        )

    b = math.exp(gamma / alpha) - 1
    diff = (pred - target).abs()
    log_term = torch.log(b * diff / beta + 1)
    if formula == "exact":
        inside = alpha * beta / b * (b * diff / beta + 1) * log_term - alpha * diff
        outside = gamma * diff + gamma * beta / b - alpha * beta
    else:
        inside = alpha / b * (b * diff + 1) * log_term - alpha * diff
        outside = gamma * diff + gamma / b - alpha * beta
    loss = torch.where(diff < beta, inside, outside)

    if weight is not None:
        loss = loss * weight
    if reduction == "none":
        return loss
    if reduction == "sum" or loss.numel() == 0:
        return loss.sum()
    return loss.mean()


def iou_balanced_cls_weights(iou: Tensor, loss: Tensor, eta: float) -> Tensor:
    """Weights of the IoU-balanced classification loss (Wu et al. 2019, Eq. 4-5), for positives.

    ``w_i = u_i^η · Z`` with ``Z = Σ_i CE_i / Σ_i u_i^η·CE_i``, so ``Σ w_i·CE_i = Σ CE_i``: the
    total positive loss is unchanged and shifts towards well-localised positives. ``u`` is the
    IoU of each positive's decoded prediction with its ground truth. The weights are detached;
    they are all ones when ``η = 0`` or when ``Σ u^η·CE = 0``.

    Args:
        iou: ``[P]`` IoUs of the positives.
        loss: ``[P]`` classification loss of each positive (summed over classes).
        eta: the exponent η ≥ 0.
    """
    if eta < 0:
        raise ValueError(f"eta must be non-negative, got {eta}")
    if eta == 0:
        return torch.ones_like(loss)
    loss = loss.detach()
    scaled = iou.detach().clamp_min(0).pow(eta).to(loss)
    balanced_sum = (scaled * loss).sum()
    return torch.where(balanced_sum > 0, scaled * loss.sum() / balanced_sum, 1.0)


def iou_balanced_loc_weights(iou: Tensor, lam: float, w_loc: float | Tensor = 1.0) -> Tensor:
    """IoU-balanced localization loss weights (Wu et al. 2019, Eq. 6): ``w_loc · u^λ``, detached."""
    if lam < 0:
        raise ValueError(f"lam must be non-negative, got {lam}")
    return (w_loc * iou.detach().clamp_min(0).pow(lam)).detach()


class IoUBalancedLocWeight(nn.Module):
    """IoU-balanced localization loss (Wu et al. 2019) with an optionally automatic ``w_loc``.

    ``forward`` returns ``w_loc · u^λ · loss`` per positive, the weights detached. ``w_loc`` is a
    buffer, so it is saved in ``state_dict``. With ``w_loc="auto"`` it starts as NaN and is set,
    at the first call with a non-zero weighted loss, to ``Σ loss / Σ u^λ·loss`` (so that the
    weighted loss equals the unweighted one at that step, the normalisation the paper tuned by
    hand); it then stays fixed, including across checkpoint resume. Until then ``w_loc`` acts as 1.
    """

    w_loc: Tensor

    def __init__(self, lam: float, w_loc: float | str = 1.0) -> None:
        super().__init__()
        if lam < 0:
            raise ValueError(f"lam must be non-negative, got {lam}")
        if isinstance(w_loc, str):
            if w_loc != "auto":
                raise ValueError(f"w_loc must be a positive number or 'auto', got {w_loc!r}")
            initial = math.nan
        elif w_loc > 0:
            initial = float(w_loc)
        else:
            raise ValueError(f"w_loc must be a positive number or 'auto', got {w_loc!r}")
        self.lam = lam
        self.register_buffer("w_loc", torch.tensor(initial))

    def forward(self, iou: Tensor, loss: Tensor) -> Tensor:
        """Weight per-positive box losses.

        Args:
            iou: ``[P]`` IoUs of the positives' decoded predictions with their ground truths.
            loss: ``[P]`` unreduced box loss of each positive (summed over the 4 coordinates).
        """
        if iou.shape != loss.shape:
            raise ValueError(
                "iou and loss must have the same shape, got "
                f"{tuple(iou.shape)} and {tuple(loss.shape)}"
            )
        scaled = iou_balanced_loc_weights(iou, self.lam).to(loss)
        with torch.no_grad():
            detached = loss.detach()
            balanced_sum = (scaled * detached).sum()
            first_value = torch.where(balanced_sum > 0, detached.sum() / balanced_sum, torch.nan)
            self.w_loc.copy_(torch.where(torch.isnan(self.w_loc), first_value, self.w_loc))
        return torch.nan_to_num(self.w_loc, nan=1.0).to(loss) * scaled * loss
