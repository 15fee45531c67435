"""The dispatch: decide per planned run, start the jobs to do as the backend has room, collect their
results, stop them all on a signal, and write the run index and the curves."""

from __future__ import annotations

import json
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from detection.config import ConfigError
from pipeline.dispatch.backends import Backend, Handle, make_backend
from pipeline.dispatch.job import RunJob
from pipeline.dispatch.runs import (Action, PlannedRun, check_run_dirs, decide, planned_runs, prepare_run_dir,
                                    resumed_step)
from pipeline.plan.execution import ExecutionSettings
from detection.io import write_json_atomic
from detection.run_dir import RunDir
from detection.signals import StopRequest, handling_stop_signals


@dataclass(frozen=True)
class RunStatus:
    status: Literal["reused", "resumed", "trained", "failed", "stopped"]
    reason: str | None = None
    seconds: float | None = None
    from_step: int | None = None
    """The step a resumed run continued from."""


def _run_jobs(todo: list[tuple[PlannedRun, Action]], backend: Backend, threads: int | None, root: Path,
              say: Callable[[str], None], stop: StopRequest) -> dict[str, RunStatus]:
    """Runs ``todo``; the first SIGTERM/SIGINT (``stop``) stops every job and starts no new one."""
    pending = deque(todo)
    running: dict[str, tuple[PlannedRun, Action, int | None, Handle]] = {}
    done: dict[str, RunStatus] = {}
    stopping = False
    count = len(todo)
    while pending or running:
        if stop.signum is not None and not stopping:
            stopping = True
            say(f"stopping: {signal.Signals(stop.signum).name}; {len(running)} running job(s) save a checkpoint")
            for _, _, _, handle in running.values():
                handle.stop()
            for run, _ in pending:
                done[run.name] = RunStatus("stopped", f"not started: stopped by {signal.Signals(stop.signum).name}")
            pending.clear()
        while pending and backend.room_for(pending[0][0], len(running)):
            run, action = pending.popleft()
            try:
                discarded = prepare_run_dir(run, root)
                from_step = resumed_step(run, root) if action == "resumed" else None
            except (OSError, ValueError) as exc:
                done[run.name] = RunStatus("failed", str(exc))
                say(f"{run.name}: failed: {exc}")
                continue
            if discarded:
                say(f"{run.name}: discarded the old run directory: {discarded}")
            job = RunJob(run.name, run.plan_file, run.plan.run_dir, root, threads)
            say(f"[{count - len(pending)}/{count}] {run.name}: "
                f"{'resuming from step ' + str(from_step) if action == 'resumed' else 'training'}"
                f" (log: {RunDir(run.plan.run_dir).dispatch_log()})")
            running[run.name] = (run, action, from_step, backend.start(run, job))
        for name, (run, action, from_step, handle) in list(running.items()):
            result = handle.result()
            if result is None:
                continue
            del running[name]
            backend.release(run)
            if result.status == "finished":
                done[name] = RunStatus(action, None, round(result.seconds, 1), from_step)
                say(f"{name}: {action}, finished in {result.seconds:.0f} s")
            else:
                log = RunDir(run.plan.run_dir).dispatch_log()
                done[name] = RunStatus(result.status, f"{result.reason} (log: {log})", round(result.seconds, 1), from_step)
                say(f"{name}: {result.status} after {result.seconds:.0f} s: {done[name].reason}")
                if result.status == "stopped" and stop.signum is None:
                    stop.signum = result.signum or signal.SIGTERM
        if running:
            time.sleep(0.5)
    return done


def _bbox_metrics(run_dir: Path) -> dict[str, float]:
    metrics = json.loads(RunDir(run_dir).metrics.read_text())
    return {name: float(value) for name, value in metrics["bbox"].items()}


def _index_entry(run: PlannedRun, status: RunStatus, root: Path) -> dict[str, Any]:
    entry: dict[str, Any] = {"status": status.status, "key": run.key}
    entry |= {k: v for k, v in (("reason", status.reason), ("seconds", status.seconds),
                                ("from_step", status.from_step)) if v is not None}
    if status.status not in ("failed", "stopped"):
        entry["metrics"] = _bbox_metrics(root / run.plan.run_dir)
    return entry


@dataclass(frozen=True)
class DispatchOutcome:
    statuses: dict[str, RunStatus]
    stopped_by: int | None

    @property
    def unfinished(self) -> list[str]:
        return [name for name, s in self.statuses.items() if s.status in ("failed", "stopped")]

    @property
    def exit_code(self) -> int:
        if self.stopped_by is not None:
            return 128 + self.stopped_by
        return 1 if self.unfinished else 0


def dispatch(plan_dir: Path, manifest: Path, settings: ExecutionSettings, index: Path, curves: Path,
             root: Path = Path("."), say: Callable[[str], None] = print, force: bool = False) -> DispatchOutcome:
    """Bring every planned run to finished (see :mod:`pipeline.dispatch`); writes ``index`` and ``curves``.
    ``force``: take over run directories libra dispatch did not make (see :func:`check_run_dirs`)."""
    from detection.engine.curves import write_runs_curves

    try:
        data_digest = json.loads(manifest.read_text())["digest"]
    except OSError as exc:
        raise ConfigError(f"{manifest}: cannot read the data manifest ({exc.strerror}); run "
                          f"`libra prepare --manifest {manifest}` (or `dvc repro prepare`) first") from None
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{manifest}: not a data manifest with a digest; rerun "
                          f"`libra prepare --manifest {manifest}` (or `dvc repro prepare`)") from None
    runs = planned_runs(plan_dir, data_digest, root)
    check_run_dirs(runs, root, force)
    actions = {run.name: decide(run, root) for run in runs}
    todo = [(run, actions[run.name]) for run in runs if actions[run.name] != "reused"]
    counts = {a: list(actions.values()).count(a) for a in ("reused", "resumed", "trained")}
    statuses = {run.name: RunStatus("reused") for run in runs if actions[run.name] == "reused"}
    stop = StopRequest()
    if todo:
        backend, threads = make_backend(settings, [run for run, _ in todo])
        say(f"{len(runs)} planned runs: {counts['reused']} reused, {counts['resumed']} to resume, "
            f"{counts['trained']} to train; executor {backend.description}"
            f"{f', {threads} thread(s) per run' if threads else ''}")
        with handling_stop_signals(stop):
            statuses |= _run_jobs(todo, backend, threads, root, say, stop)
    else:
        say(f"{len(runs)} planned runs, every one finished already: nothing to run")
    write_json_atomic(index, {"runs": {run.name: _index_entry(run, statuses[run.name], root) for run in runs}})
    write_runs_curves({run.name: RunDir(root / run.plan.run_dir) for run in runs}, curves)
    return DispatchOutcome({run.name: statuses[run.name] for run in runs}, stop.signum)
