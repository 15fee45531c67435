"""One run's job: ``libra run`` (train, then evaluate) as a subprocess, its log, its stop and its exit."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Literal

import submitit

from pipeline.dispatch.processes import start_process
from pipeline.plan.runplan import EVALUATION_STARTED
from detection.run_dir import RunDir
from detection.signals import STOP_SIGNALS, handling_stop_signals

CODE_ROOT = Path(__file__).resolve().parents[2]
"""The directory holding this package: jobs import the code that dispatched them."""


@dataclass(frozen=True)
class JobResult:
    status: Literal["finished", "failed", "stopped"]
    reason: str | None = None
    seconds: float = 0.0
    signum: int | None = None
    """The signal that stopped the job (status ``stopped``)."""


def under_slurm() -> bool:
    return os.environ.get("SUBMITIT_EXECUTOR") == "slurm"


def _last_error(output: str) -> str:
    """The most telling line of a failed command's output: its last `libra ...: error:` line, else its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("libra ") and ": error: " in line]
    return (errors or lines or ["(no output)"])[-1]


def failed_step(output: str) -> Literal["train", "evaluate"]:
    """The step of ``libra run`` that ``output`` (one attempt's) ended in."""
    return "evaluate" if EVALUATION_STARTED in output else "train"


def describe_exit(step: str, returncode: int, output: str) -> tuple[Literal["failed", "stopped"], str, int | None]:
    """Status, reason and stopping signal of a step that exited with ``returncode`` != 0."""
    stops = {128 + s: s for s in STOP_SIGNALS} | {-s: s for s in STOP_SIGNALS}
    if returncode in stops:
        signum = stops[returncode]
        return "stopped", f"{step} stopped by {signal.Signals(signum).name}; continues from its last checkpoint", signum
    if returncode < 0:
        name = signal.Signals(-returncode).name
        hint = " (the kernel's out-of-memory killer, or a kill by hand)" if -returncode == signal.SIGKILL else ""
        return "failed", f"{step} killed by {name}{hint}", None
    return "failed", f"{step} exited with {returncode}: {_last_error(output)}", None


class RunJob(submitit.helpers.Checkpointable):
    """One run's job: ``libra run`` trains it (resuming from its checkpoint if there is one), then evaluates it.

    Runs where it is called: in the dispatching process (inline) or in a submitit job. The run is one
    subprocess (a crash or an out-of-memory kill ends only that run; Lightning DDP launches its
    processes from it). Under SLURM, every task of the job trains one DDP rank and rank 0 evaluates.
    """

    def __init__(self, name: str, plan_file: Path, run_dir: Path, root: Path, threads: int | None,
                 cpus: tuple[int, ...] | None = None):
        self.name = name
        self.plan_file = plan_file
        self.run_dir = run_dir
        self.root = root.resolve()
        self.threads = threads
        self.cpus = cpus
        """The cores its processes keep to (the local executor's share for this job), None: any."""
        self.python = sys.executable
        self._child: subprocess.Popen[bytes] | None = None
        self._stop: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_child": None, "_stop": None}

    def on_cpus(self, cpus: tuple[int, ...]) -> RunJob:
        """This job, kept to ``cpus``."""
        return RunJob(self.name, self.plan_file, self.run_dir, self.root, self.threads, cpus)

    def command(self) -> list[str]:
        return [self.python, "-m", "stages.cli", "run", "--plan", self.plan_file.as_posix(),
                "--out", self.run_dir.as_posix(), "--resume", "--device", "auto"]

    def __call__(self) -> JobResult:
        start = time.monotonic()
        rank = int(os.environ.get("SLURM_PROCID", "0")) if under_slurm() else 0
        log = RunDir(self.root / self.run_dir).dispatch_log(rank)
        with self._forwarding_stop_signals():
            if self._stop is not None:
                name = signal.Signals(self._stop).name
                return JobResult("stopped", f"stopped by {name} before the run started", time.monotonic() - start,
                                 self._stop)
            returncode, output = self._run(log)
        if returncode != 0:
            status, reason, signum = describe_exit(failed_step(output), returncode, output)
            return JobResult(status, reason, time.monotonic() - start, signum)
        return JobResult("finished", None, time.monotonic() - start)

    def _run(self, log: Path) -> tuple[int, str]:
        """Runs the command with its output appended to ``log``; returns its exit code and this attempt's output."""
        command = self.command()
        python_path = os.pathsep.join(filter(None, [str(CODE_ROOT), os.environ.get("PYTHONPATH")]))
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            out.write(f"\n== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n".encode())
            out.flush()
            offset = out.tell()
            # Outside SLURM the child gets its own session: a Ctrl-C in the terminal then reaches it only
            # through this job (once), not also directly. Under SLURM, scancel and preemption signal every
            # process of the job themselves. submitit's time-limit signal, which SLURM sends to every
            # process of the job, is ignored by the child (its default action would end the training
            # without a checkpoint); the job stops the child with SIGTERM instead (:meth:`checkpoint`).
            usr_signal = getattr(signal, f"SIG{submitit.JobEnvironment.USR_SIG}")
            self._child = start_process(command, threads=self.threads, cpus=self.cpus,
                                        env={"PYTHONPATH": python_path}, cwd=self.root, output=out,
                                        new_session=not under_slurm(), ignored_signals=(usr_signal,))
            try:
                returncode = self._child.wait()
            finally:
                self._child = None
        with log.open("rb") as handle:
            handle.seek(max(offset, log.stat().st_size - 65536))
            return returncode, handle.read().decode(errors="replace")

    def _request_stop(self, signum: int, frame: FrameType | None) -> None:
        if self._stop is None:
            self._stop = signum
            if self._child is not None:
                self._child.send_signal(signum)

    @contextmanager
    def _forwarding_stop_signals(self) -> Iterator[None]:
        """SIGTERM/SIGINT to this process stop the run (once: it saves a checkpoint). Under SLURM the
        signals reach the child directly, so they are left to submitit."""
        if under_slurm():
            yield
            return
        with handling_stop_signals(self._request_stop):
            blocked = signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
            try:
                yield
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on the time-limit or preemption signal: stops the run's child, which
        saves ``checkpoints/last.ckpt``, then requeues this job, which continues with ``--resume``."""
        child = self._child
        if child is not None:
            child.send_signal(signal.SIGTERM)
            try:  # not Popen.wait: the interrupted main thread may hold its lock
                os.waitpid(child.pid, 0)
            except ChildProcessError:
                pass
        return submitit.helpers.DelayedSubmission(self)
