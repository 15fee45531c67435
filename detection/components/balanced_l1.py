"""Balanced L1 loss (Libra R-CNN, Pang et al., CVPR 2019, Sec. 3.3, Eq. 8-10).

With ``b = e^(γ/α) - 1`` and ``x`` the regression error, the loss is::

    |x| < β:  L = (αβ/b)(b|x|/β + 1)·ln(b|x|/β + 1) - α|x|
    else:     L = γ|x| + γβ/b - αβ

(:func:`balanced_l1_loss`'s ``formula="exact"``; ``formula="mmdet"`` is mmdet's variant).
"""

import math

import torch
from torch import Tensor

__all__ = ["balanced_l1_loss"]

_REDUCTIONS = ("none", "mean", "sum")


def balanced_l1_loss(
    pred: Tensor,
    target: Tensor,
    alpha: float,
    gamma: float,
    beta: float,
    formula: str,
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
