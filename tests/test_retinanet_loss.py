"""RetinaNet's loss: normalised by the batch's positives, so the IoU-balanced classification loss
keeps the positives' summed loss (Wu et al. 2019, Eq. 2-5) whatever each image holds."""

import pytest
import torch

from pipeline.config import BalancedL1Config, BoxLossConfig
from pipeline.models.box_loss import build_box_loss
from pipeline.models.retinanet import BalancedRetinaNetHead, paired_iou

NUM_CLASSES = 5
GT = torch.tensor([[20.0, 20.0, 60.0, 60.0]])  # 40 x 40


def anchor_at_iou(iou: float) -> torch.Tensor:
    """A box inside GT, sharing its top-left corner, with IoU ``iou`` to GT (area ratio)."""
    side = 40.0 * iou**0.5
    return torch.tensor([20.0, 20.0, 20.0 + side, 20.0 + side])


def image(ious: list[float], num_negatives: int, label: int):
    """One image: positives (anchors at the given IoUs, matched to the one GT), then negatives."""
    anchors = torch.stack([anchor_at_iou(u) for u in ious] + [torch.tensor([90.0, 90.0, 100.0, 100.0])] * num_negatives)
    matched = torch.tensor([0] * len(ious) + [-1] * num_negatives)
    target = {"boxes": GT, "labels": torch.tensor([label])}
    return target, anchors, matched


def head(eta: float | None) -> BalancedRetinaNetHead:
    return BalancedRetinaNetHead(8, 1, NUM_CLASSES, box_loss=build_box_loss(BoxLossConfig(type="l1"), BalancedL1Config()),
                                 eta=eta or 0.0)


def losses(eta: float | None, images, logits: list[torch.Tensor]):
    targets, anchors, matched = zip(*images)
    outputs = {"cls_logits": torch.stack(logits),
               "bbox_regression": torch.zeros(len(images), anchors[0].shape[0], 4)}
    return head(eta).compute_loss(list(targets), outputs, list(anchors), list(matched))


def two_images(iou_a: float, iou_b: float):
    """The issue's case: 20 positives at ``iou_a`` in one image, 2 at ``iou_b`` in the other
    (padded to the same anchor count with negatives)."""
    return [image([iou_a] * 20, 10, label=1), image([iou_b] * 2, 28, label=3)]


def zero_logits(images) -> list[torch.Tensor]:
    return [torch.zeros(len(m), NUM_CLASSES, requires_grad=True) for _, _, m in images]


def test_anchor_helper_gives_the_asked_iou():
    torch.testing.assert_close(paired_iou(anchor_at_iou(0.3)[None], GT), torch.tensor([0.3]))


@pytest.mark.parametrize("eta", [0.5, 1.5, 3.0])
def test_equal_ious_leave_the_loss_unchanged(eta):
    images = two_images(0.7, 0.7)
    plain = losses(None, images, zero_logits(images))["classification"]
    balanced = losses(eta, images, zero_logits(images))["classification"]
    assert abs(balanced.item() - plain.item()) < 1e-6


def test_unequal_images_keep_the_positives_sum():
    """20 positives at IoU 0.9 and 2 at IoU 0.3, all-zero logits, eta 1.5: the per-image
    normaliser gave 0.64x the plain loss; normalised by the batch's positives it is 1.00x."""
    images = two_images(0.9, 0.3)
    plain = losses(None, images, zero_logits(images))["classification"]
    balanced = losses(1.5, images, zero_logits(images))["classification"]
    assert abs(balanced.item() - plain.item()) < 1e-6
    generator = torch.Generator().manual_seed(0)
    logits = [torch.randn(30, NUM_CLASSES, generator=generator) for _ in images]
    plain = losses(None, images, [x.clone() for x in logits])["classification"]
    balanced = losses(1.5, images, [x.clone() for x in logits])["classification"]
    torch.testing.assert_close(balanced, plain, rtol=1e-6, atol=1e-6)


def test_normalised_by_the_batch_positives():
    """Sum over the batch / total positives: with zero logits every positive anchor's focal loss
    summed over classes is the same constant c_pos and every negative's c_neg."""
    images = two_images(0.9, 0.3)
    loss = losses(None, images, zero_logits(images))["classification"]
    p = torch.tensor(0.5)
    c_pos = 0.25 * (1 - p) ** 2 * -torch.log(p) + (NUM_CLASSES - 1) * 0.75 * p**2 * -torch.log(1 - p)
    c_neg = NUM_CLASSES * 0.75 * p**2 * -torch.log(1 - p)
    expected = (22 * c_pos + 38 * c_neg) / 22
    torch.testing.assert_close(loss, expected)


def test_weights_fall_on_positives_only_and_on_every_class_of_a_positive():
    """Gradients w.r.t. the logits: negatives' are untouched by eta; a positive's gradient is
    scaled by its weight u^eta * Z on every class logit (the weight multiplies the anchor's whole
    focal loss, summed over classes), larger for the well-localised image."""
    images = two_images(0.9, 0.3)
    plain_logits, balanced_logits = zero_logits(images), zero_logits(images)
    losses(None, images, plain_logits)["classification"].backward()
    losses(1.5, images, balanced_logits)["classification"].backward()
    for plain, balanced, (_, _, matched) in zip(plain_logits, balanced_logits, images):
        negative = matched < 0
        torch.testing.assert_close(balanced.grad[negative], plain.grad[negative])
    ratio_a = balanced_logits[0].grad[:20] / plain_logits[0].grad[:20]
    ratio_b = balanced_logits[1].grad[:2] / plain_logits[1].grad[:2]
    torch.testing.assert_close(ratio_a, torch.full_like(ratio_a, ratio_a[0, 0].item()))
    torch.testing.assert_close(ratio_b, torch.full_like(ratio_b, ratio_b[0, 0].item()))
    z = 22 / (20 * 0.9**1.5 + 2 * 0.3**1.5)
    torch.testing.assert_close(ratio_a[0, 0], torch.tensor(0.9**1.5 * z))
    torch.testing.assert_close(ratio_b[0, 0], torch.tensor(0.3**1.5 * z))
    assert ratio_a[0, 0] > 1 > ratio_b[0, 0]
