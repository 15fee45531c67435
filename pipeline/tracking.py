"""MLflow tracking: where the store is, how configs become run parameters, and the ablation's runs.

An ablation is one *parent* run with one *child* run per trained (detector, combination, seed).
Re-logging never duplicates runs silently (see :func:`log_ablation`):

* the parent is identified by ``libra.ablation_key``, a hash of the ablation's parameters and of
  its runs' keys: the same ablation reuses its parent; any parameter change (a ``dvc exp run -S``
  variant, a knob) makes a new parent, and earlier ablations stay in the store for comparison;
* a child is identified inside its parent by ``libra.run_key``, a hash of the run's resolved
  config (seed included) and the data digest; it is reused when its result files are unchanged
  (tag ``libra.results_digest``) and otherwise replaced: the old run is deleted (MLflow's soft
  delete: lifecycle "deleted", restorable, purged by ``mlflow gc``) and a new one logged.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
"""Experiment tag the MLflow UI reads; ``custom_model_development`` opens the training-runs view
(without it, MLflow 3 may open an experiment in its GenAI view)."""
MODEL_TRAINING_KIND = "custom_model_development"


def project_root() -> Path:
    """The DVC repository the pipeline runs in: ``DVC_ROOT`` (DVC sets it for stage commands, and to
    the main repository for queued experiments, which run in temporary copies), else the cwd."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def tracking_uri(project_dir: Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<absolute project dir>/mlflow.db``.

    The path is absolute (and, inside DVC, the main repository's) so that runs started from a
    ``dvc exp`` temporary copy land in the project's store, not in the copy.
    """
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = Path(project_dir).resolve() if project_dir is not None else project_root()
    return f"sqlite:///{root / 'mlflow.db'}"


def artifact_location(uri: str) -> str | None:
    """Artifacts of a local SQLite store go beside the database (``<dir>/mlruns``), not under the cwd."""
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(uri).database
    if not database or database == ":memory:":
        return None
    return (Path(database).resolve().parent / "mlruns").as_uri()


def flatten_params(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``, the form MLflow stores parameters in."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_params(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def metric_key(name: str) -> str:
    """A metric name MLflow accepts (alphanumerics, ``_ - . / :`` and spaces); ``+`` becomes ``_``."""
    return re.sub(r"[^0-9A-Za-z_\-./: ]", "_", name)


def git_state(cwd: Path | None = None) -> tuple[str, bool]:
    """(HEAD commit or "unknown", whether the work tree has changes)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                                check=True, timeout=30).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                capture_output=True, text=True, check=True, timeout=30).stdout
        return commit, bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        return "unknown", False


def _now_ms() -> int:
    return int(time.time() * 1000)


def epoch_metrics(curves) -> list[tuple[str, float, int]]:
    """(name, value, epoch) of every per-epoch value of :func:`pipeline.engine.curves.epoch_curves`."""
    out = []
    for row in curves.to_dict("records"):
        for name, value in row.items():
            if name not in ("epoch", "step") and not math.isnan(value):  # NaN: no value that epoch
                out.append((metric_key(name), float(value), int(row["epoch"])))
    return out


def final_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """``metrics.json`` as flat ``eval/*`` metrics: the 12 COCO numbers, AP per IoU threshold, counts."""
    out = {f"eval/{k}": float(v) for k, v in metrics.get("stats", metrics.get("bbox", {})).items()}
    out.update({f"eval/AP_iou{t}": float(v) for t, v in metrics.get("ap_per_iou", {}).items()})
    for key in ("num_images", "num_detections"):
        if key in metrics:
            out[f"eval/{key}"] = float(metrics[key])
    return out


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
    artifacts: list[tuple[Path, str | None]]
    """(local file, artifact directory or None for the root)."""


class AblationTracker:
    """Parent/child runs of ablations in one MLflow experiment, found by their key tags."""

    def __init__(self, experiment: str, uri: str | None = None):
        from mlflow import MlflowClient

        self.uri = uri or tracking_uri()
        self.client = MlflowClient(self.uri)
        self.experiment_id = self._experiment(experiment)

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is None:
            try:
                return self.client.create_experiment(name, artifact_location=artifact_location(self.uri),
                                                     tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
            except Exception:
                found = self.client.get_experiment_by_name(name)
                if found is None:
                    raise
        if found.lifecycle_stage != "active":
            raise ValueError(f"MLflow experiment {name!r} is deleted in {self.uri}; restore it or choose another name")
        if found.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING_KIND:
            self.client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
        return found.experiment_id

    def _search(self, filter_string: str) -> list:
        from mlflow.entities import ViewType

        runs, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string, ViewType.ACTIVE_ONLY,
                                           max_results=1000, order_by=["attributes.start_time DESC"], page_token=token)
            runs += list(page)
            token = page.token
            if not token:
                return runs

    def delete_tree(self, run_id: str) -> None:
        for child in self._search(f"tags.`mlflow.parentRunId` = '{run_id}'"):
            self.client.delete_run(child.info.run_id)
        self.client.delete_run(run_id)

    def parent(self, ablation_key: str, name: str, params: dict[str, str], tags: dict[str, str]) -> tuple[str, bool]:
        """The parent run of ``ablation_key`` (reused, set RUNNING) or a new one; (run id, created)."""
        from mlflow.entities import Param

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

    def sync_child(self, parent_id: str, spec: ChildSpec, existing: list, draw_figures=None) -> tuple[str, str]:
        """Reuse the child with ``spec.key`` if its results are unchanged, else replace it.

        ``existing``: the parent's children (from :meth:`children`). ``draw_figures(dir) -> [paths]``
        is called only when the child is (re)logged. Returns (run id, "reused" | "replaced" | "created").
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
            now = _now_ms()
            metrics = [Metric(k, v, now, step) for k, v, step in spec.epoch_metrics]
            metrics += [Metric(k, v, now, 0) for k, v in spec.final_metrics.items()]
            self.client.log_batch(run_id, metrics=metrics, params=[Param(k, v[:6000]) for k, v in spec.params.items()])
            for path, directory in spec.artifacts:
                self.client.log_artifact(run_id, str(path), directory)
            if draw_figures is not None:
                with tempfile.TemporaryDirectory() as tmp:
                    for path in draw_figures(Path(tmp)):
                        self.client.log_artifact(run_id, str(path), "figures")
            # the digest last: a child interrupted while logging is never taken as complete
            self.client.log_batch(run_id, tags=[RunTag("libra.results_digest", spec.results_digest)])
            self.client.set_terminated(run_id, "FINISHED")
        except BaseException:
            self.client.set_terminated(run_id, "FAILED")
            raise
        return run_id, "replaced" if same_key else "created"

    def log_report(self, run_id: str, report_dir: Path, files: list[Path], metrics: dict[str, float],
                   digest: str) -> bool:
        """Attach the report to the parent unless this exact report is already there; True if logged."""
        from mlflow.entities import Metric

        run = self.client.get_run(run_id)
        if run.data.tags.get("libra.report_digest") == digest:
            return False
        now = _now_ms()
        self.client.log_batch(run_id, metrics=[Metric(metric_key(k), float(v), now, 0) for k, v in metrics.items()])
        for path in files:
            relative = Path(path).relative_to(report_dir).parent.as_posix()
            self.client.log_artifact(run_id, str(path), "report" if relative == "." else f"report/{relative}")
        self.client.set_tag(run_id, "libra.report_digest", digest)
        return True


def digest_files(paths: list[Path]) -> str:
    sha = hashlib.sha256()
    for path in paths:
        sha.update(Path(path).as_posix().encode() + b"\0" + hashlib.sha256(Path(path).read_bytes()).digest())
    return sha.hexdigest()


def log_ablation(plan_dir: Path, report_dir: Path, manifest: dict[str, Any], params: dict[str, Any],
                 experiment: str, uri: str | None = None, root: Path = Path(".")) -> dict[str, Any]:
    """Log the ablation of ``plan_dir`` (its selected, evaluated runs) and the report in ``report_dir``.

    Returns what was done: store, experiment, parent run id and per child its run id and action.
    """
    from pipeline.ablation import ablation_key, run_key
    from pipeline.engine.curves import epoch_curves, read_metrics_csv
    from pipeline.report.build import draw_run_figures
    from pipeline.report.results import load_run, read_summary, validation_ground_truth
    from pipeline.runplan import read_run_plan

    summary = read_summary(plan_dir)
    plans = [read_run_plan(root / entry["plan"]) for entry in summary["runs"]]
    dataset_digest = manifest["digest"]
    keys = {p.name: run_key(p.config, dataset_digest) for p in plans}
    parent_params = flatten_params(ablation_params(params))
    key = ablation_key(parent_params, sorted(keys.values()))
    commit, dirty = git_state(root)
    common = {"mlflow.source.git.commit": commit, "libra.git_dirty": str(dirty).lower(),
              "libra.dataset_digest": dataset_digest, "libra.profile": summary["profile"],
              "libra.design": summary["design"]}

    tracker = AblationTracker(experiment, uri)
    parent_id, created = tracker.parent(key, f"ablation {summary['profile']}/{summary['design']} {key[:8]}",
                                        parent_params, common)
    existing = tracker.children(parent_id)
    gt_cache: dict[str, dict[str, Any]] = {}
    done: dict[str, dict[str, str]] = {}
    for plan in plans:
        run = root / plan.run_dir
        files = [run / "config.yaml", run / "metrics.json", run / "detections.json", run / "metrics.csv"]
        result_digest = digest_files(files)
        metrics = json.loads((run / "metrics.json").read_text())
        spec = ChildSpec(
            name=plan.name, key=keys[plan.name], results_digest=result_digest,
            params=flatten_params(plan.config),
            tags={**common, "libra.ablation_key": key, "libra.detector": plan.detector, "libra.combo": plan.combo,
                  "libra.components": ",".join(plan.components) or "none", "libra.seed": str(plan.seed),
                  "libra.run_dir": plan.run_dir.as_posix()},
            epoch_metrics=epoch_metrics(epoch_curves(read_metrics_csv(run / "metrics.csv"))),
            final_metrics=final_metrics(metrics),
            artifacts=[(f, None) for f in files] + [(p, "curves") for p in sorted((run / "curves").glob("*.csv"))],
        )

        def figures(directory: Path, plan=plan) -> list[Path]:
            data_key = json.dumps(plan.config["data"], sort_keys=True)
            if data_key not in gt_cache:
                gt_cache[data_key] = validation_ground_truth(plan)
            return draw_run_figures(load_run(plan, root), gt_cache[data_key], directory)

        run_id, action = tracker.sync_child(parent_id, spec, existing, figures)
        done[plan.name] = {"run_id": run_id, "action": action}
    for stale in existing:
        if stale.data.tags.get("libra.run_key") not in set(keys.values()):
            tracker.client.delete_run(stale.info.run_id)

    report_files = sorted(p for p in Path(report_dir).rglob("*") if p.is_file() and p.name != "mlflow.json")
    report_metrics = json.loads((Path(report_dir) / "metrics.json").read_text())
    flat = {f"{det}/{variant}/{name}": value for det, variants in report_metrics.items()
            for variant, values in variants.items() for name, value in values.items()}
    tracker.log_report(parent_id, Path(report_dir), report_files, flat, digest_files(report_files))
    tracker.client.set_terminated(parent_id, "FINISHED")
    return {"tracking_uri": tracker.uri, "experiment": experiment, "experiment_id": tracker.experiment_id,
            "parent_run_id": parent_id, "parent_created": created, "ablation_key": key, "runs": done}


def ablation_params(params: dict[str, Any]) -> dict[str, Any]:
    """The parts of ``params.yaml`` that define an ablation (the parent run's parameters)."""
    profile = params.get("profile")
    return {"profile": profile, "profile_settings": (params.get("profiles") or {}).get(profile, {}),
            **{k: params[k] for k in ("data", "trainer", "ablation", "faster_rcnn", "retinanet") if k in params}}
