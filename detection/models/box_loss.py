"""The box regression loss a detector uses, chosen by config: its own, or Balanced L1."""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch.nn.functional as F
from torch import Tensor

from detection.components import balanced_l1_loss
from detection.config import BalancedL1Config, BoxLossConfig

BoxLoss = Callable[[Tensor, Tensor], Tensor]
"""(pred [P, 4], target [P, 4]) -> elementwise loss [P, 4]."""


def _weighted(loss: BoxLoss, weight: float, pred: Tensor, target: Tensor) -> Tensor:
    return weight * loss(pred, target)


def build_box_loss(default: BoxLossConfig, balanced_l1: BalancedL1Config) -> BoxLoss:
    """Balanced L1 (times its ``loss_weight``) when enabled, else the detector's own loss."""
    if balanced_l1.enabled:
        loss = partial(balanced_l1_loss, alpha=balanced_l1.alpha, gamma=balanced_l1.gamma,
                       beta=balanced_l1.beta, formula=balanced_l1.formula, reduction="none")
        return partial(_weighted, loss, balanced_l1.loss_weight)
    if default.type == "l1":
        return partial(F.l1_loss, reduction="none")
    return partial(F.smooth_l1_loss, beta=default.beta, reduction="none")
