"""MLflow tracking: where the store is, how configs become run parameters, and the ablation's runs.

The store is reached through :func:`open_store`, which fails within a bounded time with a
:class:`TrackingStoreError` naming the store instead of hanging (a server that does not answer) or
ending in a traceback (a missing directory, an unwritable file). Creating a store, an experiment or
a parent run ("get or create") holds :func:`store_lock` for a local SQLite store, so processes that
start together create each once; other stores rely on a deterministic lookup by tag.

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
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pipeline.locks import FileLock

if TYPE_CHECKING:
    from mlflow import MlflowClient

PROBE_TIMEOUT = 10
"""Seconds the first contact with an MLflow store may take: one HTTP request without retries (its
timeout is ``MLFLOW_HTTP_REQUEST_TIMEOUT`` if set), or one database connection."""
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "30", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3"}
"""MLflow's HTTP settings after a successful first contact, where the environment sets none (MLflow's
own, 120 s and 7 retries with exponential backoff, wait minutes on a server that went away)."""
DATABASE_SCHEMES = ("postgresql", "mysql", "mariadb")
"""Database servers whose drivers take ``connect_timeout`` (others are reached without a probe)."""

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


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:`` URI (relative to the cwd, as MLflow reads it), else None."""
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(uri).database
    if not database or database == ":memory:":
        return None
    return Path(database)


def artifact_location(uri: str) -> str | None:
    """Artifacts of a local SQLite store go beside the database (``<dir>/mlruns``), not under the cwd."""
    path = sqlite_path(uri)
    return (path.resolve().parent / "mlruns").as_uri() if path else None


class TrackingStoreError(ValueError):
    """The MLflow store cannot be reached, created or written; the message names it and what to do."""


def display_uri(uri: str) -> str:
    """``uri`` with its password, if any, replaced by ``***``."""
    parts = urlsplit(uri)
    if not parts.password:
        return uri
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()


def connect_timeout_args(url: str, seconds: float) -> dict:
    """SQLAlchemy ``connect_args`` that make connecting to a database server give up after ``seconds``."""
    from sqlalchemy.engine import make_url

    backend = make_url(url).get_backend_name()
    if backend in DATABASE_SCHEMES:
        return {"connect_timeout": max(1, int(seconds))}
    return {}


_HELD_LOCKS: set[Path] = set()


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Excludes the other processes of this host from a local SQLite store's get-or-create steps:
    ``flock`` on ``<database>.lock`` beside it; re-entrant within a process. Nothing for other stores."""
    database = sqlite_path(uri)
    path = database.with_name(database.name + ".lock").absolute() if database else None
    if path is None or path in _HELD_LOCKS:
        yield
        return
    lock = FileLock(path)
    try:
        lock.acquire()
    except OSError as exc:
        raise TrackingStoreError(f"MLflow store {uri}: cannot create the lock file {path} ({exc.strerror}): "
                                 f"the directory must be writable; set MLFLOW_TRACKING_URI to another store") from None
    _HELD_LOCKS.add(path)
    try:
        yield
    finally:
        _HELD_LOCKS.discard(path)
        lock.release()


def open_store(uri: str) -> MlflowClient:
    """A client of the MLflow store ``uri``, after a first contact bounded in time.

    SQLite: the directory must exist (it is not created) and the file be writable; a new store's
    tables are created under :func:`store_lock`. Database server: one connection with a
    :data:`PROBE_TIMEOUT` connect timeout. HTTP(S) server: one request without retries (see
    :data:`PROBE_TIMEOUT`), then :data:`HTTP_DEFAULTS` where the environment sets nothing.

    Raises:
        TrackingStoreError: naming the store (password hidden) and the reason.
    """
    from mlflow import MlflowClient

    shown = display_uri(uri)
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower()
    if scheme == "sqlite":
        _probe_sqlite(uri)
    elif scheme in DATABASE_SCHEMES:
        _probe_database(uri, shown)
    with store_lock(uri), _without_http_retries():
        try:
            client = MlflowClient(uri)
            client.search_experiments(max_results=1)
        except Exception as exc:  # noqa: BLE001 - MLflow raises many kinds; all mean "cannot use this store"
            reason = (str(exc).strip() or type(exc).__name__).splitlines()[0]
            raise TrackingStoreError(f"cannot reach the MLflow store {shown}: {reason}; start it, or set "
                                     "MLFLOW_TRACKING_URI to a store that answers") from None
    if scheme in ("http", "https"):
        for name, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
    return client


def _probe_sqlite(uri: str) -> None:
    path = sqlite_path(uri)
    if path is None:
        return
    if not path.parent.is_dir():
        raise TrackingStoreError(f"MLflow store {uri}: directory {path.parent} does not exist; create it, or set "
                                 "MLFLOW_TRACKING_URI to another store")
    try:
        with closing(sqlite3.connect(path, timeout=PROBE_TIMEOUT, isolation_level=None)) as db:
            db.execute("BEGIN IMMEDIATE")  # a write, undone: fails on a read-only file or file system
            db.execute("CREATE TABLE main.libra_write_probe (x)")
            db.execute("ROLLBACK")
    except sqlite3.Error as exc:
        raise TrackingStoreError(f"MLflow store {uri}: cannot write {path} ({exc}); make it writable, or set "
                                 "MLFLOW_TRACKING_URI to another store") from None


def _probe_database(uri: str, shown: str) -> None:
    from sqlalchemy import create_engine
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.pool import NullPool

    try:
        engine = create_engine(uri, poolclass=NullPool, connect_args=connect_timeout_args(uri, PROBE_TIMEOUT))
        with engine.connect():
            pass
    except ImportError as exc:
        raise TrackingStoreError(f"MLflow store {shown}: its database driver is not installed ({exc})") from None
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise TrackingStoreError(f"cannot reach the MLflow store {shown}: {reason}; start it, or set "
                                 "MLFLOW_TRACKING_URI to a store that answers") from None
    engine.dispose()


@contextmanager
def _without_http_retries() -> Iterator[None]:
    """MLflow's HTTP requests meanwhile: no retry, and a :data:`PROBE_TIMEOUT` timeout unless one is set."""
    saved = {name: os.environ.get(name) for name in HTTP_DEFAULTS}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(PROBE_TIMEOUT))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def get_or_create_experiment(client: MlflowClient, uri: str, name: str) -> str:
    """The id of the active experiment ``name``, created if there is none (under :func:`store_lock`;
    on another store, a creation that lost a race finds the winner's), tagged as model training.

    Raises:
        TrackingStoreError: the experiment is deleted (restore it, or choose another name).
    """
    from mlflow.exceptions import MlflowException

    with store_lock(uri):
        found = client.get_experiment_by_name(name)
        if found is None:
            try:
                return client.create_experiment(name, artifact_location=artifact_location(uri),
                                                tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
            except MlflowException:
                found = client.get_experiment_by_name(name)
                if found is None:
                    raise
    if found.lifecycle_stage != "active":
        raise TrackingStoreError(f"MLflow experiment {name!r} is deleted in {display_uri(uri)}; restore it "
                                 "or choose another name")
    if found.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING_KIND:
        client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    return found.experiment_id


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
        self.uri = uri or tracking_uri()
        self.experiment = experiment
        self.client = open_store(self.uri)

    @cached_property
    def experiment_id(self) -> str:
        return get_or_create_experiment(self.client, self.uri, self.experiment)

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
                   digest: str, tags: dict[str, str]) -> bool:
        """Attach the report (files, metrics, tags) to the parent unless this exact report is already
        there; True if logged."""
        from mlflow.entities import Metric

        run = self.client.get_run(run_id)
        if run.data.tags.get("libra.report_digest") == digest:
            return False
        now = _now_ms()
        self.client.log_batch(run_id, metrics=[Metric(metric_key(k), float(v), now, 0) for k, v in metrics.items()])
        for path in files:
            relative = Path(path).relative_to(report_dir).parent.as_posix()
            self.client.log_artifact(run_id, str(path), "report" if relative == "." else f"report/{relative}")
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)
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
    from pipeline.report.results import load_run, validation_ground_truth
    from pipeline.runplan import read_plan_summary, read_run_plan

    tracker = AblationTracker(experiment, uri)  # the store first: fail fast when it does not answer
    summary = read_plan_summary(plan_dir)
    plans = [read_run_plan(root / entry.plan) for entry in summary.runs]
    dataset_digest = manifest["digest"]
    keys = {p.name: run_key(p.config, dataset_digest) for p in plans}
    parent_params = flatten_params(ablation_params(params))
    key = ablation_key(parent_params, sorted(keys.values()))
    commit, dirty = git_state(root)
    common = {"mlflow.source.git.commit": commit, "libra.git_dirty": str(dirty).lower(),
              "libra.dataset_digest": dataset_digest, "libra.profile": summary.profile,
              "libra.design": summary.design}

    parent_id, created = tracker.parent(key, f"ablation {summary.profile}/{summary.design} {key[:8]}",
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
    claims = report_metrics.pop("claims", {})
    flat = {f"{det}/{variant}/{name}": value for det, variants in report_metrics.items()
            for variant, values in variants.items() for name, value in values.items()}
    flat.update({f"claims/{key}/{name}": value for key, values in claims.items()
                 for name, value in values.items() if name != "verdict"})
    verdicts = {f"libra.verdict.{key}": values["verdict"] for key, values in claims.items()}
    tracker.log_report(parent_id, Path(report_dir), report_files, flat, digest_files(report_files), verdicts)
    tracker.client.set_terminated(parent_id, "FINISHED")
    return {"tracking_uri": tracker.uri, "experiment": experiment, "experiment_id": tracker.experiment_id,
            "parent_run_id": parent_id, "parent_created": created, "ablation_key": key, "runs": done}


def ablation_params(params: dict[str, Any]) -> dict[str, Any]:
    """The parts of ``params.yaml`` that define an ablation (the parent run's parameters)."""
    profile = params.get("profile")
    return {"profile": profile, "profile_settings": (params.get("profiles") or {}).get(profile, {}),
            **{k: params[k] for k in ("data", "trainer", "ablation", "faster_rcnn", "retinanet") if k in params}}
