"""What tuning needs of a training, behind one small interface, so that the study's logic runs with any trainer.

A :class:`Trainer` trains a config into a run directory, calling a hook after each epoch with what it
measured (``train/loss``; ``val/*`` in AP points after each validation, on the validation images the
config validates during training), and, when asked, evaluates the trained detector on the whole validation
set as per-image COCO matches (what the report's bootstrap resamples), and gives back those of a run directory
that already holds that config trained and evaluated (an interrupted validation is resumed, not retrained). It
also scores the detector of a config before training (the report's "did it learn" guard).
:class:`LightningTrainer` is the real one (``detection.engine``); the tests pass a synthetic one whose AP is a
known function of the knobs.

:func:`timed` measures a training's wall and CPU seconds (the process's CPU time, every thread of it),
also when the training fails or is pruned.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from pydantic import BaseModel

from detection.config import ExperimentConfig
from detection.ownership import TRAIN, remove_owned
from detection.run_dir import RunDir

if TYPE_CHECKING:
    from pipeline.report.per_image import ImageMatches

EpochHook = Callable[[int, dict[str, float]], None]
"""``(epoch, metrics)`` after each training epoch (``train/loss``) and each validation (``val/*``, AP points);
it may raise ``optuna.TrialPruned`` to stop the training."""


@dataclass(frozen=True)
class TrainedRun:
    validations: dict[int, dict[str, float]]
    """``val/*`` metrics (AP points) after each validated epoch."""
    matches: ImageMatches | None = None
    """Per-image COCO matches on the whole validation set (only when evaluated)."""

    def last(self, metric: str) -> float:
        """``metric`` at the last validated epoch (what a training scores)."""
        if not self.validations:
            raise RuntimeError("training ended without a validation: no value "
                               "(check train.epochs and train.val_every_n_epochs)")
        logged = self.validations[max(self.validations)]
        if metric not in logged:
            raise RuntimeError(f"validation did not log {metric} (logged: {sorted(logged)})")
        return logged[metric]


class Trainer(Protocol):
    def train(self, cfg: ExperimentConfig, out: Path, on_epoch: EpochHook | None = None,
              evaluate: bool = False) -> TrainedRun:
        """Train ``cfg`` into the (new) run directory ``out``; with ``evaluate``, also score the trained
        detector on the whole validation set."""
        ...

    def untrained_ap(self, cfg: ExperimentConfig, out: Path) -> float:
        """COCO AP (AP points) on the whole validation set of ``cfg``'s detector before its first step."""
        ...

    def evaluated(self, cfg: ExperimentConfig, out: Path) -> TrainedRun | None:
        """What ``train(cfg, out, evaluate=True)`` returned, if ``out`` holds ``cfg`` trained and evaluated
        (its ``validations`` are not kept); None otherwise."""
        ...


class Compute(BaseModel):
    """Trainings and the seconds they took (wall clock, and CPU time of the process that ran them)."""

    trainings: int = 0
    reused: int = 0
    """Trainings found finished (an interrupted validation's), counted in ``trainings`` at no seconds."""
    wall_s: float = 0.0
    cpu_s: float = 0.0

    def __add__(self, other: Compute) -> Compute:
        return Compute(trainings=self.trainings + other.trainings, reused=self.reused + other.reused,
                       wall_s=self.wall_s + other.wall_s, cpu_s=self.cpu_s + other.cpu_s)

    def text(self) -> str:
        reused = f" ({self.reused} found finished)" if self.reused else ""
        return f"{self.trainings} trainings{reused}, {self.wall_s:.0f} s wall, {self.cpu_s:.0f} s CPU"


@contextmanager
def timed() -> Iterator[Compute]:
    """One training's :class:`Compute`, filled in when the block ends (also by an exception)."""
    spent = Compute(trainings=1)
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield spent
    finally:
        spent.wall_s = round(time.perf_counter() - wall, 3)
        spent.cpu_s = round(time.process_time() - cpu, 3)


class LightningTrainer:
    """Trains with :func:`detection.engine.train.train` (one device, no progress bar) and evaluates the trained
    module in memory on the whole validation split, as ``libra run`` does (``metrics.json``,
    ``detections.json``)."""

    def train(self, cfg: ExperimentConfig, out: Path, on_epoch: EpochHook | None = None,
              evaluate: bool = False) -> TrainedRun:
        from detection.engine.evaluate import evaluate_trained, resolve_device
        from detection.engine.splits import coco_subset
        from detection.engine.train import train
        from pipeline.report.per_image import match_images

        reporter = _epoch_reporter(on_epoch)
        module = train(cfg, out, progress_bar=False, callbacks=[reporter])
        if not evaluate:
            return TrainedRun(reporter.validations)
        evaluate_trained(module, out, resolve_device("auto"))
        ground_truth = coco_subset(module.trainer.datamodule.evaluation_split)
        detections = json.loads(RunDir(out).detections.read_text())
        return TrainedRun(reporter.validations, match_images(ground_truth, detections))

    def evaluated(self, cfg: ExperimentConfig, out: Path) -> TrainedRun | None:
        from detection.config import load_config
        from detection.engine.splits import coco_subset, validation_split
        from pipeline.report.per_image import match_images

        run = RunDir(out)
        if not (run.metrics.exists() and run.config.exists()) or load_config(run.config).to_dict() != cfg.to_dict():
            return None
        ground_truth = coco_subset(validation_split(cfg.data))
        return TrainedRun({}, match_images(ground_truth, json.loads(run.detections.read_text())))

    def untrained_ap(self, cfg: ExperimentConfig, out: Path) -> float:
        from pipeline.plan.runplan import RunPlan
        from pipeline.report.guards import untrained_ap

        return untrained_ap(RunPlan(cfg.model.detector, "default", (), cfg.train.seed, out, cfg.to_dict()))


def _epoch_reporter(on_epoch: EpochHook | None):
    """A Lightning callback that collects each validation's ``val/*`` (AP points) and passes every epoch's
    measures to ``on_epoch``. An exception it raises (``optuna.TrialPruned``) is re-raised by Lightning after
    its teardown."""
    from lightning.pytorch.callbacks import Callback

    from pipeline.report.results import ap_points

    class EpochReporter(Callback):
        def __init__(self) -> None:
            self.validations: dict[int, dict[str, float]] = {}

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            loss = trainer.callback_metrics.get("train/loss_epoch")
            if loss is not None and on_epoch is not None:
                on_epoch(trainer.current_epoch, {"train/loss": float(loss)})

        def on_validation_end(self, trainer, pl_module) -> None:
            if trainer.sanity_checking:
                return
            metrics = {k: ap_points(float(v)) for k, v in trainer.callback_metrics.items()
                       if k.startswith("val/") and not k.endswith("_bar")}
            self.validations[trainer.current_epoch] = metrics
            if on_epoch is not None:
                on_epoch(trainer.current_epoch, metrics)

    return EpochReporter()


def train_in(trainer: Trainer, cfg: ExperimentConfig, out: Path, keep_checkpoints: bool,
             on_epoch: EpochHook | None = None, evaluate: bool = False) -> TrainedRun:
    """Train ``cfg`` into ``out``: a run directory left there by a deleted study is removed first (only under
    ``libra train``'s marker), and the checkpoints afterwards unless ``keep_checkpoints``."""
    remove_owned(out, (TRAIN,))
    try:
        return trainer.train(cfg, out, on_epoch, evaluate)
    finally:
        if not keep_checkpoints:
            remove_owned(RunDir(out).checkpoints, (TRAIN,), owner=out)
