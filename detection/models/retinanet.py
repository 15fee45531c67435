"""RetinaNet (FPN) on torchvision with the IoU-balanced losses and Balanced L1 plugged in.

The classification subnet has one sigmoid output per object class, ``K`` in all, and none for the
background (the paper's, mmdet's and Detectron2's): the dataset's labels ``1..K`` are the channels
``0..K-1`` in the loss (:class:`BalancedRetinaNetHead`) and back in the detections
(:class:`LibraRetinaNet`).

``BalancedRetinaNetHead`` computes the classification and box losses together, because the
IoU-balanced classification loss (Wu et al. 2019) weights each positive's focal loss by the IoU
of its decoded predicted box, which torchvision's classification head never sees.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import sigmoid_focal_loss

from detection.components import IoUBalancedLocWeight, iou_balanced_cls_weights
from detection.config import ExperimentConfig
from detection.models.backbone import retinanet_backbone
from detection.models.box_loss import BoxLoss, build_box_loss
from detection.models.init_streams import init_stream
from detection.models.torchvision_internals import BoxCoder, Matcher


def paired_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of a[i] with b[i] for xyxy boxes [P, 4]."""
    lt = torch.max(a[:, :2], b[:, :2])
    rb = torch.min(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(dim=1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(dim=1)
    return inter / (area_a + area_b - inter).clamp(min=1e-6)


def batch_positives(local: int, device: torch.device) -> float:
    """The normaliser: the batch's positive anchors, at least 1. Under DDP, the mean over processes
    of their counts (mmdet's ``reduce_mean``), so that DDP's averaged gradient of the per-process
    losses is the gradient of the whole global batch's loss over its total positives."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        count = torch.tensor(float(local), device=device)
        dist.all_reduce(count)
        return max(1.0, count.item() / dist.get_world_size())
    return float(max(1, local))


class BalancedRetinaNetHead(RetinaNetHead):
    """RetinaNet head whose loss is sigmoid focal + a configurable box loss, with optional
    IoU-balanced weights on the positives' classification (``eta``) and localization
    (``loc_weight``) terms.

    Both terms are summed over every image of the batch and divided by the batch's number of
    positive anchors (at least 1; see :func:`batch_positives`), as the papers' implementation
    (mmdet's ``num_total_pos``) does.
    The IoU-balanced classification weight ``w_i = u_i^eta * Z`` multiplies a positive anchor's
    whole sigmoid focal loss, summed over all classes (the paper's per-anchor loss, Eq. 2), and
    ``Z`` is taken over the same positives, so the positives' summed classification loss is
    exactly kept; negatives keep weight 1. ``eta = None`` is the plain loss.

    ``num_classes`` is ``K``, the object classes: a ground truth of label ``c`` (``1..K``) is the
    positive target of channel ``c - 1``.
    """

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, *, box_loss: BoxLoss,
                 eta: float | None, loc_weight: IoUBalancedLocWeight | None, head_convs: int,
                 group_norm: bool, kaiming_init: bool, focal_alpha: float, focal_gamma: float, prior_prob: float):
        norm = partial(nn.GroupNorm, min(32, in_channels // 4)) if group_norm else None
        super().__init__(in_channels, num_anchors, num_classes, norm_layer=norm)
        self.classification_head.conv = self.classification_head.conv[:head_convs]
        self.regression_head.conv = self.regression_head.conv[:head_convs]
        if kaiming_init:
            for subnet in (self.classification_head.conv, self.regression_head.conv):
                for conv in subnet.modules():
                    if isinstance(conv, nn.Conv2d):
                        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.constant_(self.classification_head.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))
        self.focal = partial(sigmoid_focal_loss, alpha=focal_alpha, gamma=focal_gamma)
        self.box_loss = box_loss
        self.eta = eta
        self.loc_weight = loc_weight
        self.box_coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))

    def compute_loss(self, targets, head_outputs, anchors, matched_idxs) -> dict[str, Tensor]:
        cls_neg, cls_pos, box_pos, ious = [], [], [], []
        for target, logits, regression, anchor, matched in zip(
                targets, head_outputs["cls_logits"], head_outputs["bbox_regression"], anchors, matched_idxs):
            fg = torch.where(matched >= 0)[0]
            bg = torch.where(matched == Matcher.BELOW_LOW_THRESHOLD)[0]
            gt_boxes = target["boxes"][matched[fg]]
            onehot = torch.zeros_like(logits[fg])
            onehot[torch.arange(fg.numel()), target["labels"][matched[fg]] - 1] = 1.0
            cls_pos.append(self.focal(logits[fg], onehot, reduction="none").sum(1))
            cls_neg.append(self.focal(logits[bg], torch.zeros_like(logits[bg]), reduction="sum"))
            box_target = self.box_coder.encode_single(gt_boxes, anchor[fg])
            box_pos.append(self.box_loss(regression[fg], box_target).sum(1))
            with torch.no_grad():
                ious.append(paired_iou(self.box_coder.decode_single(regression[fg], anchor[fg]), gt_boxes))

        iou, cls_pos_t, box_pos_t = torch.cat(ious), torch.cat(cls_pos), torch.cat(box_pos)
        if self.eta is not None:
            cls_pos_t = cls_pos_t * iou_balanced_cls_weights(iou, cls_pos_t, self.eta)
        if self.loc_weight is not None:
            box_pos_t = self.loc_weight(iou, box_pos_t)
        num_pos = batch_positives(iou.numel(), iou.device)
        return {
            "classification": (torch.stack(cls_neg).sum() + cls_pos_t.sum()) / num_pos,
            "bbox_regression": box_pos_t.sum() / num_pos,
        }


class LibraRetinaNet(RetinaNet):
    """torchvision's RetinaNet whose classification channel ``c`` scores the label ``c + 1``: its
    detections carry the dataset's labels ``1..K`` (torchvision's take the channel as the label)."""

    def postprocess_detections(self, head_outputs, anchors, image_shapes) -> list[dict[str, Tensor]]:
        detections = super().postprocess_detections(head_outputs, anchors, image_shapes)
        return [{**detection, "labels": detection["labels"] + 1} for detection in detections]


def build_retinanet(cfg: ExperimentConfig, num_classes: int) -> LibraRetinaNet:
    """RetinaNet with an FPN, set up by ``model.retinanet``; ``num_classes`` excludes background."""
    m, c, r = cfg.model, cfg.components, cfg.model.retinanet
    backbone = retinanet_backbone(m, c.bfp, cfg.train.seed)
    n = r.scales_per_octave
    sizes = tuple(tuple(s * 2 ** (i / n) for i in range(n)) for s in m.anchor_sizes)
    anchors = AnchorGenerator(sizes, (m.aspect_ratios,) * len(sizes))
    with init_stream(cfg.train.seed, "head"):
        head = BalancedRetinaNetHead(
            backbone.out_channels, anchors.num_anchors_per_location()[0], num_classes,
            box_loss=build_box_loss(m.box_loss, c.balanced_l1),
            eta=c.iou_balanced_cls.eta if c.iou_balanced_cls.enabled else None,
            loc_weight=(IoUBalancedLocWeight(c.iou_balanced_loc.lam, c.iou_balanced_loc.w_loc)
                        if c.iou_balanced_loc.enabled else None),
            head_convs=r.head_convs, group_norm=r.head_norm == "group", kaiming_init=r.head_init == "kaiming",
            focal_alpha=r.focal_alpha, focal_gamma=r.focal_gamma, prior_prob=r.prior_prob,
        )
    return LibraRetinaNet(backbone, num_classes, min_size=m.min_size, max_size=m.max_size,
                     anchor_generator=anchors, head=head, score_thresh=m.score_thresh,
                     nms_thresh=m.nms_thresh, detections_per_img=m.detections_per_img,
                     fg_iou_thresh=r.fg_iou_thresh, bg_iou_thresh=r.bg_iou_thresh)
