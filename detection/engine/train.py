"""Train one detector with Lightning: run directory layout, checkpoints, logs, resume, stop on a signal.

A run directory (:class:`detection.run_dir.RunDir`) holds the resolved config, the last checkpoint
(plus the best by val AP), Lightning's log (per-step and per-epoch losses, learning rate, val AP), and
what the training cost (see :mod:`detection.engine.cost`).

SIGTERM or SIGINT stops training after the current step (or the running validation), saves the
last checkpoint and raises :class:`TrainingStopped`; ``resume=True`` continues the run
from there, on the same batches an uninterrupted run would see. A second signal ends the process
at once.
"""

from __future__ import annotations

import csv
import signal
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities.exceptions import SIGTERMException

from detection.config import ConfigError, ExperimentConfig, load_config, save_config, validate_config
from detection.engine.checkpoint import CheckpointError, read_checkpoint
from detection.engine.cost import TrainingCost
from detection.engine.curves import write_curves
from detection.engine.datamodule import DetectionDataModule
from detection.engine.module import DetectionModule, schedule_steps
from detection.io import replace_atomic, write_json_atomic
from detection.ownership import DISPATCH, TRAIN, check_replaceable, mark, run_lock, writer_of
from detection.models.detectors import check_backbone_weights, init_detector
from detection.run_dir import RunDir
from detection.signals import StopRequest, handling_stop_signals

RUN_WRITERS = (TRAIN, DISPATCH)
"""Who made a run directory a fresh run may go into: `libra train`, or `libra dispatch` (for `libra run`)."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file and renames it, so a kill never leaves a torn file;
    reads one with ``weights_only=True`` (see :func:`read_checkpoint`), also when Lightning resumes."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        save = super().save_checkpoint
        replace_atomic(Path(path), lambda tmp: save(checkpoint, tmp, storage_options))

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        return read_checkpoint(Path(path))


def _step(row: dict[str, str | None]) -> float:
    """A training log row's step; infinity for a row torn by a kill while it was written."""
    try:
        return int(row["step"])
    except (KeyError, TypeError, ValueError):
        return float("inf")


class _ResumingWriter(ExperimentWriter):
    """Lightning's CSV writer into a run's training log, except that the rows logged before ``start_step``
    are kept (Lightning deletes the file); later rows are dropped, as the resumed run logs those steps again."""

    def __init__(self, run: RunDir, start_step: int):
        self.start_step = start_step
        self.NAME_METRICS_FILE, self.NAME_HPARAMS_FILE = run.training_log.name, run.hparams.name
        super().__init__(str(run.path))

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.exists():
            return
        with path.open(newline="") as file:
            reader = csv.DictReader(file)
            columns = list(reader.fieldnames or [])
            rows = [row for row in reader if _step(row) < self.start_step]
        if not rows:
            path.unlink()
            return
        def write(tmp: Path) -> None:
            with tmp.open("w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=columns, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)

        replace_atomic(path, write)
        self.metrics_keys = columns


class ResumingCSVLogger(CSVLogger):
    """``CSVLogger`` writing the run's training log, so that a resumed run holds every step exactly once."""

    def __init__(self, run: RunDir, start_step: int):
        super().__init__(save_dir=run.path, name="", version="")
        self.run, self.start_step = run, start_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._experiment = _ResumingWriter(self.run, self.start_step)
        return self._experiment


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


class TrainingStopped(KeyboardInterrupt):
    """Training was stopped by a signal; its state is saved in ``checkpoint``."""

    def __init__(self, signum: int, checkpoint: Path):
        self.signum, self.checkpoint = signum, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name}; saved {checkpoint}, "
                         "continue the run with --resume")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _StopRequested(Exception):
    """Raised inside Lightning's loop to leave it between two training steps."""


class StopOnSignal(Callback):
    """Turns SIGTERM and SIGINT into a stop between two training steps and saves ``checkpoint`` there.

    The stop is agreed by every process (one all-reduce per step), so a signal to one DDP process is
    enough. Lightning's own SIGTERM handler is replaced when training starts: it can stop in the
    middle of a validation, which a resumed run would not finish with the same AP.
    """

    def __init__(self, checkpoint: Path):
        self.checkpoint = checkpoint
        self.request = StopRequest()
        """The handler to install for SIGTERM and SIGINT while training (:func:`handling_stop_signals`)."""

    @property
    def signum(self) -> int | None:
        return self.request.signum

    def on_train_start(self, trainer, pl_module) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.request)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        requested = torch.tensor(self.signum or 0, device=pl_module.device)
        signum = int(trainer.strategy.reduce(requested, reduce_op="max"))
        if signum:
            self.request.signum = signum
            raise _StopRequested()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, _StopRequested):
            # un-count the batch fetched for the step that did not run: the checkpoint then reads as
            # saved after the last step, as Lightning's own SIGTERM stop saves it
            progress = trainer.fit_loop.epoch_loop.batch_progress
            progress.total.ready -= 1
            progress.current.ready -= 1
        if isinstance(exception, (_StopRequested, SIGTERMException)):
            trainer.save_checkpoint(self.checkpoint, weights_only=False)


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return [] if a == b else [prefix]
    return [d for key in sorted(set(a) | set(b)) for d in _differences(a.get(key), b.get(key), f"{prefix}{key}.")]


def _check_same_config(cfg: ExperimentConfig, saved: ExperimentConfig, source: Path) -> None:
    if saved != cfg:
        fields = ", ".join(d.rstrip(".") for d in _differences(saved.to_dict(), cfg.to_dict()))
        raise ConfigError(f"{source}: --resume with a different config than the run was started with ({fields}); "
                          "use the same --config/--set, or a new --out")


class RunExistsError(FileExistsError):
    pass


def resume_checkpoint(cfg: ExperimentConfig, out: Path, resume: bool) -> dict[str, Any] | None:
    """The checkpoint to continue from (None: start from scratch), after checking that ``out`` may be used.

    Refuses to start a fresh run over an existing one (nothing is overwritten), and to resume with a
    config other than both the run's config file and the checkpoint's own record of it.
    """
    run = RunDir(out)
    last = run.checkpoint("last")
    if not resume:
        if last.exists():
            raise RunExistsError(f"{out} already holds a run ({last}); pass --resume to continue it "
                                 "or choose another --out")
        return None
    if run.config.exists():
        _check_same_config(cfg, load_config(run.config), run.config)
    if not last.exists():
        print(f"{last} not found: starting from scratch", file=sys.stderr)
        return None
    checkpoint = read_checkpoint(last)
    hparams = checkpoint.get("hyper_parameters")
    if not (isinstance(hparams, dict) and isinstance(hparams.get("steps_per_epoch"), int)
            and isinstance(checkpoint.get("global_step"), int)):
        raise CheckpointError(f"{last}: not a checkpoint written by `libra train` (no global_step or "
                              "hyper-parameters); delete it and train again")
    _check_same_config(cfg, validate_config(hparams.get("config"), f"{last}: config in its hyper-parameters"), last)
    return checkpoint


def _write_config(cfg: ExperimentConfig, out: Path, resume: bool) -> None:
    """Writes the run's config file; a resumed run keeps the one there (:func:`resume_checkpoint` found it
    equal), a fresh run replaces one left by an earlier start."""
    config_file = RunDir(out).config
    if resume and config_file.exists():
        return
    replace_atomic(config_file, lambda tmp: save_config(cfg, tmp))


def build_trainer(cfg: ExperimentConfig, out: Path, progress_bar: bool, callbacks: list[Callback] = (),
                  start_step: int = 0) -> L.Trainer:
    t = cfg.train
    run = RunDir(out)
    best_file, last_file = run.checkpoint("best"), run.checkpoint("last")
    best = ModelCheckpoint(dirpath=best_file.parent, filename=best_file.stem, monitor="val/AP", mode="max",
                           save_top_k=1, enable_version_counter=False)
    # every epoch (a monitored callback's save_last follows only the epochs that improve val/AP)
    last = ModelCheckpoint(dirpath=last_file.parent, filename=last_file.stem, save_on_train_epoch_end=True,
                           enable_version_counter=False)
    extra = [] if progress_bar else [PlainProgress(t.log_every_n_steps)]
    return L.Trainer(
        accelerator=cfg.trainer.accelerator, devices=cfg.trainer.devices, num_nodes=cfg.trainer.num_nodes,
        strategy=cfg.trainer.strategy, precision=cfg.trainer.precision,
        max_epochs=t.epochs, max_steps=t.max_steps, gradient_clip_val=t.grad_clip,
        check_val_every_n_epoch=t.val_every_n_epochs, num_sanity_val_steps=0,
        logger=ResumingCSVLogger(run, start_step), log_every_n_steps=t.log_every_n_steps,
        callbacks=[best, last, *extra, *callbacks], plugins=[AtomicCheckpointIO()],
        enable_progress_bar=progress_bar, enable_model_summary=False,
        use_distributed_sampler=False, deterministic=False,
    )


def train(cfg: ExperimentConfig, out: Path, resume: bool = False, progress_bar: bool | None = None,
          callbacks: list[Callback] = (), force: bool = False) -> DetectionModule | None:
    """Fit ``cfg`` into run directory ``out`` and parse its curves; returns the trained module, or None if
    ``resume`` finds the run already complete (then nothing is changed). Raises :class:`TrainingStopped`
    on a signal.

    Every input (config, data, resumed checkpoint, model) is checked before anything is written. A fresh
    run goes only into a run directory libra made, or an empty or new one (any with ``force``), and the
    process holds the directory's write lock for the run's life (under DDP, rank 0 does).
    """
    if not resume:
        check_replaceable(out, RUN_WRITERS, force)
    with run_lock(out) if rank_zero_only.rank == 0 else nullcontext():
        return _train(cfg, out, resume, progress_bar, callbacks)


def device_line(trainer: L.Trainer) -> str:
    """What the run trains on, e.g. ``training on cpu: 1 process x 2 threads`` or ``training on cuda: 8 processes
    (2 nodes) x 16 threads``."""
    kind = type(trainer.accelerator).__name__.removesuffix("Accelerator").lower()
    nodes = f" ({trainer.num_nodes} nodes)" if trainer.num_nodes > 1 else ""
    processes = trainer.world_size
    return (f"training on {kind}: {processes} process{'es' if processes > 1 else ''}{nodes} x "
            f"{torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''}")


def _train(cfg: ExperimentConfig, out: Path, resume: bool, progress_bar: bool | None,
           callbacks: list[Callback]) -> DetectionModule | None:
    check_backbone_weights(cfg.model)
    checkpoint = resume_checkpoint(cfg, out, resume)
    if checkpoint is not None:
        total = schedule_steps(cfg, checkpoint["hyper_parameters"]["steps_per_epoch"])
        if checkpoint["global_step"] >= total:
            _write_config(cfg, out, resume)
            print(f"{out}: already complete ({total} steps trained); nothing to do")
            return None
    data = DetectionDataModule(cfg)
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    run = RunDir(out)
    last = run.checkpoint("last")
    stop = StopOnSignal(last)
    start_step = checkpoint["global_step"] if checkpoint is not None else 0
    try:
        trainer = build_trainer(cfg, out, sys.stderr.isatty() if progress_bar is None else progress_bar,
                                [*callbacks, TrainingCost(run), stop], start_step)
    except (MisconfigurationException, ValueError) as exc:
        raise ConfigError(f"trainer: {exc} (trainer settings: {cfg.trainer.model_dump(mode='json')})") from None
    module = DetectionModule(cfg.to_dict(), data.num_classes, data.label_to_category_id,
                             data.steps_per_epoch(trainer.world_size), data.val_gt)
    initialised = init_detector(module.model, cfg.model) if checkpoint is None and cfg.model.init_from else None
    if writer_of(out) not in RUN_WRITERS:
        mark(out, TRAIN)
    _write_config(cfg, out, resume)
    if initialised is not None:
        print(initialised.summary(), flush=True)
        write_json_atomic(run.init_report, initialised.to_dict())
    if trainer.is_global_zero:
        print(device_line(trainer), file=sys.stderr, flush=True)
    with handling_stop_signals(stop.request):
        try:
            trainer.fit(module, datamodule=data, ckpt_path=last if checkpoint is not None else None)
        except (_StopRequested, SIGTERMException):
            raise TrainingStopped(stop.signum or signal.SIGTERM, last) from None
        finally:  # a stopped or failed session's curves too: they are what dispatch shows of the run
            if trainer.is_global_zero:
                write_curves(run)
    return module
