"""IoU-balanced loss weights (Wu et al., "IoU-balanced Loss Functions for Single-stage Object
Detection", 2019): the classification weights of Eq. 4-5 and the localization weights of Eq. 6.

With ``u_i`` the IoU of positive ``i``'s decoded prediction with its ground truth::

    classification:  w_i = u_i^η · Σ_j CE_j / Σ_j u_j^η · CE_j     (so Σ w_i·CE_i = Σ CE_i)
    localization:    w_i = w_loc · u_i^λ

The weights are detached: they scale the gradients of the losses they multiply and have none of
their own.
"""

import math

import torch
from torch import Tensor, nn

__all__ = ["iou_balanced_cls_weights", "iou_balanced_loc_weights", "IoUBalancedLocWeight"]


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


def iou_balanced_loc_weights(iou: Tensor, lam: float, w_loc: float | Tensor) -> Tensor:
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

    def __init__(self, lam: float, w_loc: float | str) -> None:
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
        scaled = iou_balanced_loc_weights(iou, self.lam, 1.0).to(loss)
        with torch.no_grad():
            detached = loss.detach()
            balanced_sum = (scaled * detached).sum()
            first_value = torch.where(balanced_sum > 0, detached.sum() / balanced_sum, torch.nan)
            self.w_loc.copy_(torch.where(torch.isnan(self.w_loc), first_value, self.w_loc))
        return torch.nan_to_num(self.w_loc, nan=1.0).to(loss) * scaled * loss
