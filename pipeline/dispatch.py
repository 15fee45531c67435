"""Dispatch an ablation's planned runs: reuse finished runs, resume interrupted ones, train the rest.

A run is identified by its **key**: a hash of its resolved config (its plan file), the digest of the
data set (``data/manifest.json``) and the digest of the backbone weights file its config loads.
Before a run trains, its key is written to ``<run>/run_key``. Per planned run, :func:`dispatch`
then decides:

* ``metrics.json`` present and the same key: **reused**, nothing runs;
* the same key, not evaluated yet, ``checkpoints/last.ckpt`` present: **resumed** from it (a run
  stopped by a signal, killed, preempted or failed before: a retry continues where it stopped);
* otherwise **trained**: a directory with another key (its config, data or weights changed) or
  without one is moved aside and deleted first (it is this pipeline's own output).

Each run to do is one job (:class:`RunJob`): ``libra train --plan P --out RUN --resume``, then
``libra evaluate --run RUN``, each a subprocess in the repository root, with their output appended
to ``<run>/dispatch.log``. Executors: ``inline`` (one after another in this process), ``local``
(submitit's LocalExecutor: ``jobs`` runs at once, each with its share of the cores) and ``slurm``
(submitit: one sbatch job per run, nodes and GPUs from the run's ``trainer`` settings, Lightning
DDP over them through Lightning's SLURM environment; at the time limit or a preemption the job stops
its training, which saves ``last.ckpt``, and is requeued to continue with ``--resume``).

A failed run (non-finite loss, out of memory, a lost node) does not stop the others; it is
recorded in ``runs/index.json`` with its reason and :func:`dispatch` reports failure at the end,
so DVC does not record an incomplete ablation; the next dispatch retries only the unfinished runs.
SIGTERM or SIGINT stops every job (each saves a checkpoint to resume from) and starts no new one.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Literal, Protocol

import submitit
from pydantic import Field
from submitit.core.utils import FailedJobError, UncompletedJobError

from pipeline.ablation import file_digest, plan_path
from pipeline.config import ConfigError, PositiveInt, StrictModel, validate_model
from pipeline.io import write_json_atomic, write_text_atomic
from pipeline.runplan import RUN_KEY_FILE, RunPlan, compute_run_key, read_plan_summary, read_run_plan

"""In a run directory: the key of the run it holds, written before training starts."""
LOG_FILE = "dispatch.log"
"""In a run directory: the output of every train and evaluate attempt, appended."""
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
CODE_ROOT = Path(__file__).resolve().parents[1]
"""The directory holding this package: jobs import the code that dispatched them."""
LOCAL_TIMEOUT_MIN = 60 * 24 * 30
"""Local jobs have no time limit of their own; submitit's LocalExecutor needs one (default 2 min)."""

Action = Literal["reused", "resumed", "trained"]


# ---------------------------------------------------------------- settings


class SlurmSettings(StrictModel):
    """``execution.slurm``: the sbatch options of every run's job."""

    partition: str | None = None
    nodes: PositiveInt | None = None
    """Checked against each run's ``trainer.num_nodes`` (the source of truth: it changes the training)."""
    gpus_per_node: int | None = Field(None, ge=0)
    """Checked against each run's ``trainer.devices`` (0 for ``trainer.accelerator: cpu``)."""
    cpus_per_task: PositiveInt | None = None
    mem_gb: float | None = Field(None, gt=0)
    time_min: PositiveInt = 720
    max_timeouts: int = Field(3, ge=0)
    """How often a run may reach the time limit and be requeued before it counts as failed."""
    extra: dict[str, str | bool] = {}
    """More ``#SBATCH`` flags, e.g. ``{account: proj, qos: high, exclusive: true}``."""


class ExecutionSettings(StrictModel):
    """``execution`` in params.yaml: how ``libra dispatch`` runs the planned runs (not what they compute)."""

    executor: Literal["inline", "local", "slurm"] = "local"
    jobs: PositiveInt = 2
    """Runs at once with the local executor."""
    threads: PositiveInt | None = None
    """Torch threads per run (OMP_NUM_THREADS); None: the cores divided by ``jobs`` (local),
    every core (inline), ``slurm.cpus_per_task`` (slurm)."""
    job_dir: Path = Path("runs/.submitit")
    """submitit's pickles and logs (for SLURM: on a file system the nodes share)."""
    slurm: SlurmSettings = SlurmSettings()


def execution_settings(params: dict[str, Any], overrides: dict[str, Any]) -> ExecutionSettings:
    """``params['execution']`` with the non-None ``overrides`` (same keys; ``slurm`` merged key by key)."""
    raw = dict(params.get("execution") or {})
    slurm = {**(raw.get("slurm") or {}), **{k: v for k, v in (overrides.get("slurm") or {}).items() if v is not None}}
    raw.update({k: v for k, v in overrides.items() if k != "slurm" and v is not None})
    raw["slurm"] = slurm
    return validate_model(ExecutionSettings, raw, "params.yaml: execution (with the command line)")


# ---------------------------------------------------------------- what to run


@dataclass(frozen=True)
class PlannedRun:
    plan: RunPlan
    plan_file: Path
    key: str

    @property
    def name(self) -> str:
        return self.plan.name


def planned_runs(plan_dir: Path, data_digest: str, root: Path) -> list[PlannedRun]:
    """The runs of ``plan_dir/ablation.yaml`` in plan order, each with its key."""
    weights: dict[Path, str] = {}
    runs = []
    for entry in read_plan_summary(plan_dir).runs:
        plan_file = plan_path(entry.detector, entry.combination, entry.seed, plan_dir)
        plan = read_run_plan(plan_file)
        model = plan.config["model"]
        fix = ("pre-train it (`dvc repro pretrain`; for resnet50 put torchvision's ImageNet state_dict there) "
               "or point the config at the weights file")
        digest = _input_digest(plan_file, "model.backbone.weights", model["backbone"]["weights"], root, weights, fix)
        init = _input_digest(plan_file, "model.init_from", model.get("init_from"), root, weights,
                             "point it at a `libra train` checkpoint or a detector state_dict")
        runs.append(PlannedRun(plan, plan_file, compute_run_key(plan.config, data_digest, digest, init)))
    return runs


def _input_digest(plan_file: Path, field: str, source: str | None, root: Path, digests: dict[Path, str],
                  fix: str) -> str | None:
    """The digest of the file a run's ``field`` names (None if it names none), each file hashed once."""
    if source is None:
        return None
    path = Path(source) if Path(source).is_absolute() else root / source
    if not path.is_file():
        raise ConfigError(f"{plan_file}: {field}={source} does not exist; {fix}")
    return digests.setdefault(path, file_digest([path]))


def _aside(directory: Path) -> Path:
    return directory.with_name(f".{directory.name}.discarded")


def decide(run: PlannedRun, root: Path) -> Action:
    """What ``run``'s directory needs (see the module docstring)."""
    directory = root / run.plan.run_dir
    key_file = directory / RUN_KEY_FILE
    if key_file.exists() and key_file.read_text().strip() == run.key:
        if (directory / "metrics.json").exists():
            return "reused"
        if (directory / "checkpoints" / "last.ckpt").exists():
            return "resumed"
    return "trained"


def prepare_run_dir(run: PlannedRun, root: Path) -> str | None:
    """Makes ``run``'s directory ready for its job; returns why an old directory was discarded, if one was."""
    directory = root / run.plan.run_dir
    key_file = directory / RUN_KEY_FILE
    old_key = key_file.read_text().strip() if key_file.exists() else None
    discarded = None
    if directory.exists() and old_key != run.key:
        aside = _aside(directory)
        shutil.rmtree(aside, ignore_errors=True)
        directory.rename(aside)
        shutil.rmtree(aside)
        discarded = (f"its config, data or weights changed (key {old_key} -> {run.key})" if old_key
                     else "no run_key: not started by libra dispatch")
    directory.mkdir(parents=True, exist_ok=True)
    write_text_atomic(key_file, run.key + "\n")
    return discarded


def resumed_step(run: PlannedRun, root: Path) -> int:
    """The optimizer step ``run``'s last checkpoint was saved at."""
    from pipeline.engine.checkpoint import read_checkpoint

    return int(read_checkpoint(root / run.plan.run_dir / "checkpoints" / "last.ckpt").get("global_step", 0))


# ---------------------------------------------------------------- one run's job


@dataclass(frozen=True)
class JobResult:
    status: Literal["finished", "failed", "stopped"]
    reason: str | None = None
    seconds: float = 0.0
    signum: int | None = None
    """The signal that stopped the job (status ``stopped``)."""


def _under_slurm() -> bool:
    return os.environ.get("SUBMITIT_EXECUTOR") == "slurm"


def _prepare_child(cpus: tuple[int, ...] | None) -> None:
    """In a job's child before exec: ignore submitit's time-limit signal (SLURM sends it to every process
    of the job; its default action would end the training without a checkpoint; the job stops the
    child with SIGTERM instead, :meth:`RunJob.checkpoint`), and keep to the job's ``cpus``, if given."""
    signal.signal(getattr(signal, f"SIG{submitit.JobEnvironment.USR_SIG}"), signal.SIG_IGN)
    if cpus:
        os.sched_setaffinity(0, cpus)


def _last_error(output: str) -> str:
    """The most telling line of a failed command's output: its last `libra ...: error:` line, else its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("libra ") and ": error: " in line]
    return (errors or lines or ["(no output)"])[-1]


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
    """One run's job: train it (resuming from its checkpoint if there is one), then evaluate it.

    Runs where it is called: in the dispatching process (inline) or in a submitit job. Each step is a
    subprocess (a crash or an out-of-memory kill ends only that process; Lightning DDP launches its
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

    def train_command(self) -> list[str]:
        return [self.python, "-m", "stages.cli", "train", "--plan", self.plan_file.as_posix(),
                "--out", self.run_dir.as_posix(), "--resume"]

    def evaluate_command(self) -> list[str]:
        return [self.python, "-m", "stages.cli", "evaluate", "--run", self.run_dir.as_posix(), "--device", "auto"]

    def __call__(self) -> JobResult:
        start = time.monotonic()
        rank = int(os.environ.get("SLURM_PROCID", "0")) if _under_slurm() else 0
        log = self.root / self.run_dir / (LOG_FILE if rank == 0 else f"dispatch.rank{rank}.log")
        with self._forwarding_stop_signals():
            for step, command in (("train", self.train_command()), ("evaluate", self.evaluate_command())):
                if step == "evaluate" and rank != 0:
                    break
                if self._stop is not None:
                    name = signal.Signals(self._stop).name
                    return JobResult("stopped", f"stopped by {name} before {step}", time.monotonic() - start, self._stop)
                returncode, output = self._run(command, log)
                if returncode != 0:
                    status, reason, signum = describe_exit(step, returncode, output)
                    return JobResult(status, reason, time.monotonic() - start, signum)
        return JobResult("finished", None, time.monotonic() - start)

    def _run(self, command: list[str], log: Path) -> tuple[int, str]:
        """Runs ``command`` with its output appended to ``log``; returns its exit code and this attempt's output."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(CODE_ROOT), os.environ.get("PYTHONPATH")]))}
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            out.write(f"\n== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n".encode())
            out.flush()
            offset = out.tell()
            # Outside SLURM the child gets its own session: a Ctrl-C in the terminal then reaches it only
            # through this job (once), not also directly. Under SLURM, scancel and preemption signal every
            # process of the job themselves.
            self._child = subprocess.Popen(command, cwd=self.root, env=env, stdout=out, stderr=subprocess.STDOUT,
                                           start_new_session=not _under_slurm(),
                                           preexec_fn=functools.partial(_prepare_child, self.cpus))
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
        """SIGTERM/SIGINT to this process stop the running step (once: it saves a checkpoint). Under
        SLURM the signals reach the child directly, so they are left to submitit."""
        if _under_slurm():
            yield
            return
        previous = {signum: signal.signal(signum, self._request_stop) for signum in STOP_SIGNALS}
        blocked = signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on the time-limit or preemption signal: stops the training child, which
        saves ``checkpoints/last.ckpt``, then requeues this job, which continues with ``--resume``."""
        child = self._child
        if child is not None:
            child.send_signal(signal.SIGTERM)
            try:  # not Popen.wait: the interrupted main thread may hold its lock
                os.waitpid(child.pid, 0)
            except ChildProcessError:
                pass
        return submitit.helpers.DelayedSubmission(self)


# ---------------------------------------------------------------- executors


class Handle(Protocol):
    def result(self) -> JobResult | None:
        """The job's result, or None while it runs."""

    def stop(self) -> None:
        """Ask the job to stop; it saves a checkpoint and ends with status ``stopped``."""


class Backend(Protocol):
    description: str

    def room_for(self, run: PlannedRun, running: int) -> bool:
        """Whether ``run`` may start now, with ``running`` jobs running."""

    def start(self, run: PlannedRun, job: RunJob) -> Handle: ...

    def release(self, run: PlannedRun) -> None:
        """``run``'s job ended: its resources are free."""


class _Finished:
    def __init__(self, result: JobResult):
        self._result = result

    def result(self) -> JobResult:
        return self._result

    def stop(self) -> None:
        pass


class InlineBackend:
    """Runs each job in this process when it starts (one after another)."""

    description = "inline (one run after another, in this process)"

    def room_for(self, run: PlannedRun, running: int) -> bool:
        return running == 0

    def start(self, run: PlannedRun, job: RunJob) -> Handle:
        return _Finished(job())

    def release(self, run: PlannedRun) -> None:
        pass


class _SubmititHandle:
    def __init__(self, job: submitit.Job, stop: Callable[[submitit.Job], None]):
        self.job = job
        self._stop = stop

    def result(self) -> JobResult | None:
        if not self.job.done():
            return None
        try:
            return self.job.results()[0]
        except (UncompletedJobError, FailedJobError) as exc:
            lines = [line for line in str(exc).splitlines() if line.strip()]
            return JobResult("failed", f"job {self.job.job_id} ended without a result ({lines[0] if lines else exc!r}); "
                             f"see {self.job.paths.stderr} and {self.job.paths.stdout}")

    def stop(self) -> None:
        self._stop(self.job)


@contextmanager
def _sigint_blocked() -> Iterator[None]:
    """While submitting a local job: its controller process starts with SIGINT blocked, so a Ctrl-C in
    the terminal does not make it kill the job after a second; the dispatcher stops jobs with SIGTERM,
    which the controller forwards."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _gpus_wanted(plan: RunPlan, available: int) -> int:
    trainer = plan.config["trainer"]
    if trainer["accelerator"] in ("cpu", "mps") or (trainer["accelerator"] == "auto" and available == 0):
        return 0
    return available if trainer["devices"] == "auto" else int(trainer["devices"])


class LocalBackend:
    """submitit's LocalExecutor: ``jobs`` runs at once on this machine; GPUs, and cores when each job
    can have its own ``threads`` of them, shared out without overlap (processes that the scheduler
    moves between cores can run many times slower than processes kept to their cores)."""

    def __init__(self, settings: ExecutionSettings, gpus: list[int], threads: int):
        self.jobs = settings.jobs
        self.executor = submitit.LocalExecutor(folder=settings.job_dir)
        self.free_gpus = list(gpus)
        self.total_gpus = len(gpus)
        available = sorted(os.sched_getaffinity(0))
        self.threads = threads if settings.jobs * threads <= len(available) else None
        self.free_cpus = available
        self.assigned: dict[str, tuple[list[int], list[int]]] = {}
        pinned = f", each kept to {threads} core(s)" if self.threads else ""
        self.description = f"local ({settings.jobs} at once{pinned})"

    def room_for(self, run: PlannedRun, running: int) -> bool:
        wanted = _gpus_wanted(run.plan, self.total_gpus)
        return running < self.jobs and (wanted <= len(self.free_gpus) or wanted > self.total_gpus)

    def start(self, run: PlannedRun, job: RunJob) -> Handle:
        wanted = _gpus_wanted(run.plan, self.total_gpus)
        if wanted > self.total_gpus:  # fails at once rather than waiting for GPUs that do not exist
            return _Finished(JobResult("failed", f"needs {wanted} GPUs (trainer.devices), this machine has "
                                                 f"{self.total_gpus}"))
        gpus, self.free_gpus = self.free_gpus[:wanted], self.free_gpus[wanted:]
        cpus: list[int] = []
        if self.threads:
            cpus, self.free_cpus = self.free_cpus[:self.threads], self.free_cpus[self.threads:]
            job = job.on_cpus(tuple(cpus))
        self.assigned[run.name] = (gpus, cpus)
        self.executor.update_parameters(timeout_min=LOCAL_TIMEOUT_MIN, tasks_per_node=1, gpus_per_node=wanted,
                                        visible_gpus=gpus)
        with _sigint_blocked():
            job_handle = self.executor.submit(job)
        return _SubmititHandle(job_handle, _signal_local_job)

    def release(self, run: PlannedRun) -> None:
        gpus, cpus = self.assigned.pop(run.name, ([], []))
        self.free_gpus += gpus
        self.free_cpus = sorted(self.free_cpus + cpus)


def _signal_local_job(job: submitit.Job) -> None:
    """SIGTERM to the job's controller process (its pid is the job id), which forwards it to the job."""
    if job.state == "RUNNING":
        os.kill(int(job.job_id), signal.SIGTERM)


def _cancel_slurm_job(job: submitit.Job) -> None:
    """scancel: SLURM sends SIGTERM to every process of the job (training saves its checkpoint), then SIGKILL."""
    job.cancel(check=False)


def slurm_parameters(run: PlannedRun, settings: ExecutionSettings, job: RunJob) -> dict[str, Any]:
    """submitit's AutoExecutor parameters of ``run``'s job: one task per device and node (DDP ranks)."""
    trainer, slurm = run.plan.config["trainer"], settings.slurm
    devices = trainer["devices"]
    if devices == "auto":
        raise ConfigError(f"{run.plan_file}: trainer.devices=auto; a SLURM job must ask for a number of devices, "
                          "set trainer.devices (params.yaml) to the GPUs (or CPU processes) per node")
    gpus = 0 if trainer["accelerator"] in ("cpu", "mps") else int(devices)
    checks = (("nodes", trainer["num_nodes"], "trainer.num_nodes"), ("gpus_per_node", gpus, "trainer.devices"))
    for option, wanted, field in checks:
        given = getattr(slurm, option)
        if given is not None and given != wanted:
            raise ConfigError(
                f"{run.plan_file}: execution.slurm.{option}={given}, but the run's {field} asks for {wanted} "
                f"(trainer.accelerator {trainer['accelerator']}, devices {devices}, num_nodes {trainer['num_nodes']}); "
                "devices and nodes are part of a run's config (with train.batch_size they make the global batch): "
                f"set {field} in params.yaml, or leave execution.slurm.{option} empty")
    threads = settings.threads or slurm.cpus_per_task
    command = f"{shlex.join(job.train_command())} && {shlex.join(job.evaluate_command())}"
    parameters: dict[str, Any] = {
        "name": f"libra:{run.name}", "timeout_min": slurm.time_min, "nodes": trainer["num_nodes"],
        "tasks_per_node": int(devices), "gpus_per_node": gpus, "cpus_per_task": slurm.cpus_per_task,
        "mem_gb": slurm.mem_gb, "slurm_partition": slurm.partition,
        "slurm_additional_parameters": {"requeue": True, **slurm.extra},
        "slurm_setup": [f"# libra dispatch: {run.name} (rank 0 evaluates): {command}",
                        *([f"export OMP_NUM_THREADS={threads}"] if threads else [])],
    }
    return {k: v for k, v in parameters.items() if v is not None}


class SlurmBackend:
    """submitit on SLURM: every run's job is submitted at once; SLURM schedules them."""

    def __init__(self, settings: ExecutionSettings):
        self.settings = settings
        self.executor = submitit.AutoExecutor(folder=settings.job_dir, cluster="slurm",
                                              slurm_max_num_timeout=settings.slurm.max_timeouts)
        where = f"partition {settings.slurm.partition}" if settings.slurm.partition else "the default partition"
        self.description = f"slurm ({where}, one job per run, {settings.slurm.time_min} min per job before requeue)"

    def room_for(self, run: PlannedRun, running: int) -> bool:
        return True

    def start(self, run: PlannedRun, job: RunJob) -> Handle:
        self.executor.update_parameters(**slurm_parameters(run, self.settings, job))
        return _SubmititHandle(self.executor.submit(job), _cancel_slurm_job)

    def release(self, run: PlannedRun) -> None:
        pass


def visible_gpus() -> list[int]:
    """Indices of this machine's GPUs that jobs may use (CUDA_VISIBLE_DEVICES is honoured by torch)."""
    import torch

    return list(range(torch.cuda.device_count()))


def cores() -> int:
    return len(os.sched_getaffinity(0))


def make_backend(settings: ExecutionSettings, runs: list[PlannedRun]) -> tuple[Backend, int | None]:
    """The executor's backend and the torch threads per run."""
    if settings.executor == "inline":
        return InlineBackend(), settings.threads or cores()
    if settings.executor == "local":
        needs_gpus = any(r.plan.config["trainer"]["accelerator"] not in ("cpu", "mps") for r in runs)
        threads = settings.threads or max(1, cores() // settings.jobs)
        return LocalBackend(settings, visible_gpus() if needs_gpus else [], threads), threads
    return SlurmBackend(settings), settings.threads or settings.slurm.cpus_per_task


# ---------------------------------------------------------------- the dispatch


@dataclass(frozen=True)
class RunStatus:
    status: Literal["reused", "resumed", "trained", "failed", "stopped"]
    reason: str | None = None
    seconds: float | None = None
    from_step: int | None = None
    """The step a resumed run continued from."""


class _StopRequest:
    """SIGTERM/SIGINT to the dispatcher: stop every job and start no new one; a second signal ends it at once."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.signum = signum

    @contextmanager
    def installed(self) -> Iterator[None]:
        previous = {signum: signal.signal(signum, self) for signum in STOP_SIGNALS}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def _run_jobs(todo: list[tuple[PlannedRun, Action]], backend: Backend, threads: int | None, root: Path,
              say: Callable[[str], None], stop: _StopRequest) -> dict[str, RunStatus]:
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
                f" (log: {run.plan.run_dir / LOG_FILE})")
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
                done[name] = RunStatus(result.status, f"{result.reason} (log: {run.plan.run_dir / LOG_FILE})",
                                       round(result.seconds, 1), from_step)
                say(f"{name}: {result.status} after {result.seconds:.0f} s: {done[name].reason}")
                if result.status == "stopped" and stop.signum is None:
                    stop.signum = result.signum or signal.SIGTERM
        if running:
            time.sleep(0.5)
    return done


def _metrics(run_dir: Path) -> dict[str, float]:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {name: float(value) for name, value in metrics["bbox"].items()}


def write_curves(runs: list[PlannedRun], root: Path, path: Path) -> None:
    """One CSV of every run's curves: run, epoch, train_loss, val_AP (empty where not logged)."""
    import pandas as pd

    from pipeline.engine.curves import epoch_curves, read_metrics_csv

    frames = []
    for run in runs:
        curves = epoch_curves(read_metrics_csv(root / run.plan.run_dir / "metrics.csv"))
        if curves.empty:
            continue
        frames.append(pd.DataFrame({"run": run.name, "epoch": curves["epoch"],
                                    "train_loss": curves.get("train/loss"), "val_AP": curves.get("val/AP")}))
    table = pd.concat(frames) if frames else pd.DataFrame(columns=["run", "epoch", "train_loss", "val_AP"])
    write_text_atomic(path, table.to_csv(index=False, float_format="%.6g"))


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
             root: Path = Path("."), say: Callable[[str], None] = print) -> DispatchOutcome:
    """Bring every planned run to finished (see the module docstring); writes ``index`` and ``curves``."""
    try:
        data_digest = json.loads(manifest.read_text())["digest"]
    except OSError as exc:
        raise ConfigError(f"{manifest}: cannot read the data manifest ({exc.strerror}); run "
                          f"`libra prepare --manifest {manifest}` (or `dvc repro prepare`) first") from None
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{manifest}: not a data manifest with a digest; rerun "
                          f"`libra prepare --manifest {manifest}` (or `dvc repro prepare`)") from None
    runs = planned_runs(plan_dir, data_digest, root)
    for run in runs:  # left over by a discard that was interrupted
        shutil.rmtree(_aside(root / run.plan.run_dir), ignore_errors=True)
    actions = {run.name: decide(run, root) for run in runs}
    todo = [(run, actions[run.name]) for run in runs if actions[run.name] != "reused"]
    counts = {a: list(actions.values()).count(a) for a in ("reused", "resumed", "trained")}
    statuses = {run.name: RunStatus("reused") for run in runs if actions[run.name] == "reused"}
    stop = _StopRequest()
    if todo:
        backend, threads = make_backend(settings, [run for run, _ in todo])
        say(f"{len(runs)} planned runs: {counts['reused']} reused, {counts['resumed']} to resume, "
            f"{counts['trained']} to train; executor {backend.description}"
            f"{f', {threads} thread(s) per run' if threads else ''}")
        with stop.installed():
            statuses |= _run_jobs(todo, backend, threads, root, say, stop)
    else:
        say(f"{len(runs)} planned runs, every one finished already: nothing to run")
    entries = {}
    for run in runs:
        status = statuses[run.name]
        entry: dict[str, Any] = {"status": status.status, "key": run.key}
        entry |= {k: v for k, v in (("reason", status.reason), ("seconds", status.seconds),
                                    ("from_step", status.from_step)) if v is not None}
        if status.status not in ("failed", "stopped"):
            entry["metrics"] = _metrics(root / run.plan.run_dir)
        entries[run.name] = entry
    write_json_atomic(index, {"runs": entries})
    write_curves(runs, root, curves)
    return DispatchOutcome({run.name: statuses[run.name] for run in runs}, stop.signum)

