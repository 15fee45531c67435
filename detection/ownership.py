"""What libra may delete or overwrite, and who may write a run directory.

The rule (docs/reliability.md): libra deletes or overwrites only a folder or file it wrote itself,
recognised by the marker it wrote there (:data:`MARKER`, holding the command that wrote it), or an
empty folder. Anything else is refused, naming the path and :data:`FORCE`, the option that overrides
the refusal. Every command that replaces an output goes through :func:`check_replaceable`.

A run directory has one writer at a time: :func:`run_lock` holds an exclusive lock on a file in it
for the run's life; a second writer is refused, naming the holder's pid and host.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from detection.io import write_text_atomic
from detection.run_dir import RunDir

__all__ = ["MARKER", "FORCE", "PREPARE", "PRETRAIN", "PLAN", "TRAIN", "DISPATCH", "NotOwnedError", "RunLockedError", "marker_path", "mark", "writer_of",
           "check_replaceable", "remove_owned", "replacing", "run_lock"]

MARKER = ".libra"
"""A folder's marker file; a file's marker is ``.<name>.libra`` beside it (see :func:`marker_path`)."""
FORCE = "--force"
"""The option of every command that lets it replace what it did not write."""

PREPARE, PRETRAIN, PLAN, TRAIN, DISPATCH = "libra prepare", "libra pretrain", "libra plan", "libra train", "libra dispatch"
"""The commands that mark what they write (a marker holds one of these)."""


class NotOwnedError(ValueError):
    """A path libra would delete or overwrite holds something it did not write."""


class RunLockedError(ValueError):
    """Another process writes the run directory (a refusal, like a bad input: exit status 2)."""


def marker_path(path: Path) -> Path:
    path = Path(path)
    return path / MARKER if path.is_dir() else path.with_name(f".{path.name}{MARKER}")


def mark(path: Path, writer: str) -> None:
    """Record that ``writer`` (e.g. ``libra plan``) wrote ``path``."""
    write_text_atomic(marker_path(path), f"{writer}\n")


def writer_of(path: Path) -> str | None:
    try:
        return marker_path(path).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def check_replaceable(path: Path, writers: tuple[str, ...], force: bool = False) -> None:
    """Raise :class:`NotOwnedError` unless ``path`` is absent, an empty folder, marked by one of ``writers``,
    or ``force`` is set. The working directory (or a folder holding it) is never replaced."""
    path = Path(path)
    target, cwd = path.resolve(), Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise NotOwnedError(f"{path}: is the working directory or holds it; choose another --out")
    blocking = next((part for part in path.parents if part.is_file()), None)
    if blocking is not None:
        raise NotOwnedError(f"{path}: cannot be made, {blocking} is a file (Not a directory); choose another --out")
    if not target.exists() or force or writer_of(target) in writers:
        return
    if target.is_dir() and all(p == RunDir(target).lock for p in target.iterdir()):  # empty, or a run starting in it
        return
    what = "not empty" if target.is_dir() else "an existing file"
    raise NotOwnedError(f"{path}: {what} and not written by `{writers[0]}` (no {marker_path(path).name} marker), so "
                        f"it is not replaced and nothing was deleted; choose another --out, or pass {FORCE} to "
                        "replace it")


def _aside(path: Path) -> Path:
    """Where ``path`` is renamed before it is deleted."""
    return path.with_name(f".{path.name}.{os.getpid()}.old")


def remove_owned(path: Path, writers: tuple[str, ...], owner: Path | None = None) -> None:
    """Delete the folder ``path`` if :func:`check_replaceable` allows it for ``owner``, the folder whose marker
    vouches for it (``path`` itself by default; a run directory for its checkpoints). It is first renamed
    aside, so an interrupted delete never leaves a half-deleted folder under its name."""
    path = Path(path)
    if not path.exists():
        return
    check_replaceable(path if owner is None else owner, writers)
    aside = _aside(path)
    path.rename(aside)
    shutil.rmtree(aside)


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises ``SystemExit(143)`` in this block (so that ``finally`` clauses run), in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def replacing(out: Path, writer: str, force: bool = False) -> Iterator[Path]:
    """A new folder beside ``out`` to write into; when the block ends without error it is marked as
    ``writer``'s and replaces ``out``. On an error or SIGTERM it is removed and ``out`` stays as it was."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotOwnedError(f"{out}: exists and is not a directory; choose another --out")
    check_replaceable(out, (writer,), force)
    with _sigterm_raises():
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        try:
            os.chmod(staging, 0o755)
            yield staging
            mark(staging, writer)
            _swap(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def _swap(staging: Path, out: Path) -> None:
    """Rename ``staging`` to ``out``; an existing ``out`` is renamed aside until that succeeds, then deleted."""
    if not out.exists():
        staging.rename(out)
        return
    retired = _aside(out)
    out.rename(retired)
    try:
        staging.rename(out)
    except BaseException:
        retired.rename(out)
        raise
    shutil.rmtree(retired)


@contextmanager
def run_lock(directory: Path) -> Iterator[None]:
    """Hold the exclusive write lock of run ``directory`` (created if missing) in this block.

    Raises :class:`RunLockedError`, naming the holder's pid and host, if another process holds it. The
    lock file is removed on exit, and ``directory`` too if this block created it and left it empty.
    """
    directory = Path(directory)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    path = RunDir(directory).lock
    try:
        handle = _acquire(path)
        try:
            handle.truncate(0)
            handle.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
            handle.flush()
            yield
        finally:
            path.unlink(missing_ok=True)
            handle.close()
    finally:
        if created:
            with suppress(OSError):  # not empty: the run wrote into it
                directory.rmdir()


def _acquire(path: Path):
    """The open, locked lock file; retried when the file was replaced between opening and locking."""
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunLockedError(f"{path.parent}: another libra process writes this run directory ({holder}); "
                                 "wait for it to finish or stop it, or choose another --out") from None
        try:
            same = os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return handle
        handle.close()
