"""Train one detector with Lightning: run directory layout, checkpoints, logs, resume.

A run directory holds ``config.yaml`` (the resolved config), ``checkpoints/last.ckpt`` (plus the
best by val AP), and ``metrics.csv`` (per-step and per-epoch losses, learning rate, val AP).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from pipeline.config import ExperimentConfig, load_config, save_config
from pipeline.engine.datamodule import DetectionDataModule
from pipeline.engine.module import DetectionModule


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file and renames it, so a kill never leaves a torn file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        os.replace(tmp, path)


class PlainProgress(Callback):
    """One line every ``every`` steps and after each validation, for logs that are not a terminal."""

    def __init__(self, every: int):
        self.every = every
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if trainer.is_global_zero and step % self.every == 0:
            rate = (time.perf_counter() - self._start) / max(1, step - self._first_step)
            print(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs} step {step} "
                  f"loss {float(outputs['loss']):.4f} ({rate:.2f} s/step)", flush=True)

    def on_train_start(self, trainer, pl_module) -> None:
        self._start, self._first_step = time.perf_counter(), trainer.global_step

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking:
            ap = {k: f"{float(v):.3f}" for k, v in trainer.callback_metrics.items() if k.startswith("val/AP")}
            print(f"epoch {trainer.current_epoch + 1} validation: {ap}", flush=True)


class RunExistsError(FileExistsError):
    pass


def prepare_run_dir(cfg: ExperimentConfig, out: Path, resume: bool) -> Path | None:
    """Create ``out`` and write the config; returns the checkpoint to resume from, if any.

    Refuses to start a fresh run over an existing one (nothing is overwritten) and to resume
    with a different config.
    """
    last = out / "checkpoints" / "last.ckpt"
    config_file = out / "config.yaml"
    if resume:
        if config_file.exists() and load_config(config_file) != cfg:
            raise RunExistsError(f"{config_file}: --resume with a different config than the run was started with; "
                                 "use the same --config/--set, or a new --out")
        if not last.exists():
            print(f"{last} not found: starting from scratch", file=sys.stderr)
    elif last.exists():
        raise RunExistsError(f"{out} already holds a run ({last}); pass --resume to continue it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    tmp = config_file.with_name(f".config.yaml.{os.getpid()}")
    save_config(cfg, tmp)
    os.replace(tmp, config_file)
    return last if resume and last.exists() else None


def build_trainer(cfg: ExperimentConfig, out: Path, progress_bar: bool, callbacks: list[Callback] = ()) -> L.Trainer:
    t = cfg.train
    checkpoints = ModelCheckpoint(dirpath=out / "checkpoints", filename="best", monitor="val/AP", mode="max",
                                  save_top_k=1, save_last=True)
    extra = [] if progress_bar else [PlainProgress(t.log_every_n_steps)]
    return L.Trainer(
        accelerator=cfg.trainer.accelerator, devices=cfg.trainer.devices, num_nodes=cfg.trainer.num_nodes,
        strategy=cfg.trainer.strategy, precision=cfg.trainer.precision,
        max_epochs=t.epochs, max_steps=t.max_steps, gradient_clip_val=t.grad_clip,
        check_val_every_n_epoch=t.val_every_n_epochs, num_sanity_val_steps=0,
        logger=CSVLogger(save_dir=out, name="", version=""), log_every_n_steps=t.log_every_n_steps,
        callbacks=[checkpoints, *extra, *callbacks], plugins=[AtomicCheckpointIO()],
        enable_progress_bar=progress_bar, enable_model_summary=False,
        use_distributed_sampler=False, deterministic=False,
    )


def train(cfg: ExperimentConfig, out: Path, resume: bool = False, progress_bar: bool | None = None,
          callbacks: list[Callback] = ()) -> DetectionModule:
    """Fit ``cfg`` into run directory ``out``; returns the trained module."""
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    data = DetectionDataModule(cfg)
    ckpt = prepare_run_dir(cfg, out, resume)
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    trainer = build_trainer(cfg, out, sys.stderr.isatty() if progress_bar is None else progress_bar, list(callbacks))
    module = DetectionModule(cfg.to_dict(), data.num_classes, data.label_to_category_id,
                             data.steps_per_epoch(trainer.world_size), data.val_gt)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt)
    return module
