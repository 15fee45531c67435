"""One trial: sample, compose the config, train with Lightning, report val AP per epoch, prune.

``TrialReporter`` is a Lightning callback: after each validation it reports the epoch's metric to
the trial (``trial.report(value, step=epoch)``), logs it to the trial's MLflow run and, when the
pruner says so, raises ``optuna.TrialPruned``. Lightning re-raises exceptions from callbacks after
its teardown, so the trial ends PRUNED. The objective value is the metric at the last validated
epoch.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from pathlib import Path

import optuna
from lightning.pytorch.callbacks import Callback
from optuna.trial import TrialState

from detection.engine.train import train
from detection.ownership import TRAIN, remove_owned
from detection.run_dir import RunDir
from pipeline.report.results import ap_points
from pipeline.tuning.liveness import OWNER_ATTR, worker_identity
from pipeline.tuning.mlflow_runs import StudyTracker
from pipeline.tuning.plan import TuningPlan


class TrialReporter(Callback):
    def __init__(self, trial: optuna.Trial, metric: str,
                 log_epoch: Callable[[int, dict[str, float]], None] | None = None):
        self.trial = trial
        self.metric = metric
        self.log_epoch = log_epoch
        self.history: dict[int, float] = {}

    @property
    def last(self) -> float | None:
        return self.history[max(self.history)] if self.history else None

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        loss = trainer.callback_metrics.get("train/loss_epoch")
        if loss is not None and self.log_epoch is not None:
            self.log_epoch(trainer.current_epoch, {"train/loss": float(loss)})

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: ap_points(float(v)) for k, v in trainer.callback_metrics.items()
                   if k.startswith("val/") and not k.endswith("_bar")}
        if self.metric not in metrics:
            raise RuntimeError(f"validation did not log {self.metric} (logged: {sorted(metrics)})")
        epoch, value = trainer.current_epoch, metrics[self.metric]
        self.history[epoch] = value
        self.trial.report(value, step=epoch)
        if self.log_epoch is not None:
            self.log_epoch(epoch, metrics)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {epoch}: {self.metric} = {value:.4f}")


class TrialObjective:
    """The function ``study.optimize`` calls. ``on_started`` runs once the trial exists and its
    owner is recorded (the worker releases its study lock there)."""

    def __init__(self, plan: TuningPlan, tracker: StudyTracker, parent_run_id: str, study_name: str,
                 work_dir: Path, keep_checkpoints: bool = False, on_started: Callable[[], None] | None = None,
                 run_tags: dict[str, str] | None = None):
        self.plan, self.tracker, self.parent_run_id, self.study_name = plan, tracker, parent_run_id, study_name
        self.work_dir, self.keep_checkpoints, self.on_started = work_dir, keep_checkpoints, on_started
        self.run_tags = run_tags or {}
        self.trial_number: int | None = None
        self.error: str | None = None

    def __call__(self, trial: optuna.Trial) -> float:
        self.trial_number = trial.number
        try:
            return self._run(trial)
        except Exception as exc:
            if self.error is None and not isinstance(exc, optuna.TrialPruned):
                self.error = "".join(traceback.format_exception_only(exc)).strip()
            raise

    def _run(self, trial: optuna.Trial) -> float:
        trial.set_user_attr(OWNER_ATTR, worker_identity())
        if self.on_started is not None:
            self.on_started()
        values = self.plan.spec.suggest(trial)
        cfg = self.plan.config(values)
        out = self.work_dir / f"trial_{trial.number:05d}"
        remove_owned(out, (TRAIN,))  # left by a study of the same name that was deleted from the storage
        run_id = self.tracker.start_trial(self.parent_run_id, self.study_name, trial, cfg.to_dict(), self.run_tags)
        print(f"trial {trial.number}: {', '.join(f'{k}={v}' for k, v in trial.params.items())} -> {out}", flush=True)
        reporter = TrialReporter(trial, f"val/{self.plan.spec.metric}",
                                 lambda epoch, m: self.tracker.log_epoch(run_id, epoch, m))
        files = [RunDir(out).config, RunDir(out).training_log]
        try:
            train(cfg, out, progress_bar=False, callbacks=[reporter])
            if reporter.last is None:
                raise RuntimeError("training ended without a validation: no objective value "
                                   "(check train.epochs and train.val_every_n_epochs)")
        except optuna.TrialPruned as exc:
            self.tracker.end_trial(run_id, TrialState.PRUNED, reporter.last, str(exc), files)
            raise
        except SystemExit as exc:  # Lightning turns Ctrl-C into sys.exit(1): record the trial as failed
            self._fail(trial, run_id, files, f"interrupted ({exc!r})")
            raise KeyboardInterrupt from exc
        except BaseException as exc:
            self._fail(trial, run_id, files, "".join(traceback.format_exception_only(exc)).strip())
            raise
        finally:
            if not self.keep_checkpoints:
                remove_owned(RunDir(out).checkpoints, (TRAIN,), owner=out)
        self.tracker.end_trial(run_id, TrialState.COMPLETE, reporter.last, files=files)
        return reporter.last

    def _fail(self, trial: optuna.Trial, run_id: str, files: list[Path], message: str) -> None:
        self.error = message
        try:
            trial.set_user_attr("error", message[:2000])
            self.tracker.end_trial(run_id, TrialState.FAIL, message=message, files=files)
        except Exception:  # noqa: BLE001 - keep the original error
            pass
