"""Starting a child process with its share of this machine: the cores it may use and its torch threads."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import IO

__all__ = ["cores", "start_process"]


def cores() -> int:
    """The cores this process may run on: its affinity mask (taskset, cgroups and SLURM narrow it;
    ``os.cpu_count()`` does not see that)."""
    return len(os.sched_getaffinity(0))


def _in_child(cpus: tuple[int, ...] | None, ignored: tuple[signal.Signals, ...]) -> None:
    for signum in ignored:
        signal.signal(signum, signal.SIG_IGN)
    if cpus:
        os.sched_setaffinity(0, cpus)


def start_process(command: Sequence[str], threads: int | None = None, cpus: tuple[int, ...] | None = None,
                  env: dict[str, str] | None = None, cwd: Path | None = None, output: IO[bytes] | None = None,
                  new_session: bool = False, ignored_signals: tuple[signal.Signals, ...] = ()
                  ) -> subprocess.Popen[bytes]:
    """Starts ``command`` with unbuffered Python output, ``threads`` torch threads (OMP_NUM_THREADS) if
    given, kept to ``cpus`` if given, with ``env`` added to this process's environment; ``output``
    receives its stdout and stderr (None: this process's), ``ignored_signals`` are ignored from the start."""
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if threads:
        child_env["OMP_NUM_THREADS"] = str(threads)
    return subprocess.Popen(list(command), cwd=cwd, env=child_env, stdout=output,
                            stderr=subprocess.STDOUT if output is not None else None,
                            start_new_session=new_session, preexec_fn=functools.partial(_in_child, cpus, ignored_signals))
