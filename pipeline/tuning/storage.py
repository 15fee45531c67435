"""Where a study lives: an SQLite file, a journal file, or a database server.

``--storage`` accepts

- ``sqlite:///PATH`` — the default for one worker (``<project>/optuna.db``, the project being
  ``$DVC_ROOT`` inside DVC, else the cwd); relative paths are made absolute against it, so a run
  from a ``dvc exp`` temporary copy finds the same study.
- ``journal:PATH`` (or a path ending in ``.journal``) — Optuna's ``JournalStorage`` over a
  ``JournalFileBackend``: the default when ``--workers N > 1`` processes share one host
  (``<project>/optuna.journal``). SQLite serialises writers and is not meant for concurrent processes.
- any other SQLAlchemy URL, e.g. ``postgresql://user:pass@host:5432/optuna`` (needs its driver,
  ``pip install 'psycopg[binary]'``) — for workers on several hosts. Connecting fails after
  ``connect_timeout`` seconds instead of hanging; such storages get Optuna's RDB heartbeat, so a
  trial whose host died is marked FAIL after the grace period by the next worker.

A lock file beside a local storage (``<file>.tune.lock``) serialises "count the trials, start the
next one" between the workers of one host, so a study stops at exactly ``--n-trials``, and opening
the storage, so processes that create one SQLite file at once do not collide.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import optuna
from filelock import FileLock
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend

from pipeline.tracking.store import connect_timeout_args, project_root

ENV_STORAGE = "LIBRA_OPTUNA_STORAGE"
HEARTBEAT_INTERVAL = 60
HEARTBEAT_GRACE = 180


class StorageError(ValueError):
    """The storage URL is malformed, its driver is missing, or it cannot be reached."""


class NoLock:
    """The lock of a storage on a database server: none, its transactions and heartbeats coordinate the workers."""

    def acquire(self) -> None:
        pass

    def release(self) -> None:
        pass

    def __enter__(self) -> NoLock:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


@dataclass(frozen=True)
class StorageTarget:
    kind: Literal["sqlite", "journal", "rdb"]
    url: str
    """Canonical form: ``sqlite:////abs/optuna.db``, ``journal:/abs/optuna.journal`` or the RDB URL."""
    path: Path | None = None
    """The local file of sqlite and journal storages."""

    @property
    def local(self) -> bool:
        """A file on this host: workers coordinate through a lock file and process ids."""
        return self.path is not None

    def display(self) -> str:
        if self.kind != "rdb":
            return self.url
        from sqlalchemy.engine import make_url

        return make_url(self.url).render_as_string(hide_password=True)

    def lock(self) -> FileLock | NoLock:
        """Held while a worker counts the trials and starts the next, and while a local storage is
        opened (SQLite creates its tables then: two processes doing it at once collide). ``release``
        may be called more than once."""
        if self.path is None:
            return NoLock()
        return FileLock(self.path.with_name(self.path.name + ".tune.lock"), thread_local=False)

    def open(self, connect_timeout: float = 10.0,
             on_stale: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None) -> BaseStorage:
        """Connect (creating tables or the file if needed); raises StorageError with the reason."""
        if self.kind == "journal":
            assert self.path is not None
            _check_dir(self.path, self.url)
            return JournalStorage(JournalFileBackend(str(self.path)))
        if self.kind == "sqlite":
            assert self.path is not None
            _check_dir(self.path, self.url)
            kwargs: dict = {"engine_kwargs": {"connect_args": {"timeout": 60}}}
        else:
            kwargs = {"engine_kwargs": {"connect_args": connect_timeout_args(self.url, connect_timeout),
                                        "pool_pre_ping": True},
                      "heartbeat_interval": HEARTBEAT_INTERVAL, "grace_period": HEARTBEAT_GRACE,
                      "heartbeat_stale_trial_callback": on_stale}
        import warnings

        from sqlalchemy.exc import SQLAlchemyError

        try:
            with self.lock(), warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(self.url, **kwargs)
        except ImportError as exc:
            cause = exc.__cause__ or exc
            raise StorageError(f"storage {self.display()}: its database driver is not installed ({cause}); "
                               "for PostgreSQL: pip install 'psycopg[binary]'") from None
        except (SQLAlchemyError, OSError) as exc:
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            raise StorageError(f"cannot open storage {self.display()}: {reason}") from None


def _check_dir(path: Path, url: str) -> None:
    if not path.parent.is_dir():
        raise StorageError(f"storage {url}: directory {path.parent} does not exist; create it, or give another "
                           "--storage")
    if not os.access(path.parent, os.W_OK):
        raise StorageError(f"storage {url}: directory {path.parent} is not writable")


def default_storage(workers: int, root: Path) -> StorageTarget:
    root = root.resolve()
    if workers > 1:
        return StorageTarget("journal", f"journal:{root / 'optuna.journal'}", root / "optuna.journal")
    return StorageTarget("sqlite", f"sqlite:///{root / 'optuna.db'}", root / "optuna.db")


def resolve_storage(text: str | None, workers: int, root: Path | None = None) -> StorageTarget:
    """Parse ``--storage`` (else ``$LIBRA_OPTUNA_STORAGE``, else the default for ``workers``)."""
    root = (root or project_root()).resolve()
    text = text or os.environ.get(ENV_STORAGE) or None
    if not text:
        return default_storage(workers, root)
    text = text.strip()
    if text.startswith("journal:") or ("://" not in text and text.endswith((".journal", ".log"))):
        raw = text.removeprefix("journal:").removeprefix("//")
        if not raw:
            raise StorageError(f"storage {text!r}: journal: needs a file path, e.g. journal:optuna.journal")
        path = (root / Path(raw).expanduser()).resolve()
        return StorageTarget("journal", f"journal:{path}", path)
    if "://" not in text:
        raise StorageError(f"storage {text!r}: expected a SQLAlchemy URL (sqlite:///optuna.db, "
                           "postgresql://user@host/db) or journal:PATH")
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(text)
    except (ArgumentError, ValueError) as exc:
        raise StorageError(f"storage {text!r}: not a valid database URL ({exc})") from None
    if url.get_backend_name() == "sqlite":
        if not url.database or url.database == ":memory:":
            raise StorageError(f"storage {text!r}: an in-memory SQLite database cannot be shared or resumed; "
                               "give a file, e.g. sqlite:///optuna.db")
        path = (root / Path(url.database).expanduser()).resolve()
        return StorageTarget("sqlite", f"sqlite:///{path}", path)
    return StorageTarget("rdb", url.render_as_string(hide_password=False))


def study_exists(target: StorageTarget, study_name: str) -> bool:
    """Whether a local storage file already holds ``study_name`` (without creating anything)."""
    if target.path is None or not target.path.exists() or target.path.stat().st_size == 0:
        return False
    try:
        storage = target.open()
        return any(s.study_name == study_name for s in storage.get_all_studies())
    except StorageError:
        return False


__all__ = ["ENV_STORAGE", "StorageError", "StorageTarget", "default_storage", "resolve_storage",
           "study_exists"]
