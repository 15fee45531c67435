"""A trial's value: its mean paired difference to the default configuration over the search's seeds.

The same configuration moves by several AP between seeds on the tiny profile, more than a knob is likely
to, so one training per trial would rank trials by their seeds' luck. Each trial therefore trains at every
seed of ``--trial-seeds`` (0, 1, ...), and so does the default configuration (the study's ``baseline``),
once per seed per study (:func:`default_runs`; kept in the study's user attributes ``default_seed<k>``,
never a trial). A seed fixes a training's data order and every module's initial weights
(``detection/models/init_streams.py``), so a trial and the default at the same seed start alike and see
the same batches: their difference cancels what the seed does to both (paired seeds). Every training
validates on the same images (the profile's ``train.val_max_images``, the first of the validation set).

After each validation the trial reports ``its val AP - the default's val AP`` at that seed and epoch, at step
``seed index x epochs + epoch``, so the median pruner compares each trial with the others at the same seed
and epoch, difference with difference. The value is the mean over seeds of the difference at the last
epoch. Each trial's per-seed values (AP, the default's AP, the difference, wall and CPU seconds) are its
user attribute ``seeds``; its MLflow run has them as ``seed<k>/...`` metrics.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from pydantic import BaseModel

from detection.config import ExperimentConfig
from detection.run_dir import RunDir
from pipeline.tuning.liveness import OWNER_ATTR, worker_identity
from pipeline.tuning.mlflow_runs import StudyTracker
from pipeline.tuning.plan import TuningPlan
from pipeline.tuning.training import Compute, Trainer, timed, train_in

SEEDS_ATTR = "seeds"
"""A trial's user attribute: per seed, its AP, the default's, their difference, and the training's cost."""
OBJECTIVE_ATTR = "objective"
"""The study's user attribute saying what a trial's value is (a resumed study must score trials alike)."""


@dataclass(frozen=True)
class PairedObjective:
    """What a trial's value is: ``metric`` (e.g. ``val/AP``) minus the default's, mean over ``seeds``."""

    metric: str
    seeds: tuple[int, ...]

    def as_attr(self) -> dict[str, Any]:
        return {"value": "mean paired difference to the default", "metric": self.metric, "seeds": list(self.seeds)}

    def step(self, seed_index: int, epochs: int, epoch: int) -> int:
        """The step a trial reports the difference at ``epoch`` of its ``seed_index``-th seed at."""
        return seed_index * epochs + epoch


class DefaultRun(BaseModel):
    """The default configuration trained at one seed of the search."""

    seed: int
    validations: dict[int, float]
    """The objective's metric (AP points) after each validated epoch."""
    compute: Compute

    @property
    def value(self) -> float:
        return self.validations[max(self.validations)]


DEFAULT_ATTR_PREFIX = "default_seed"
"""The study's user attribute ``default_seed<k>``: the default configuration trained at seed k."""


def default_attr(seed: int) -> str:
    return f"{DEFAULT_ATTR_PREFIX}{seed}"


def default_runs(study: optuna.Study, plan: TuningPlan, objective: PairedObjective, trainer: Trainer,
                 work_dir: Path, keep_checkpoints: bool, log: Callable[[int, dict[str, float]], None] | None = None
                 ) -> dict[int, DefaultRun]:
    """The default configuration at each seed of ``objective``: read from the study, or trained now and kept
    there. ``log(epoch, metrics)`` receives the new trainings' values (the study's MLflow run). Call it under
    the study's lock, so that workers train each once."""
    runs = {}
    for seed in objective.seeds:
        stored = study.user_attrs.get(default_attr(seed))
        if stored is None:
            out = work_dir / "default" / f"seed{seed}"
            print(f"default configuration, seed {seed} -> {out}", flush=True)
            try:
                with timed() as spent:
                    trained = train_in(trainer, plan.config(plan.default_values, seed), out, keep_checkpoints)
                trained.last(objective.metric)
                validations = {epoch: metrics[objective.metric] for epoch, metrics in trained.validations.items()}
            except Exception as exc:
                raise RuntimeError(f"the default configuration failed to train at seed {seed} ({exc}); trials are "
                                   "scored against it, so none can run: fix the cause and rerun") from exc
            stored = DefaultRun(seed=seed, validations=validations, compute=spent).model_dump(mode="json")
            study.set_user_attr(default_attr(seed), stored)
            if log is not None:
                for epoch, value in validations.items():
                    log(epoch, {f"default/seed{seed}/{objective.metric}": value})
        runs[seed] = DefaultRun.model_validate(stored)
    return runs


def search_compute(study: optuna.Study) -> tuple[Compute, Compute]:
    """What the search spent: its trials' trainings (pruned and failed ones too; a training killed with its
    worker is not counted), and the default's trainings at the search's seeds."""
    trials = sum((Compute.model_validate(record["compute"]) for trial in study.get_trials(deepcopy=False)
                  for record in trial.user_attrs.get(SEEDS_ATTR, {}).values()), Compute())
    defaults = sum((DefaultRun.model_validate(value).compute for key, value in study.user_attrs.items()
                    if key.startswith(DEFAULT_ATTR_PREFIX)), Compute())
    return trials, defaults


class TrialObjective:
    """The function ``study.optimize`` calls. ``on_started`` runs once the trial exists and its owner is
    recorded (the worker releases its study lock there)."""

    def __init__(self, plan: TuningPlan, objective: PairedObjective, defaults: dict[int, DefaultRun],
                 trainer: Trainer, tracker: StudyTracker, parent_run_id: str, study_name: str, work_dir: Path,
                 keep_checkpoints: bool = False, on_started: Callable[[], None] | None = None,
                 run_tags: dict[str, str] | None = None):
        self.plan, self.objective, self.defaults, self.trainer = plan, objective, defaults, trainer
        self.tracker, self.parent_run_id, self.study_name = tracker, parent_run_id, study_name
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
        configs = {seed: self.plan.config(values, seed) for seed in self.objective.seeds}
        trial_dir = self.work_dir / f"trial_{trial.number:05d}"
        run_id = self.tracker.start_trial(self.parent_run_id, self.study_name, trial,
                                          next(iter(configs.values())).to_dict(), self.run_tags, self.objective.seeds)
        print(f"trial {trial.number}: {', '.join(f'{k}={v}' for k, v in trial.params.items())}, seeds "
              f"{list(self.objective.seeds)} -> {trial_dir}", flush=True)
        runs = {seed: RunDir(trial_dir / f"seed{seed}") for seed in configs}
        artifacts = [(path, f"seed{seed}") for seed, run in runs.items() for path in (run.config, run.training_log)]
        per_seed: dict[str, dict[str, Any]] = {}
        try:
            for index, (seed, cfg) in enumerate(configs.items()):
                per_seed[str(seed)] = self._train_seed(trial, run_id, index, seed, cfg, runs[seed].path, per_seed)
        except optuna.TrialPruned as exc:
            self.tracker.end_trial(run_id, TrialState.PRUNED, None, str(exc), artifacts)
            raise
        except SystemExit as exc:  # Lightning turns Ctrl-C into sys.exit(1): record the trial as failed
            self._fail(trial, run_id, artifacts, f"interrupted ({exc!r})")
            raise KeyboardInterrupt from exc
        except BaseException as exc:
            self._fail(trial, run_id, artifacts, "".join(traceback.format_exception_only(exc)).strip())
            raise
        value = sum(record["difference"] for record in per_seed.values()) / len(per_seed)
        self.tracker.end_trial(run_id, TrialState.COMPLETE, value, artifacts=artifacts)
        return value

    def _train_seed(self, trial: optuna.Trial, run_id: str, index: int, seed: int, cfg: ExperimentConfig, out: Path,
                    per_seed: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Train the trial at ``seed``, reporting its paired difference after each validation; returns its
        record (also stored in the trial's ``seeds`` attribute, with the cost, however the training ends)."""
        default = self.defaults[seed]
        metric = self.objective.metric

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            logged = {f"seed{seed}/{key}": value for key, value in metrics.items()}
            if metric in metrics:
                if epoch not in default.validations:
                    raise RuntimeError(f"the default configuration has no {metric} at epoch {epoch} of seed {seed} "
                                       f"(validated epochs: {sorted(default.validations)}): nothing to pair with")
                difference = metrics[metric] - default.validations[epoch]
                logged[f"seed{seed}/difference"] = difference
                trial.report(difference, step=self.objective.step(index, cfg.train.epochs, epoch))
            self.tracker.log_epoch(run_id, epoch, logged)
            if metric in metrics and trial.should_prune():
                raise optuna.TrialPruned(f"pruned at seed {seed}, epoch {epoch}: {metric} minus the default's = "
                                         f"{difference:+.2f}")

        record: dict[str, Any] = {"default": default.value}
        try:
            with timed() as spent:
                trained = train_in(self.trainer, cfg, out, self.keep_checkpoints, on_epoch)
            record["value"] = trained.last(metric)
            record["difference"] = record["value"] - default.value
        finally:
            record["compute"] = spent.model_dump()
            trial.set_user_attr(SEEDS_ATTR, {**per_seed, str(seed): record})
        self.tracker.log_epoch(run_id, 0, {f"seed{seed}/final/{metric}": record["value"],
                                        f"seed{seed}/final/default_{metric}": default.value,
                                        f"seed{seed}/final/difference": record["difference"]})
        return record

    def _fail(self, trial: optuna.Trial, run_id: str, artifacts: list[tuple[Path, str]], message: str) -> None:
        self.error = message
        try:
            trial.set_user_attr("error", message[:2000])
            self.tracker.end_trial(run_id, TrialState.FAIL, message=message, artifacts=artifacts)
        except Exception:  # noqa: BLE001 - keep the original error
            pass
