"""MLflow logging of a study: one experiment per study, a parent run for the study, a nested run per trial.

Written with ``MlflowClient`` (explicit run ids, no global "active run"), so several worker processes
log into the same store side by side. The parent run's id is kept in the Optuna study's user
attributes, so every worker, on any host, and every resume nests its trials under the same parent;
it is looked up or created under the store's lock (see :func:`pipeline.tracking.store.store_lock`), and
found by the study's ``uid`` tag if the attribute was never written.
Trial runs carry the tags ``optuna.study`` and ``optuna.trial_number``, params (the sampled values
and the flattened trial config), ``val/*`` per epoch (step = epoch), and the trial's final state
(tag ``optuna.state``; run status FINISHED for COMPLETE, KILLED for PRUNED, FAILED for FAIL).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from pipeline.tracking.store import (
    flatten_params,
    get_or_create_experiment,
    now_ms,
    open_store,
    search_all_runs,
    store_lock,
    tracking_uri,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

PARENT_ATTR = "mlflow_parent_run_id"
TRIAL_RUN_ATTR = "mlflow_run_id"
RUN_STATUS = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED", TrialState.FAIL: "FAILED"}


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
        """Made on first use, by :func:`pipeline.tracking.store.open_store` (which creates a new SQLite store)."""
        if self._client is None:
            self._client = open_store(self.uri)
        return self._client

    def check(self) -> None:
        """Reach the store, within a bounded time; raises TrackingStoreError (a ValueError) naming it."""
        _ = self.client

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            self._experiment_id = get_or_create_experiment(self.client, self.uri, self.experiment_name)
        return self._experiment_id

    # ---- the study's parent run -------------------------------------------------------------------
    def parent_run(self, study: optuna.Study, tags: dict[str, str], params: dict[str, Any]) -> str:
        """The study's parent run (created on first use, reopened as RUNNING on resume).

        The run named by the study's attribute if it is still there; else the oldest run tagged with the
        study's uid (one whose attribute was lost); else a new one. Under the store's lock, so processes
        starting the same study at once share one parent.
        """
        with store_lock(self.uri):
            attrs = study.user_attrs
            run_id = attrs.get(PARENT_ATTR)
            if not (run_id and self._usable(run_id)):
                uid = attrs.get("uid")
                run_id = (uid and self._tagged_parent(uid)) or self._new_parent(study.study_name, uid, tags, params)
                study.set_user_attr(PARENT_ATTR, run_id)
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def _usable(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException:  # deleted for good, or recorded in another store
            return False
        return run.info.experiment_id == self.experiment_id and run.info.lifecycle_stage == "active"

    def _tagged_parent(self, uid: str) -> str | None:
        runs = self.client.search_runs([self.experiment_id],
                                       f"tags.`optuna.study_uid` = '{uid}' and tags.`optuna.role` = 'study'",
                                       max_results=1, order_by=["attributes.start_time ASC"])
        return runs[0].info.run_id if runs else None

    def _new_parent(self, study_name: str, uid: str | None, tags: dict[str, str], params: dict[str, Any]) -> str:
        tags = {**tags, "optuna.study": study_name, "optuna.role": "study"}
        if uid:
            tags["optuna.study_uid"] = uid
        run = self.client.create_run(self.experiment_id, run_name=study_name, tags=tags)
        self.client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        return run.info.run_id

    def finish_parent(self, run_id: str, done: bool) -> None:
        self.client.set_terminated(run_id, status="FINISHED" if done else "KILLED")

    def log_study_outputs(self, run_id: str, summary: dict[str, Any], files: list[Path]) -> None:
        """The study's counts, the search's best (``best/search_difference``), the validation (per validated
        trial ``validation/trial_<n>/{delta, ci_low, ...}`` and its AP per seed, step = seed; the default's
        ``validation/default/AP``; tags ``validation.trial_<n>.verdict`` and ``validation.decision``), the compute
        (``compute/<part>/{trainings, wall_s, cpu_s}``) and the report files."""
        now = now_ms()
        metrics = [Metric(f"study/{k}", float(v), now, 0) for k, v in summary["counts"].items()]
        if summary.get("best_value") is not None:
            metrics.append(Metric("best/search_difference", float(summary["best_value"]), now, 0))
        metrics += [Metric(f"compute/{part}/{k}", float(v), now, 0)
                    for part, spent in summary["compute"].items() for k, v in spent.items()]
        tags = [RunTag("best.trial_number", str(summary.get("best_trial"))),
                RunTag("validation.decision", summary["decision"]["why"][:5000]),
                RunTag("validation.adopted_trial", str(summary["decision"]["adopted_trial"]))]
        tags += [RunTag(f"best.{k}", str(v)) for k, v in (summary.get("best_params") or {}).items()]
        validation = summary.get("validation")
        if validation is not None:
            metrics += [Metric("validation/default/AP", float(ap), now, int(seed))
                        for seed, ap in validation["default_ap"].items() if ap is not None]
            for c in validation["candidates"]:
                name = f"trial_{c['trial']}"
                tags.append(RunTag(f"validation.{name}.verdict", c["verdict"]))
                metrics += [Metric(f"validation/{name}/{k}", float(v), now, 0) for k, v in c["statistics"].items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)]
                metrics += [Metric(f"validation/{name}/AP", float(ap), now, int(seed))
                            for seed, ap in c["ap"].items() if ap is not None]
        self.client.log_batch(run_id, metrics=metrics, tags=tags)
        for path in files:
            self.client.log_artifact(run_id, str(path), artifact_path="tuning")

    # ---- one run per trial ------------------------------------------------------------------------
    def start_trial(self, parent_run_id: str, study_name: str, trial: optuna.Trial, config: dict[str, Any],
                    tags: dict[str, str], seeds: tuple[int, ...]) -> str:
        """The trial's run: the sampled values, the seeds it trains at and the config of its first seed
        (the others differ only in ``train.seed``) as params."""
        run = self.client.create_run(
            self.experiment_id, run_name=f"trial-{trial.number:04d}",
            tags={**tags, "mlflow.parentRunId": parent_run_id, "optuna.study": study_name,
                  "optuna.trial_number": str(trial.number), "optuna.role": "trial", "optuna.state": "RUNNING"})
        run_id = run.info.run_id
        trial.set_user_attr(TRIAL_RUN_ATTR, run_id)
        params = {**{f"trial.{k}": v for k, v in trial.params.items()}, "trial.seeds": " ".join(map(str, seeds)),
                  **flatten_params(config)}
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start:start + 100])
        return run_id

    def log_epoch(self, run_id: str, epoch: int, metrics: dict[str, float]) -> None:
        now = now_ms()
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, epoch) for k, v in metrics.items()])

    def end_trial(self, run_id: str, state: TrialState, value: float | None = None, message: str = "",
                  artifacts: list[tuple[Path, str]] = ()) -> None:
        """Close a trial's run with its state, its value (``objective``) and ``artifacts`` (file, folder)."""
        tags = [RunTag("optuna.state", state.name)]
        if message:
            tags.append(RunTag("optuna.message", message[:5000]))
        metrics = [Metric("objective", float(value), now_ms(), 0)] if value is not None else []
        self.client.log_batch(run_id, metrics=metrics, tags=tags)
        for path, folder in artifacts:
            if path.exists():
                self.client.log_artifact(run_id, str(path), artifact_path=folder)
        self.client.set_terminated(run_id, status=RUN_STATUS.get(state, "FAILED"))

    def fail_orphan(self, study_name: str, trial: FrozenTrial, reason: str) -> None:
        """Close the MLflow run of a trial whose worker died (found by attribute, else by tags)."""
        run_ids = [trial.user_attrs[TRIAL_RUN_ATTR]] if TRIAL_RUN_ATTR in trial.user_attrs else [
            r.info.run_id for r in search_all_runs(
                self.client, self.experiment_id,
                f"tags.`optuna.study` = '{study_name}' and tags.`optuna.trial_number` = '{trial.number}' "
                "and attributes.status = 'RUNNING'")]
        for run_id in run_ids:
            try:
                self.end_trial(run_id, TrialState.FAIL, message=reason)
            except Exception:  # noqa: BLE001 - the store may refuse a run it already closed
                pass
