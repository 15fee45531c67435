"""MLflow for a study: one experiment per study, a parent run for the study, a nested run per trial.

Written with ``MlflowClient`` (explicit run ids, no global "active run"), so several worker processes
log into the same store side by side. The parent run's id is kept in the Optuna study's user
attributes, so every worker, on any host, and every resume nests its trials under the same parent.
Trial runs carry the tags ``optuna.study`` and ``optuna.trial_number``, params (the sampled values
and the flattened trial config), ``val/*`` per epoch (step = epoch), and the trial's final state
(tag ``optuna.state``; run status FINISHED for COMPLETE, KILLED for PRUNED, FAILED for FAIL).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from pipeline.tracking import EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND, artifact_location, flatten_params, tracking_uri

if TYPE_CHECKING:
    from mlflow import MlflowClient

PARENT_ATTR = "mlflow_parent_run_id"
TRIAL_RUN_ATTR = "mlflow_run_id"
RUN_STATUS = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED", TrialState.FAIL: "FAILED"}


def _now_ms() -> int:
    return int(time.time() * 1000)


def Metric(key: str, value: float, timestamp: int, step: int):  # noqa: N802 - mlflow.entities, imported late
    from mlflow.entities import Metric as _Metric

    return _Metric(key, value, timestamp, step)


def Param(key: str, value: str):  # noqa: N802
    from mlflow.entities import Param as _Param

    return _Param(key, value)


def RunTag(key: str, value: str):  # noqa: N802
    from mlflow.entities import RunTag as _RunTag

    return _RunTag(key, value)


class StudyTracker:
    def __init__(self, experiment_name: str, uri: str | None = None):
        self.uri = uri or tracking_uri()
        self.experiment_name = experiment_name
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None

    @property
    def client(self) -> MlflowClient:
        """Made on first use: an SQLite store is created when the client opens it."""
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(self.uri)
        return self._client

    def check(self) -> None:
        """Reach the store (creating an SQLite database if needed); nothing is written."""
        try:
            self.client.search_experiments(max_results=1)
        except Exception as exc:  # noqa: BLE001 - MLflow raises many kinds; all mean "unreachable"
            raise ValueError(f"cannot reach the MLflow store {self.uri}: {str(exc).splitlines()[0]}") from None

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            found = self.client.get_experiment_by_name(self.experiment_name)
            if found is None:
                try:
                    self._experiment_id = self.client.create_experiment(
                        self.experiment_name, artifact_location=artifact_location(self.uri),
                        tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
                except Exception:  # noqa: BLE001 - created meanwhile by another worker
                    found = self.client.get_experiment_by_name(self.experiment_name)
                    if found is None:
                        raise
            if found is not None:
                self._experiment_id = found.experiment_id
        return self._experiment_id

    # ---- the study's parent run -------------------------------------------------------------------
    def parent_run(self, study: optuna.Study, tags: dict[str, str], params: dict[str, Any]) -> str:
        """The study's parent run (created on first use, reopened as RUNNING on resume)."""
        run_id = study.user_attrs.get(PARENT_ATTR)
        if run_id:
            try:
                run = self.client.get_run(run_id)
                if run.info.experiment_id == self.experiment_id and run.info.lifecycle_stage == "active":
                    if run.info.status != "RUNNING":
                        self.client.update_run(run_id, status="RUNNING")
                    return run_id
            except Exception:  # noqa: BLE001 - deleted, or another store: make a new one
                pass
        run = self.client.create_run(self.experiment_id, run_name=study.study_name,
                                     tags={**tags, "optuna.study": study.study_name, "optuna.role": "study"})
        self.client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        study.set_user_attr(PARENT_ATTR, run.info.run_id)
        return run.info.run_id

    def finish_parent(self, run_id: str, done: bool) -> None:
        self.client.set_terminated(run_id, status="FINISHED" if done else "KILLED")

    def log_study_outputs(self, run_id: str, summary: dict[str, Any], files: list[Path]) -> None:
        metrics = [Metric(f"study/{k}", float(v), _now_ms(), 0) for k, v in summary["counts"].items()]
        if summary.get("best_value") is not None:
            metrics.append(Metric(f"best/{summary['metric']}", float(summary["best_value"]), _now_ms(), 0))
        tags = [RunTag("best.trial_number", str(summary.get("best_trial")))]
        tags += [RunTag(f"best.{k}", str(v)) for k, v in (summary.get("best_params") or {}).items()]
        self.client.log_batch(run_id, metrics=metrics, tags=tags)
        for path in files:
            self.client.log_artifact(run_id, str(path), artifact_path="tuning")

    # ---- one run per trial ------------------------------------------------------------------------
    def start_trial(self, parent_run_id: str, study_name: str, trial: optuna.Trial, config: dict[str, Any],
                    tags: dict[str, str]) -> str:
        run = self.client.create_run(
            self.experiment_id, run_name=f"trial-{trial.number:04d}",
            tags={**tags, "mlflow.parentRunId": parent_run_id, "optuna.study": study_name,
                  "optuna.trial_number": str(trial.number), "optuna.role": "trial", "optuna.state": "RUNNING"})
        run_id = run.info.run_id
        trial.set_user_attr(TRIAL_RUN_ATTR, run_id)
        params = {**{f"trial.{k}": v for k, v in trial.params.items()}, **flatten_params(config)}
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start:start + 100])
        return run_id

    def log_epoch(self, run_id: str, epoch: int, metrics: dict[str, float]) -> None:
        now = _now_ms()
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, epoch) for k, v in metrics.items()])

    def end_trial(self, run_id: str, state: TrialState, value: float | None = None, message: str = "",
                  files: list[Path] = ()) -> None:
        tags = [RunTag("optuna.state", state.name)]
        if message:
            tags.append(RunTag("optuna.message", message[:5000]))
        metrics = [Metric("objective", float(value), _now_ms(), 0)] if value is not None else []
        self.client.log_batch(run_id, metrics=metrics, tags=tags)
        for path in files:
            if path.exists():
                self.client.log_artifact(run_id, str(path))
        self.client.set_terminated(run_id, status=RUN_STATUS.get(state, "FAILED"))

    def fail_orphan(self, study_name: str, trial: FrozenTrial, reason: str) -> None:
        """Close the MLflow run of a trial whose worker died (found by attribute, else by tags)."""
        run_ids = [trial.user_attrs[TRIAL_RUN_ATTR]] if TRIAL_RUN_ATTR in trial.user_attrs else [
            r.info.run_id for r in self.client.search_runs(
                [self.experiment_id],
                f"tags.`optuna.study` = '{study_name}' and tags.`optuna.trial_number` = '{trial.number}' "
                "and attributes.status = 'RUNNING'")]
        for run_id in run_ids:
            try:
                self.end_trial(run_id, TrialState.FAIL, message=reason)
            except Exception:  # noqa: BLE001 - the store may refuse a run it already closed
                pass

    def trial_runs(self, study_name: str) -> list:
        """All trial runs of a study (for tests and reports)."""
        runs, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id],
                                           f"tags.`optuna.study` = '{study_name}' and tags.`optuna.role` = 'trial'",
                                           max_results=1000, page_token=token)
            runs += list(page)
            token = page.token
            if not token:
                return runs
