"""Faster R-CNN (FPN) on torchvision with Libra R-CNN's components plugged in.

``LibraRoIHeads`` replaces torchvision's R-CNN head training path: proposals are sampled by a
positive and a negative sampler that see each proposal's IoU, drawn together in one
``CombinedSampler`` call (uniform random ones in the baseline, the IoU-balanced ones when
enabled), and the box loss is configurable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import AnchorGenerator, RPNHead
from torchvision.ops import MultiScaleRoIAlign, box_iou

from detection.components import (
    CombinedSampler,
    InstanceBalancedPositiveSampler,
    IoUBalancedNegativeSampler,
    IoUHistogram,
    RandomNegativeSampler,
    RandomPositiveSampler,
)
from detection.config import ExperimentConfig, IoUBalancedSamplingConfig
from detection.models.backbone import faster_rcnn_backbone
from detection.models.box_loss import BoxLoss, build_box_loss
from detection.models.init_streams import init_stream
from detection.models.torchvision_internals import BalancedPositiveNegativeSampler


def bounded_negatives(num_neg: Tensor, num_pos: Tensor, neg_pos_ub: int) -> Tensor:
    """Negatives to sample per image: ``min(num_neg, neg_pos_ub · max(1, num_pos))`` (mmdet's
    RandomSampler ``neg_pos_ub``); ``neg_pos_ub = -1`` leaves ``num_neg`` as it is."""
    if neg_pos_ub < 0:
        return num_neg
    return torch.minimum(num_neg, num_pos.clamp(min=1) * neg_pos_ub)


class BoundedNegativeSampler(BalancedPositiveNegativeSampler):
    """torchvision's RPN sampler (random positives up to ``batch_size_per_image · positive_fraction``,
    random negatives filling the rest) keeping at most :func:`bounded_negatives` of its negatives,
    a uniform random subset, so the negatives stay a uniform draw."""

    def __init__(self, batch_size_per_image: int, positive_fraction: float, neg_pos_ub: int):
        super().__init__(batch_size_per_image, positive_fraction)
        self.neg_pos_ub = neg_pos_ub

    def __call__(self, matched_idxs: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        pos_masks, neg_masks = super().__call__(matched_idxs)
        if self.neg_pos_ub < 0:
            return pos_masks, neg_masks
        for pos, neg in zip(pos_masks, neg_masks):
            chosen = neg.nonzero().squeeze(1)
            keep = int(bounded_negatives(chosen.new_tensor(chosen.numel()), pos.sum(), self.neg_pos_ub))
            if keep < chosen.numel():
                neg[chosen[torch.randperm(chosen.numel(), device=chosen.device)[keep:]]] = 0
        return pos_masks, neg_masks


def pad_rows(rows: list[Tensor], fill: float) -> Tensor:
    """Stack 1-D tensors of different lengths into [B, max_len], padding with ``fill``."""
    width = max(r.numel() for r in rows)
    out = rows[0].new_full((len(rows), width), fill)
    for i, r in enumerate(rows):
        out[i, : r.numel()] = r
    return out


class LibraRoIHeads(RoIHeads):
    """torchvision ``RoIHeads`` with IoU-aware proposal sampling and a configurable box loss.

    ``neg_pos_ub`` bounds the negatives sampled per image (:func:`bounded_negatives`). Records the IoU
    histogram of the negatives it sampled (``sampled_negative_iou``) for the report.
    """

    def __init__(self, *, sampler: CombinedSampler, box_loss: BoxLoss, neg_pos_ub: int, **roi_heads_kwargs):
        super().__init__(**roi_heads_kwargs)
        self.sampler = sampler
        self.neg_pos_ub = neg_pos_ub
        self.box_loss = box_loss
        self.sampled_negative_iou = IoUHistogram()

    def _match(self, proposals: Tensor, gt_boxes: Tensor, gt_labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Max IoU to any GT, index of that GT, and label (class, 0 background, -1 ignored)."""
        if gt_boxes.numel() == 0:
            zeros = proposals.new_zeros(proposals.shape[0])
            return zeros, zeros.long(), zeros.long()
        max_iou, matched = box_iou(gt_boxes, proposals).max(dim=0)
        labels = gt_labels[matched].clone()
        labels[max_iou < self.proposal_matcher.high_threshold] = -1
        labels[max_iou < self.proposal_matcher.low_threshold] = 0
        return max_iou, matched, labels

    def select_training_samples(self, proposals: list[Tensor], targets: list[dict[str, Tensor]]):
        proposals = [torch.cat([p, t["boxes"].to(p.dtype)]) for p, t in zip(proposals, targets)]
        matches = [self._match(p, t["boxes"], t["labels"]) for p, t in zip(proposals, targets)]
        max_iou = pad_rows([m[0] for m in matches], -1.0)
        matched = pad_rows([m[1] for m in matches], 0)
        labels = pad_rows([m[2] for m in matches], -1)

        positives, negatives = labels > 0, labels == 0
        per_image = self.fg_bg_sampler.batch_size_per_image
        num_pos = positives.sum(1).clamp(max=int(per_image * self.fg_bg_sampler.positive_fraction))
        num_neg = bounded_negatives(negatives.sum(1).clamp(max=per_image - num_pos), num_pos, self.neg_pos_ub)
        keep_pos, keep_neg = self.sampler(
            max_iou, matched, positives, negatives, num_pos, num_neg, valid=max_iou >= 0
        )
        keep = keep_pos | keep_neg
        self.sampled_negative_iou.update(max_iou[keep_neg].detach())

        sampled_proposals, sampled_labels, regression_targets = [], [], []
        for b, (props, target) in enumerate(zip(proposals, targets)):
            idx = keep[b, : props.shape[0]].nonzero().squeeze(1)
            gt_boxes = target["boxes"].to(props.dtype)
            matched_boxes = gt_boxes[matched[b, idx]] if gt_boxes.numel() else props[idx]
            sampled_proposals.append(props[idx])
            sampled_labels.append(labels[b, idx])
            regression_targets.append(self.box_coder.encode_single(matched_boxes, props[idx]))
        return sampled_proposals, None, sampled_labels, regression_targets

    def rcnn_loss(self, class_logits: Tensor, box_regression: Tensor, labels: list[Tensor],
                  regression_targets: list[Tensor]) -> dict[str, Tensor]:
        """Cross-entropy over sampled RoIs + box loss on positives, normalised by the RoI count."""
        labels_t = torch.cat(labels)
        targets_t = torch.cat(regression_targets)
        pos = torch.where(labels_t > 0)[0]
        pred = box_regression.reshape(labels_t.shape[0], -1, 4)[pos, labels_t[pos]]
        box_loss = self.box_loss(pred, targets_t[pos]).sum() / max(1, labels_t.numel())
        return {"loss_classifier": F.cross_entropy(class_logits, labels_t), "loss_box_reg": box_loss}

    def forward(self, features, proposals, image_shapes, targets=None):
        if self.training:
            proposals, _, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        if self.training:
            return [], self.rcnn_loss(class_logits, box_regression, labels, regression_targets)
        boxes, scores, labels = self.postprocess_detections(class_logits, box_regression, proposals, image_shapes)
        return [{"boxes": b, "labels": l, "scores": s} for b, s, l in zip(boxes, scores, labels)], {}


def build_negative_sampler(cfg: IoUBalancedSamplingConfig) -> IoUBalancedNegativeSampler:
    """The IoU-balanced negative sampler of ``cfg`` (whether or not it is enabled)."""
    return IoUBalancedNegativeSampler(cfg.num_bins, cfg.floor_thr, cfg.floor_fraction, cfg.bin_range)


def build_sampler(cfg: IoUBalancedSamplingConfig) -> CombinedSampler:
    """IoU-balanced samplers when enabled; otherwise uniform random ones."""
    if not cfg.enabled:
        return CombinedSampler(RandomPositiveSampler(), RandomNegativeSampler())
    positive = InstanceBalancedPositiveSampler() if cfg.instance_balanced_pos else RandomPositiveSampler()
    return CombinedSampler(positive, build_negative_sampler(cfg))


def build_faster_rcnn(cfg: ExperimentConfig, num_classes: int) -> FasterRCNN:
    """Faster R-CNN with FPN; ``num_classes`` excludes the background. Each module with weights is
    initialised from its own stream of ``train.seed`` (:mod:`detection.models.init_streams`)."""
    m, c, seed = cfg.model, cfg.components, cfg.train.seed
    backbone = faster_rcnn_backbone(m, c.bfp, seed)
    anchors = AnchorGenerator(tuple((s,) for s in m.anchor_sizes), (m.aspect_ratios,) * len(m.anchor_sizes))
    width = m.roi_heads.representation_size
    with init_stream(seed, "rpn.head"):
        rpn_head = RPNHead(backbone.out_channels, anchors.num_anchors_per_location()[0])
    with init_stream(seed, "roi_heads.box_head"):
        box_head = TwoMLPHead(backbone.out_channels * 7 * 7, width)
    with init_stream(seed, "roi_heads.box_predictor"):
        box_predictor = FastRCNNPredictor(width, num_classes + 1)
    model = FasterRCNN(
        backbone, None, min_size=m.min_size, max_size=m.max_size,
        rpn_anchor_generator=anchors, rpn_head=rpn_head,
        box_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], 7, m.roi_heads.sampling_ratio),
        box_head=box_head, box_predictor=box_predictor,
        rpn_pre_nms_top_n_train=m.rpn.pre_nms_top_n_train, rpn_post_nms_top_n_train=m.rpn.post_nms_top_n_train,
        rpn_pre_nms_top_n_test=m.rpn.pre_nms_top_n_test, rpn_post_nms_top_n_test=m.rpn.post_nms_top_n_test,
        rpn_batch_size_per_image=m.rpn.batch_size_per_image, rpn_positive_fraction=m.rpn.positive_fraction,
        box_score_thresh=m.score_thresh, box_nms_thresh=m.nms_thresh, box_detections_per_img=m.detections_per_img,
        box_fg_iou_thresh=m.roi_heads.fg_iou_thresh, box_bg_iou_thresh=m.roi_heads.bg_iou_thresh,
        box_batch_size_per_image=m.roi_heads.batch_size_per_image,
        box_positive_fraction=m.roi_heads.positive_fraction,
    )
    heads = model.roi_heads
    model.roi_heads = LibraRoIHeads(
        box_roi_pool=heads.box_roi_pool, box_head=heads.box_head, box_predictor=heads.box_predictor,
        fg_iou_thresh=m.roi_heads.fg_iou_thresh, bg_iou_thresh=m.roi_heads.bg_iou_thresh,
        batch_size_per_image=m.roi_heads.batch_size_per_image, positive_fraction=m.roi_heads.positive_fraction,
        bbox_reg_weights=None, score_thresh=m.score_thresh, nms_thresh=m.nms_thresh,
        detections_per_img=m.detections_per_img,
        sampler=build_sampler(c.iou_balanced_sampling), neg_pos_ub=m.roi_heads.neg_pos_ub,
        box_loss=build_box_loss(m.box_loss, c.balanced_l1),
    )
    model.rpn.fg_bg_sampler = BoundedNegativeSampler(m.rpn.batch_size_per_image, m.rpn.positive_fraction,
                                                     m.rpn.neg_pos_ub)
    return model
