"""Lightning module: one detector, its losses, SGD/AdamW with warm-up + step or cosine decay, COCO val AP
of the weights or of their exponential moving average."""

from __future__ import annotations

import copy
import math
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor, nn

from detection.config import ExperimentConfig, TrainConfig, validate_config
from detection.engine.coco_eval import evaluate_coco
from detection.engine.detections import to_coco_results
from detection.models.detectors import build_detector


class NonFiniteLossError(RuntimeError):
    """A training loss became NaN or Inf; the run stops and keeps its last good checkpoint."""


def step_seed(seed: int, step: int, rank: int) -> int:
    """The global RNG seed for one (step, process): a resumed run draws the same random numbers."""
    return (seed * 1_000_003 + step * 7_919 + rank) % (2**63)


def schedule_steps(cfg: ExperimentConfig, steps_per_epoch: int) -> int:
    """Optimizer steps of the full schedule: every epoch, or ``train.max_steps`` if it comes first."""
    steps = cfg.train.epochs * steps_per_epoch
    return min(steps, cfg.train.max_steps) if cfg.train.max_steps > 0 else steps


def lr_factor(step: int, steps_per_epoch: int, total_steps: int, train: TrainConfig) -> float:
    """The learning rate at optimizer ``step`` as a factor of ``train.lr``: the linear warm-up from
    ``warmup_ratio`` over ``warmup_steps`` times the decay of ``train.schedule``."""
    t = train
    warm = 1.0 if step >= t.warmup_steps else t.warmup_ratio + (1 - t.warmup_ratio) * step / t.warmup_steps
    if t.schedule == "cosine":
        return warm * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)) / 2
    epoch = step // steps_per_epoch
    return warm * t.lr_gamma ** sum(epoch >= m for m in t.milestones)


def ema_decay_at(step: int, total_steps: int, train: TrainConfig) -> float:
    """The EMA's decay for the update after optimizer ``step`` (counted from 1); see ``train.ema_decay``."""
    return train.ema_decay * (1 - math.exp(-step / (train.ema_ramp * total_steps)))


@torch.no_grad()
def update_average(average: nn.Module, model: nn.Module, decay: float) -> None:
    """``average``'s floating tensors become ``decay · average + (1 - decay) · model``'s; the others ``model``'s."""
    for mean, value in zip(average.state_dict().values(), model.state_dict().values()):
        if mean.is_floating_point():
            mean.lerp_(value, 1 - decay)
        else:
            mean.copy_(value)


class DetectionModule(L.LightningModule):
    def __init__(self, config: dict[str, Any], num_classes: int, label_to_category_id: dict[int, int],
                 steps_per_epoch: int, val_gt: dict[str, Any] | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["val_gt"])
        self.cfg: ExperimentConfig = validate_config(config, "checkpoint hyper-parameters")
        self.model = build_detector(self.cfg, num_classes)
        self.label_to_category_id = {int(k): int(v) for k, v in label_to_category_id.items()}
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = schedule_steps(self.cfg, steps_per_epoch)
        self.val_gt = val_gt
        self._val_results: list[dict[str, Any]] = []
        self.ema = None if self.cfg.train.ema_decay is None else copy.deepcopy(self.model).requires_grad_(False)

    @property
    def evaluated_model(self) -> nn.Module:
        """The weights validation (and so best.ckpt) and ``libra evaluate`` score: the EMA's when there is one."""
        return self.model if self.ema is None else self.ema

    def on_train_start(self) -> None:
        # after a resume's checkpoint is restored; a fresh run's average starts at the (possibly init_from) weights
        if self.ema is not None and self.global_step == 0:
            self.ema.load_state_dict(self.model.state_dict())

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        torch.manual_seed(step_seed(self.cfg.train.seed, self.global_step, self.global_rank))

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.ema is not None:
            update_average(self.ema, self.model, ema_decay_at(self.global_step, self.total_steps, self.cfg.train))

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
        outputs = self.evaluated_model(images)
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
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, self.steps_per_epoch, self.total_steps, t))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
