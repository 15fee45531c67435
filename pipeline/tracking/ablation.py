"""MLflow logging of an ablation: what ``libra report`` wrote on a parent run, each run's files on a child run.

An ablation is one *parent* run with one *child* run per trained (detector, combination, seed).
Re-logging never duplicates runs silently (see :func:`log_ablation`):

* the parent is identified by ``libra.ablation_key``, a hash of the ablation's parameters and of
  its runs' keys: the same ablation reuses its parent; any parameter change (a ``dvc exp run -S``
  experiment, a knob) makes a new parent, and earlier ablations stay in the store for comparison;
* a child is identified inside its parent by ``libra.run_key``, the run's key
  (:func:`pipeline.plan.runplan.compute_run_key`) as `libra dispatch` wrote it; it is reused when its
  result files are unchanged (tag ``libra.results_digest``) and otherwise replaced: the old run is
  deleted (MLflow's soft delete: lifecycle "deleted", restorable, purged by ``mlflow gc``) and a new
  one logged.

Nothing is recomputed here: the parent gets the report directory (``metrics.json`` as metrics, the
claims' verdicts as tags, every file as an artifact), a child its run directory's files, the
figures the report drew for it (``<report>/runs/<run name>/``), its IoU distributions and AP by IoU as
curves over IoU (step = IoU in percent), ``metrics.json``'s numbers (COCO metrics as ``eval/*``, the run's
cost as ``cost/*``) and, when the run recorded them,
``system_metrics.csv``'s rows with their own timestamps and steps.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from detection.engine.coco_eval import BOX_METRICS
from detection.io import digest_files
from detection.run_dir import RunDir
from pipeline.tracking.store import (
    dvc_experiment_tags,
    flatten_params,
    get_or_create_experiment,
    git_state,
    metric_key,
    now_ms,
    open_store,
    search_all_runs,
    store_lock,
    tracking_uri,
)
from pipeline.plan.params import Params
from pipeline.report.report_dir import ReportDir
from pipeline.report.results import ap_points


def run_files(run: RunDir) -> list[Path]:
    """A run directory's files every child run holds (and whose digest decides whether it is re-logged)."""
    return [run.config, run.metrics, run.detections, run.training_log, run.curves]

RUNS_VIEW = "libra-runs"
"""The saved view of the experiment's runs table (:func:`runs_view_state`): MLflow's UI opens it at
``#/experiments/<id>/runs?viewStateShareKey=libra-runs``."""


def epoch_metrics(curves) -> list[tuple[str, float, int]]:
    """(name, value, epoch) of every per-epoch value of :func:`detection.engine.curves.epoch_curves`;
    the validation AP/AR (``val/*``) in AP points."""
    out = []
    for row in curves.to_dict("records"):
        for name, value in row.items():
            if name not in ("epoch", "step") and not math.isnan(value):  # NaN: no value that epoch
                value = ap_points(value) if name.startswith("val/") else float(value)
                out.append((metric_key(name), value, int(row["epoch"])))
    return out


def final_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """``metrics.json`` as flat metrics: ``eval/*`` (the 12 COCO numbers and AP per IoU threshold in AP
    points, the counts) and ``cost/<key>`` for every number of its ``cost`` object (a null, e.g. GPU
    memory on CPU, is left out)."""
    out = {f"eval/{k}": ap_points(v) for k, v in metrics.get("stats", metrics.get("bbox", {})).items()}
    out.update({f"eval/AP_iou{t}": ap_points(v) for t, v in metrics.get("ap_per_iou", {}).items()})
    for key in ("num_images", "num_detections"):
        if key in metrics:
            out[f"eval/{key}"] = float(metrics[key])
    out.update({metric_key(f"cost/{k}"): float(v) for k, v in (metrics.get("cost") or {}).items()
                if isinstance(v, int | float) and not isinstance(v, bool)})
    return out


def system_metrics(path: Path) -> list[tuple[str, float, int, int]]:
    """(name, value, timestamp in ms, step) of every row of a run's ``system_metrics.csv``; none if absent."""
    if not path.exists():
        return []
    with path.open(newline="") as file:
        try:
            return [(metric_key(row["name"]), float(row["value"]), int(row["timestamp_ms"]), int(row["step"]))
                    for row in csv.DictReader(file)]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: not a system metrics file (columns timestamp_ms, step, name, value; "
                             f"{exc!r}); rerun the training, or delete the file to log the run without it") from None


def ap_by_iou(metrics: dict[str, Any]) -> list[tuple[str, float, int]]:
    """``metrics.json``'s AP per IoU threshold as one curve, ``eval/AP_by_IoU`` with step = the threshold in
    percent (50 … 95), so that the MLflow UI draws and compares it across runs like any metric history."""
    return [("eval/AP_by_IoU", ap_points(v), round(100 * float(t))) for t, v in metrics.get("ap_per_iou", {}).items()]


def iou_distribution_curves(path: Path) -> list[tuple[str, float, int]]:
    """The IoU distributions the report wrote for a run (:func:`pipeline.report.localization.iou_distributions`)
    as metric histories with step = IoU in percent, like ``eval/AP_by_IoU``; none if the file is absent."""
    if not path.exists():
        return []
    with path.open(newline="") as file:
        return [(row["curve"], float(row["value"]), int(row["iou"])) for row in csv.DictReader(file)]


@dataclass
class ChildSpec:
    """What one child run holds."""

    name: str
    key: str
    results_digest: str
    params: dict[str, str]
    tags: dict[str, str]
    epoch_metrics: list[tuple[str, float, int]]
    final_metrics: dict[str, float]
    timed_metrics: list[tuple[str, float, int, int]]
    """(name, value, timestamp in ms, step): metrics sampled while the run trained."""
    artifacts: list[tuple[Path, str | None]]
    """(local file, artifact directory or None for the root)."""


class AblationTracker:
    """Parent/child runs of ablations in one MLflow experiment, found by their key tags."""

    def __init__(self, experiment: str, uri: str | None = None):
        self.uri = uri or tracking_uri()
        self.experiment = experiment
        self.client = open_store(self.uri)

    @cached_property
    def experiment_id(self) -> str:
        """The experiment's id; the experiment holds the saved view :data:`RUNS_VIEW`."""
        experiment_id = get_or_create_experiment(self.client, self.uri, self.experiment)
        self.client.set_experiment_tag(experiment_id, f"mlflow.sharedViewState.{RUNS_VIEW}",
                                       json.dumps(runs_view_state()))
        return experiment_id

    def _search(self, filter_string: str) -> list:
        return search_all_runs(self.client, self.experiment_id, filter_string, ["attributes.start_time DESC"])

    def delete_tree(self, run_id: str) -> None:
        for child in self._search(f"tags.`mlflow.parentRunId` = '{run_id}'"):
            self.client.delete_run(child.info.run_id)
        self.client.delete_run(run_id)

    def parent(self, ablation_key: str, name: str, params: dict[str, str], tags: dict[str, str]) -> tuple[str, bool]:
        """The parent run of ``ablation_key`` (reused, set RUNNING) or a new one; (run id, created).

        Found by its tags, under :func:`store_lock`: processes logging one ablation at once share one parent.
        """
        from mlflow.entities import Param

        with store_lock(self.uri):
            found = self._search(f"tags.`libra.ablation_key` = '{ablation_key}' and tags.`libra.role` = 'ablation'")
            for extra in found[1:]:  # newest first; older duplicates (e.g. from a crash) go
                self.delete_tree(extra.info.run_id)
            if found:
                run_id = found[0].info.run_id
                self.client.update_run(run_id, status="RUNNING")
                for key, value in tags.items():
                    self.client.set_tag(run_id, key, value)
                return run_id, False
            run = self.client.create_run(self.experiment_id, run_name=name,
                                         tags={**tags, "libra.ablation_key": ablation_key, "libra.role": "ablation"})
            items = [Param(k, str(v)[:6000]) for k, v in params.items()]
            self.client.log_batch(run.info.run_id, params=items)
            return run.info.run_id, True

    def children(self, parent_id: str) -> list:
        return self._search(f"tags.`mlflow.parentRunId` = '{parent_id}'")

    def sync_child(self, parent_id: str, spec: ChildSpec, existing: list) -> tuple[str, str]:
        """Reuse the child with ``spec.key`` if its results are unchanged, else replace it.

        ``existing``: the parent's children (from :meth:`children`). Returns (run id, "reused" |
        "replaced" | "created").
        """
        from mlflow.entities import Metric, Param, RunTag

        same_key = [r for r in existing if r.data.tags.get("libra.run_key") == spec.key]
        keep = [r for r in same_key if r.info.status == "FINISHED"
                and r.data.tags.get("libra.results_digest") == spec.results_digest]
        if keep:
            for extra in same_key:
                if extra.info.run_id != keep[0].info.run_id:
                    self.client.delete_run(extra.info.run_id)
            return keep[0].info.run_id, "reused"
        for old in same_key:
            self.client.delete_run(old.info.run_id)
        run = self.client.create_run(self.experiment_id, run_name=spec.name, tags={
            **spec.tags, "mlflow.parentRunId": parent_id, "libra.role": "run", "libra.run_key": spec.key})
        run_id = run.info.run_id
        try:
            now = now_ms()
            metrics = [Metric(k, v, now, step) for k, v, step in spec.epoch_metrics]
            metrics += [Metric(k, v, now, 0) for k, v in spec.final_metrics.items()]
            metrics += [Metric(k, v, timestamp, step) for k, v, timestamp, step in spec.timed_metrics]
            self.client.log_batch(run_id, metrics=metrics, params=[Param(k, v[:6000]) for k, v in spec.params.items()])
            for path, directory in spec.artifacts:
                self.client.log_artifact(run_id, str(path), directory)
            # the digest last: a child interrupted while logging is never taken as complete
            self.client.log_batch(run_id, tags=[RunTag("libra.results_digest", spec.results_digest)])
            self.client.set_terminated(run_id, "FINISHED")
        except BaseException:
            self.client.set_terminated(run_id, "FAILED")
            raise
        return run_id, "replaced" if same_key else "created"

    def log_report(self, run_id: str, report: ReportDir, files: list[Path], metrics: dict[str, float],
                   digest: str, tags: dict[str, str]) -> bool:
        """Attach the report (files, metrics, tags) to the parent unless this exact report is already
        there; True if logged."""
        from mlflow.entities import Metric

        run = self.client.get_run(run_id)
        if run.data.tags.get("libra.report_digest") == digest:
            return False
        now = now_ms()
        self.client.log_batch(run_id, metrics=[Metric(metric_key(k), float(v), now, 0) for k, v in metrics.items()])
        for path in files:
            relative = Path(path).relative_to(report.path).parent.as_posix()
            self.client.log_artifact(run_id, str(path), "report" if relative == "." else f"report/{relative}")
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)
        self.client.set_tag(run_id, "mlflow.note.content", report_description(report))
        self.client.set_tag(run_id, "libra.report_digest", digest)
        return True


def runs_view_state() -> dict[str, Any]:
    """The MLflow UI state of the saved view :data:`RUNS_VIEW` (the UI reads it from the experiment tag
    ``mlflow.sharedViewState.<view>``): the child runs sorted by name (detector/combination/seed<k>), grouped
    by detector and combination (a group row: the mean over seeds), with AP and the run's tags as columns;
    the chart view shows every run and opens on the curves over IoU (``*_by_IoU``)."""
    metrics = [*(f"eval/{name}" for name in BOX_METRICS), "cost/train_wall_s"]
    tags = ["libra.detector", "libra.combination", "libra.seed", "libra.dvc_experiment"]
    return {
        "searchFilter": "tags.`libra.role` = 'run'",
        "orderByKey": "tags.`mlflow.runName`",
        "orderByAsc": True,
        "selectedColumns": [f"metrics.`{m}`" for m in metrics] + [f"tags.`{t}`" for t in tags],
        "groupBy": {"aggregateFunction": "average",
                    "groupByKeys": [{"mode": "tag", "groupByData": "libra.detector"},
                                    {"mode": "tag", "groupByData": "libra.combination"}]},
        "runsHiddenMode": "SHOW_ALL",
        "chartsSearchFilter": "_by_IoU",
    }


def report_description(report: ReportDir) -> str:
    """The parent run's description (the MLflow UI shows it above the run): the report's opening and its
    verdict table, cut to what a tag holds (8000 characters)."""
    sections = report.markdown.read_text().split("\n## ")
    verdicts = [s for s in sections if s.startswith("Verdicts")]
    text = "\n## ".join([sections[0], *verdicts]) + f"\n\nThe whole report: artifacts, report/{report.html.name}."
    return text if len(text) <= 8000 else text[:7990] + "\n…"


def path_digest(paths: list[Path]) -> str:
    """Digest of files named by their paths as given (the form ``libra.results_digest`` is stored in)."""
    return digest_files((Path(path).as_posix(), Path(path)) for path in paths)


def report_metrics(metrics: dict[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """The report's ``metrics.json`` as parent metrics (``<detector>/<combination>/<name>``,
    ``claims/<claim>/<name>``) and the claims' verdicts as tags (``libra.verdict.<claim>``,
    ``libra.adjusted_verdict.<claim>``: every text field of a claim)."""
    metrics = dict(metrics)
    claims = metrics.pop("claims", {})
    flat = {f"{det}/{combination}/{name}": value for det, combinations in metrics.items()
            for combination, values in combinations.items() for name, value in values.items() if _is_number(value)}
    flat.update({f"claims/{key}/{name}": value for key, values in claims.items()
                 for name, value in values.items() if _is_number(value)})
    tags = {f"libra.{name}.{key}": value for key, values in claims.items()
            for name, value in values.items() if isinstance(value, str)}
    return flat, tags


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def log_ablation(plan_dir: Path, report_dir: Path, manifest: dict[str, Any], params: Params,
                 experiment: str, uri: str | None = None, root: Path = Path(".")) -> dict[str, Any]:
    """Log the ablation of ``plan_dir`` (its runs' files) and the report ``libra report`` wrote in ``report_dir``.

    Returns what was done: store, experiment, parent run id and per child its run id and action.
    """
    from pipeline.plan.ablation import ablation_key
    from detection.engine.curves import read_curves
    from pipeline.plan.runplan import read_plan_summary, read_run_key, read_run_plan

    tracker = AblationTracker(experiment, uri)  # the store first: fail fast when it does not answer
    report = ReportDir(report_dir)
    if not report.metrics.exists():
        raise ValueError(f"{report.metrics}: no report to log; run `libra report --out {report.path}` "
                         "(or `dvc repro`) first")
    summary = read_plan_summary(plan_dir)
    plans = [read_run_plan(root / entry.plan) for entry in summary.runs]
    dataset_digest = manifest["digest"]
    keys = {p.name: read_run_key(root / p.run_dir) for p in plans}
    parent_params = flatten_params(ablation_params(params))
    key = ablation_key(parent_params, sorted(keys.values()))
    commit, dirty = git_state(root)
    common = {"mlflow.source.git.commit": commit, "libra.git_dirty": str(dirty).lower(),
              "libra.dataset_digest": dataset_digest, "libra.profile": summary.profile,
              "libra.design": summary.design, **dvc_experiment_tags()}

    parent_id, created = tracker.parent(key, f"ablation {summary.profile}/{summary.design} {key[:8]}",
                                        parent_params, common)
    existing = tracker.children(parent_id)
    done: dict[str, dict[str, str]] = {}
    for plan in plans:
        run = RunDir(root / plan.run_dir)
        files = run_files(run)
        system_file = run.system_metrics
        digested = files + [system_file] if system_file.exists() else files
        figures = sorted(report.run(plan.name).glob("*.png"))
        evaluation = json.loads(run.metrics.read_text())
        spec = ChildSpec(
            name=plan.name, key=keys[plan.name], results_digest=path_digest(digested),
            params=flatten_params(plan.config),
            tags={**common, "libra.ablation_key": key, "libra.detector": plan.detector,
                  "libra.combination": plan.combination, "libra.components": ",".join(plan.components) or "none",
                  "libra.seed": str(plan.seed), "libra.run_dir": plan.run_dir.as_posix()},
            epoch_metrics=epoch_metrics(read_curves(run)) + ap_by_iou(evaluation)
                          + iou_distribution_curves(report.iou_distributions(plan.name)),
            final_metrics=final_metrics(evaluation),
            timed_metrics=system_metrics(system_file),
            artifacts=[(f, None) for f in digested] + [(p, "figures") for p in figures],
        )
        run_id, action = tracker.sync_child(parent_id, spec, existing)
        done[plan.name] = {"run_id": run_id, "action": action}
    for stale in existing:
        if stale.data.tags.get("libra.run_key") not in set(keys.values()):
            tracker.client.delete_run(stale.info.run_id)

    report_files = report.report_files()
    flat, verdicts = report_metrics(json.loads(report.metrics.read_text()))
    tracker.log_report(parent_id, report, report_files, flat, path_digest(report_files), verdicts)
    tracker.client.set_terminated(parent_id, "FINISHED")
    return {"tracking_uri": tracker.uri, "experiment": experiment, "experiment_id": tracker.experiment_id,
            "parent_run_id": parent_id, "parent_created": created, "ablation_key": key, "runs": done}


def ablation_params(params: Params) -> dict[str, Any]:
    """The parts of ``params.yaml`` that define an ablation (the parent run's parameters), as written there."""
    written = params.model_dump(mode="json", exclude_unset=True)
    return {"profile": params.profile, "profile_settings": written.get("profiles", {}).get(params.profile, {}),
            **{k: written[k] for k in ("data", "trainer", "ablation", "faster_rcnn", "retinanet") if k in written}}
