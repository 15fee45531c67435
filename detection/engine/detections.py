"""Detector outputs -> COCO results format, and inference over a data loader."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor, nn


def to_coco_results(outputs: list[dict[str, Tensor]], image_ids: list[int],
                    label_to_category_id: dict[int, int]) -> list[dict[str, Any]]:
    """``{"boxes" xyxy, "scores", "labels"}`` per image -> ``[{image_id, category_id, bbox xywh, score}]``."""
    results = []
    for out, image_id in zip(outputs, image_ids):
        boxes = out["boxes"].detach().cpu().to(torch.float64)
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)
        for box, score, label in zip(xywh.tolist(), out["scores"].tolist(), out["labels"].tolist()):
            results.append({
                "image_id": int(image_id),
                "category_id": int(label_to_category_id[int(label)]),
                "bbox": [round(v, 2) for v in box],
                "score": round(float(score), 5),
            })
    return results


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable[tuple[list[Tensor], list[dict]]], device: torch.device,
            label_to_category_id: dict[int, int]) -> list[dict[str, Any]]:
    """Run ``model`` in eval mode over ``batches`` and return COCO results."""
    model.eval()
    results: list[dict[str, Any]] = []
    for images, targets in batches:
        outputs = model([im.to(device) for im in images])
        results += to_coco_results(outputs, [t["image_id"] for t in targets], label_to_category_id)
    return results
