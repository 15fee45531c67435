"""RetinaNet's loss: normalised by the batch's positives, so the IoU-balanced classification loss
keeps the positives' summed loss (Wu et al. 2019, Eq. 2-5) whatever each image holds; one sigmoid
output per object class (K, no background channel), the labels 1..K mapped to channels 0..K-1 and back."""

from pathlib import Path

import pytest
import torch

from detection.config import BalancedL1Config, BoxLossConfig, RetinaNetConfig, load_config
from detection.models.detectors import build_detector
from detection.models.box_loss import build_box_loss
from detection.models.retinanet import BalancedRetinaNetHead, paired_iou

NUM_CLASSES = 5
FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0
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
                                 eta=eta, loc_weight=None, head_convs=4, group_norm=False, kaiming_init=False,
                                 focal_alpha=FOCAL_ALPHA, focal_gamma=FOCAL_GAMMA, prior_prob=RetinaNetConfig().prior_prob)


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


def focal_by_hand(logit: float, target: float) -> float:
    """Sigmoid focal loss of one logit (Lin et al. 2017, Eq. 5) with alpha 0.25, gamma 2."""
    p = 1 / (1 + torch.exp(torch.tensor(-logit, dtype=torch.float64))).item()
    p_t = p if target else 1 - p
    alpha_t = FOCAL_ALPHA if target else 1 - FOCAL_ALPHA
    return -alpha_t * (1 - p_t) ** FOCAL_GAMMA * torch.log(torch.tensor(p_t, dtype=torch.float64)).item()


def first_and_last_class_images():
    """Positives of label 1 (channel 0) in one image and of label K (channel K-1) in the other."""
    return [image([0.9, 0.6, 0.8], 5, label=1), image([0.3, 0.7], 6, label=NUM_CLASSES)]


def random_logits(images, seed=0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(len(m), NUM_CLASSES, generator=generator, dtype=torch.float64, requires_grad=True)
            for _, _, m in images]


def per_anchor_focal_by_hand(images, logits) -> tuple[list[float], float]:
    """Each positive's focal loss summed over the K channels (its label's channel the target), and the
    negatives' total."""
    positives, negatives = [], 0.0
    for (target, _, matched), x in zip(images, logits):
        for anchor, gt in enumerate(matched.tolist()):
            channel = int(target["labels"][gt]) - 1 if gt >= 0 else None
            loss = sum(focal_by_hand(x[anchor, k].item(), k == channel) for k in range(NUM_CLASSES))
            if gt >= 0:
                positives.append(loss)
            else:
                negatives += loss
    return positives, negatives


def test_focal_loss_is_summed_over_k_channels_label_c_on_channel_c_minus_1():
    images = first_and_last_class_images()
    logits = random_logits(images)
    positives, negatives = per_anchor_focal_by_hand(images, logits)
    loss = losses(None, images, logits)["classification"]
    assert loss.item() == pytest.approx((sum(positives) + negatives) / len(positives), rel=1e-9)


def test_iou_cls_weights_are_normalised_over_the_k_class_losses():
    """Gradient of each positive's logits scaled by ``u^eta · Z``, ``Z`` from its focal loss summed
    over the K channels (by hand)."""
    images = first_and_last_class_images()
    plain_logits, balanced_logits = random_logits(images), random_logits(images)
    losses(None, images, plain_logits)["classification"].backward()
    losses(1.5, images, balanced_logits)["classification"].backward()
    positives, _ = per_anchor_focal_by_hand(images, plain_logits)
    ious = [0.9, 0.6, 0.8, 0.3, 0.7]
    z = sum(positives) / sum(u**1.5 * ce for u, ce in zip(ious, positives))
    ratios = [(b.grad[i] / p.grad[i]) for p, b, (_, _, m) in zip(plain_logits, balanced_logits, images)
              for i in range(len(m)) if m[i] >= 0]
    for u, ratio in zip(ious, ratios):
        torch.testing.assert_close(ratio, torch.full_like(ratio, u**1.5 * z), rtol=1e-5, atol=1e-7)


def test_the_classification_head_has_k_channels_and_detections_the_labels_1_to_k():
    torch.manual_seed(0)
    cfg = load_config(Path("configs/retinanet_tiny.yaml"), ["model.backbone.weights=null", "model.score_thresh=0.0"])
    model = build_detector(cfg, num_classes=NUM_CLASSES).eval()
    predictor = model.head.classification_head.cls_logits
    anchors = model.anchor_generator.num_anchors_per_location()[0]
    assert model.head.classification_head.num_classes == NUM_CLASSES
    assert predictor.out_channels == anchors * NUM_CLASSES
    with torch.no_grad():
        detections = model([torch.rand(3, 128, 128)])[0]
        assert detections["labels"].numel() > 0
        assert set(detections["labels"].tolist()) <= set(range(1, NUM_CLASSES + 1))
        predictor.bias.view(anchors, NUM_CLASSES)[:, NUM_CLASSES - 1] = 10.0  # channel K-1 wins everywhere
        assert set(model([torch.rand(3, 128, 128)])[0]["labels"].tolist()) == {NUM_CLASSES}
