"""Lightning module: one detector, its losses, SGD/AdamW with warm-up + step decay, COCO val AP."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor

from detection.config import ExperimentConfig, validate_config
from detection.engine.coco_eval import evaluate_coco
from detection.engine.detections import to_coco_results
from detection.models.detectors import build_detector


class NonFiniteLossError(RuntimeError):
    """A training loss became NaN or Inf; the run stops and keeps its last good checkpoint."""


def step_seed(seed: int, step: int, rank: int) -> int:
    """The global RNG seed for one (step, process): a resumed run draws the same random numbers."""
    return (seed * 1_000_003 + step * 7_919 + rank) % (2**63)


def lr_factor(step: int, steps_per_epoch: int, warmup_steps: int, warmup_ratio: float,
              milestones: tuple[int, ...], gamma: float) -> float:
    """Linear warm-up from ``warmup_ratio`` over ``warmup_steps``, then x``gamma`` after each milestone epoch."""
    warm = 1.0 if step >= warmup_steps else warmup_ratio + (1 - warmup_ratio) * step / warmup_steps
    epoch = step // steps_per_epoch
    return warm * gamma ** sum(epoch >= m for m in milestones)


class DetectionModule(L.LightningModule):
    def __init__(self, config: dict[str, Any], num_classes: int, label_to_category_id: dict[int, int],
                 steps_per_epoch: int, val_gt: dict[str, Any] | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["val_gt"])
        self.cfg: ExperimentConfig = validate_config(config, "checkpoint hyper-parameters")
        self.model = build_detector(self.cfg, num_classes)
        self.label_to_category_id = {int(k): int(v) for k, v in label_to_category_id.items()}
        self.steps_per_epoch = steps_per_epoch
        self.val_gt = val_gt
        self._val_results: list[dict[str, Any]] = []

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        torch.manual_seed(step_seed(self.cfg.train.seed, self.global_step, self.global_rank))

    def training_step(self, batch: tuple[list[Tensor], list[dict]], batch_idx: int) -> Tensor:
        images, targets = batch
        losses = self.model(images, targets)
        loss = sum(losses.values())
        finite = self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True)
        if not finite:
            values = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
            raise NonFiniteLossError(
                f"non-finite training loss at epoch {self.current_epoch} step {self.global_step} ({values}); "
                "stopped without saving, the last good checkpoint is kept. "
                "Lower train.lr, raise train.warmup_steps or set train.grad_clip."
            )
        batch_size = len(images)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, on_step=True, on_epoch=True, batch_size=batch_size)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size)
        self.log("lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False, batch_size=batch_size)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_results = []

    def validation_step(self, batch: tuple[list[Tensor], list[dict]], batch_idx: int) -> None:
        images, targets = batch
        outputs = self.model(images)
        self._val_results += to_coco_results(outputs, [t["image_id"] for t in targets], self.label_to_category_id)

    def on_validation_epoch_end(self) -> None:
        results = self._val_results
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[list[dict[str, Any]]] = [None] * dist.get_world_size()  # type: ignore[list-item]
            dist.all_gather_object(gathered, results)
            results = [r for part in gathered for r in part]
        metrics = evaluate_coco(self.val_gt, results, self.cfg.eval.backend)
        self.log_dict({f"val/{k}": v for k, v in metrics["bbox"].items() if k != "AP50"}, prog_bar=False,
                      sync_dist=False)
        self.log("val/AP50", metrics["bbox"]["AP50"], prog_bar=True, sync_dist=False)

    def configure_optimizers(self):
        t = self.cfg.train
        params = [p for p in self.model.parameters() if p.requires_grad]
        lr = t.lr
        if t.lr_scaling_batch:
            lr *= t.batch_size * self.trainer.world_size / t.lr_scaling_batch
        if t.optimizer == "sgd":
            optimizer = torch.optim.SGD(params, lr=lr, momentum=t.momentum, weight_decay=t.weight_decay)
        else:
            optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=t.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
            step, self.steps_per_epoch, t.warmup_steps, t.warmup_ratio, t.milestones, t.lr_gamma))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
