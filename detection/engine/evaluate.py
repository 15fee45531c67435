"""Evaluate a trained run directory on its validation split: its detections and metrics files."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader

from detection.config import ConfigError, ExperimentConfig, load_config
from detection.data import CocoDetectionDataset, CocoSplit, collate_detection
from detection.engine.checkpoint import read_checkpoint
from detection.engine.coco_eval import Backend, evaluate_coco
from detection.engine.completion import completion
from detection.engine.cost import run_cost
from detection.engine.detections import predict
from detection.engine.module import schedule_steps
from detection.engine.splits import coco_subset, validation_split
from detection.io import write_json_atomic
from detection.models.detectors import build_detector
from detection.models.init_from import EMA_PREFIX, LIGHTNING_PREFIX
from detection.run_dir import Checkpoint, RunDir

if TYPE_CHECKING:
    from detection.engine.module import DetectionModule


class ValidationData:
    """The validation split of a config: dataset, loader, ground truth, label mapping (no Lightning).
    ``split``: the split as this process validated it already, else it is validated here."""

    def __init__(self, cfg: ExperimentConfig, split: CocoSplit | None = None):
        self.cfg = cfg
        self.val_split = validation_split(cfg.data) if split is None else split
        self.val_dataset = CocoDetectionDataset(self.val_split, train=False)
        self.val_gt = coco_subset(self.val_split)
        self.num_classes = self.val_dataset.num_classes
        self.label_to_category_id = self.val_dataset.label_to_category_id

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_dataset, batch_size=self.cfg.eval.batch_size, shuffle=False,
                          collate_fn=collate_detection, num_workers=self.cfg.data.num_workers)


def evaluated_weights(cfg: ExperimentConfig) -> str:
    """Which of a checkpoint's detectors a run evaluates: ``ema.`` (the moving average, with ``train.ema_decay``)
    or ``model.`` (the trained weights), the prefix of its tensors in the checkpoint's state_dict."""
    return LIGHTNING_PREFIX if cfg.train.ema_decay is None else EMA_PREFIX


def _checked_run(run: Path, checkpoint: Checkpoint) -> tuple[ExperimentConfig, Path]:
    """The run's config and the path of its ``checkpoint``, or an error that says what to do."""
    files = RunDir(run)
    config_file, ckpt = files.config, files.checkpoint(checkpoint)
    if not config_file.exists():
        raise ConfigError(f"{config_file}: not a run directory (no {config_file.name}); "
                          f"train one with `libra train --out {run}`")
    if not ckpt.exists():
        raise ConfigError(f"{ckpt}: no such checkpoint; has `libra train --out {run}` finished an epoch?")
    return load_config(config_file), ckpt


def _trained_detector(cfg: ExperimentConfig, num_classes: int, checkpoint: dict[str, Any]) -> torch.nn.Module:
    """The detector of ``cfg`` with the ``checkpoint``'s evaluated weights (:func:`evaluated_weights`)."""
    model = build_detector(cfg, num_classes)
    prefix = evaluated_weights(cfg)
    model.load_state_dict({k.removeprefix(prefix): v for k, v in checkpoint["state_dict"].items()
                           if k.startswith(prefix)})
    return model


def load_trained_model(run: Path, checkpoint: Checkpoint = "last"
                       ) -> tuple[ExperimentConfig, torch.nn.Module, ValidationData]:
    """The run's config, its detector with the ``checkpoint``'s evaluated weights, and its validation data."""
    cfg, ckpt = _checked_run(run, checkpoint)
    data = ValidationData(cfg)
    return cfg, _trained_detector(cfg, data.num_classes, read_checkpoint(ckpt)), data


def resolve_device(name: str) -> str:
    """``name`` as a torch device; ``auto``: cuda if available, else cpu."""
    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def evaluate_run(run: Path, checkpoint: Checkpoint = "last", backend: Backend | None = None,
                 device: str = "cpu") -> dict[str, Any]:
    """Predict the val split with the run's checkpoint and COCO-evaluate; writes both files atomically.

    ``metrics.json`` holds the run's ``cost`` (see :func:`detection.engine.cost.run_cost`), whose
    evaluation's wall time covers loading the model, predicting and COCO evaluation, and the ``weights``
    scored (:func:`evaluated_weights`), and whether the run trained its whole schedule
    (:func:`~detection.engine.completion.completion`, from the last checkpoint whichever is scored).
    """
    start = time.perf_counter()
    cfg, ckpt = _checked_run(run, checkpoint)
    last = read_checkpoint(RunDir(run).checkpoint("last"))
    scored = last if checkpoint == "last" else read_checkpoint(ckpt)
    data = ValidationData(cfg)
    model = _trained_detector(cfg, data.num_classes, scored)
    trained = completion(last["global_step"], schedule_steps(cfg, last["hyper_parameters"]["steps_per_epoch"]))
    return _evaluate(cfg, model, data, RunDir(run), device, backend or cfg.eval.backend, trained, start)


def evaluate_trained(module: DetectionModule, run: Path, device: str = "cpu") -> dict[str, Any]:
    """:func:`evaluate_run` of the last checkpoint, from the module this process has just trained into
    ``run``: its evaluated weights are the checkpoint's, and the val split its data module validated is
    scored without being validated again (what `libra run` does)."""
    start = time.perf_counter()
    data = ValidationData(module.cfg, module.trainer.datamodule.evaluation_split)
    trained = completion(module.global_step, module.total_steps)
    return _evaluate(module.cfg, module.evaluated_model, data, RunDir(run), device, module.cfg.eval.backend,
                     trained, start)


def _evaluate(cfg: ExperimentConfig, model: torch.nn.Module, data: ValidationData, run: RunDir, device: str,
              backend: Backend, trained: dict[str, Any], start: float) -> dict[str, Any]:
    model.to(device)
    with torch.inference_mode():
        results = predict(model, data.val_dataloader(), torch.device(device), data.label_to_category_id)
    metrics = evaluate_coco(data.val_gt, results, backend)
    metrics["num_images"] = len(data.val_split.image_ids)
    metrics["num_detections"] = len(results)
    metrics["weights"] = evaluated_weights(cfg).removesuffix(".")
    metrics |= trained
    metrics["cost"] = run_cost(run, time.perf_counter() - start, metrics["num_images"], device)
    write_json_atomic(run.detections, results)
    write_json_atomic(run.metrics, metrics)
    return metrics
