"""The MLflow store: where it is, reaching it within a bounded time, and what every logger needs.

The store is reached through :func:`open_store`, which fails within a bounded time with a
:class:`TrackingStoreError` naming the store instead of hanging (a server that does not answer) or
ending in a traceback (a missing directory, an unwritable file). Creating a store, an experiment or
a parent run ("get or create") holds :func:`store_lock` for a local SQLite store, so processes that
start together create each once; other stores rely on a deterministic lookup by tag.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from filelock import FileLock

from detection.io import flatten

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


def dvc_experiment_tags() -> dict[str, str]:
    """``{"libra.dvc_experiment": <name>}`` inside a ``dvc exp run`` (the name DVC passes in
    ``DVC_EXP_NAME``), so a run can be traced to the DVC experiment that logged it; else nothing."""
    name = os.environ.get("DVC_EXP_NAME")
    return {"libra.dvc_experiment": name} if name else {}


def tracking_uri(project_dir: Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<absolute project dir>/mlflow.db``.

    A local store's path is made absolute against the project (inside DVC, the main repository) so
    that runs started from a ``dvc exp`` temporary copy land in the project's store, not in the copy
    that DVC deletes: ``sqlite:///mlflow.db`` and ``mlruns`` (a file store) name ``<project>/…``.
    """
    root = Path(project_dir).resolve() if project_dir is not None else project_root()
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{root / 'mlflow.db'}"
    database = sqlite_path(uri)
    if database is not None:
        from sqlalchemy.engine import make_url

        return make_url(uri).set(database=str(root / database.expanduser())).render_as_string(hide_password=False)
    if "://" not in uri:
        return str(root / Path(uri.removeprefix("file:")).expanduser())
    return uri


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
    a file lock (``filelock``) on ``<database>.lock`` beside it; re-entrant within a process. Nothing for other stores."""
    database = sqlite_path(uri)
    path = database.with_name(database.name + ".lock").absolute() if database else None
    if path is None or path in _HELD_LOCKS:
        yield
        return
    lock = FileLock(path, thread_local=False)
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


def search_all_runs(client: MlflowClient, experiment_id: str, filter_string: str,
                    order_by: list[str] | None = None) -> list:
    """Every active run of the experiment that matches ``filter_string``, page by page."""
    from mlflow.entities import ViewType

    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string, ViewType.ACTIVE_ONLY, max_results=1000,
                                  order_by=order_by, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def flatten_params(tree: dict[str, Any]) -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``, the form MLflow stores parameters in (an empty section
    has no parameter)."""
    return {name: str(value) for name, value in flatten(tree).items() if not isinstance(value, dict)}


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


def now_ms() -> int:
    """The time as MLflow stamps metrics: milliseconds since the epoch."""
    return int(time.time() * 1000)


